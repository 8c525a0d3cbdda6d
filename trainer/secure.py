"""A site's side of secure aggregation across rounds: one `SiteRound` at a time per run, refusing replays.

The servicer hands each stage's request here; errors are SecAggError and its subclasses
(`phalanx.streams.status_for_secagg` names their gRPC status). The update a site masks is its
trained adapter minus the global adapter it received, flattened in the global adapter's order,
scaled down to `clip_norm` if longer, noised with `noise_std` per coordinate if asked (its share
of the round's DP noise), then quantised and masked. Under adaptive clipping one more coordinate follows: the
clip norm if the update was within it, else 0, plus noise of clip_norm * count_noise_std.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from phalanx.identity import printable
from phalanx.privacy import gaussian_noise
from phalanx.rpc import TlsCredentials
from phalanx.secagg import messages
from phalanx.secagg.errors import OutOfOrder, SecAggError
from phalanx.secagg.keys import Context, Signer, Verifier
from phalanx.secagg.protocol import Setup, SiteRound
from phalanx.v1 import trainer_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_RUNS = 64
"""Runs whose secure rounds a site keeps track of; the least recently keyed beyond that are forgotten."""


@dataclass
class _RunRounds:
    """One run's open round (if any) and the latest (round, attempt) keyed in it."""

    round: SiteRound | None = None
    keyed: tuple[int, int] = (-1, -1)


@dataclass(frozen=True)
class MaskedUpdate:
    words: np.ndarray
    range_clipped: int


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def locked(self: SecureRounds, *args: Any) -> T:
        with self._lock:
            return method(self, *args)

    return locked


class SecureRounds:
    """Signs with the site's certificate key and checks peers against the federation's CA."""

    def __init__(self, tls: TlsCredentials) -> None:
        self.site = tls.identity.name
        self._signer = Signer(tls.cert, tls.key)
        self._verifier = Verifier(tls.ca)
        self._runs: OrderedDict[str, _RunRounds] = OrderedDict()
        self._lock = threading.Lock()  # steps run in worker threads: one at a time

    @_locked
    def advertise(self, request: trainer_pb2.AdvertiseKeysRequest) -> trainer_pb2.AdvertiseKeysResponse:
        """Make the round's keys. A round and attempt no later than the last keyed is refused (a replay)."""
        context = messages.context_of(request.round)
        run = self._runs.get(context.run_id) or _RunRounds()
        if (context.round, context.attempt) <= run.keyed:
            raise OutOfOrder(
                f"round {context.round} attempt {context.attempt} is closed: this site has made keys "
                f"for round {run.keyed[0]} attempt {run.keyed[1]}"
            )
        setup = Setup(
            context,
            tuple(messages.names(request.participants, "participants")),
            request.neighbours,
            request.threshold,
        )
        if self.site not in setup.position:
            raise SecAggError(f"site {self.site} is not among the round's participants")
        run.keyed = (context.round, context.attempt)
        run.round = SiteRound(setup, self.site, self._signer, self._verifier)
        self._runs[context.run_id] = run
        self._runs.move_to_end(context.run_id)
        while len(self._runs) > MAX_RUNS:
            self._runs.popitem(last=False)
        return trainer_pb2.AdvertiseKeysResponse(keys=messages.keys_to_message(run.round.keys()))

    @_locked
    def share(self, request: trainer_pb2.ShareKeysRequest) -> trainer_pb2.ShareKeysResponse:
        """Check the neighbours' keys and seal shares for them. CPU work: call it in a worker thread."""
        current = self._current(messages.context_of(request.round))
        if len(request.neighbours) > len(current.setup.participants):
            raise SecAggError(
                f"{len(request.neighbours)} neighbour keys for a round of {len(current.setup.participants)} sites"
            )
        sealed = current.share([messages.keys_from_message(k) for k in request.neighbours])
        return trainer_pb2.ShareKeysResponse(shares=messages.sealed_list(sealed))

    @_locked
    def begin(self, run_id: str, round_: int, secure: trainer_pb2.SecureAggregation) -> None:
        """Check a Train request's masking parameters and take the shares it carries."""
        current = self._current(Context(run_id, round_, secure.attempt))
        if not (0 < secure.weight_share <= 1 and math.isfinite(secure.clip_range) and secure.clip_range > 0):
            raise SecAggError(
                f"weight share {secure.weight_share} must be in (0, 1] and clip range {secure.clip_range} positive"
            )
        if not all(
            math.isfinite(v) and v >= 0 for v in (secure.clip_norm, secure.noise_std, secure.count_noise_std)
        ):
            raise SecAggError(
                f"clip norm {secure.clip_norm} and noise {secure.noise_std} must be finite and not negative"
            )
        if secure.count_unclipped and secure.clip_norm == 0:
            raise SecAggError("counting unclipped updates needs a clip norm")
        for sender in current.receive(messages.by_site(secure.shares, "shares")):
            log.warning(
                "round %d: shares from site %s fail authentication; they will not be revealed", round_, sender
            )

    @_locked
    def mask(
        self,
        run_id: str,
        received: Mapping[str, np.ndarray],
        trained: Mapping[str, np.ndarray],
        secure: trainer_pb2.SecureAggregation,
    ) -> MaskedUpdate:
        """The masked update of a trained adapter. CPU work: call it in a worker thread."""
        run = self._runs.get(run_id)
        current = run.round if run is not None else None
        if current is None:
            raise OutOfOrder("this site's secure-aggregation round closed while it trained")
        size = sum(np.size(a) for a in received.values())
        update = np.empty(size + secure.count_unclipped, dtype=np.float64)  # the count takes the last word
        offset = 0
        for name, before in received.items():
            part = update[offset : offset + np.size(before)]
            np.subtract(np.ravel(trained[name]), np.ravel(before), out=part, dtype=np.float64)
            offset += part.size
        values = update[:size]
        if secure.clip_norm > 0:
            norm = math.sqrt(float(np.einsum("i,i->", values, values)))  # not BLAS: no thread pool wakes up
            if norm > secure.clip_norm:
                values *= secure.clip_norm / norm
            if secure.count_unclipped:
                within = secure.clip_norm * (norm <= secure.clip_norm)
                update[size] = within + gaussian_noise(1, secure.clip_norm * secure.count_noise_std)[0]
        if secure.noise_std > 0:
            values += gaussian_noise(size, secure.noise_std)
        words, clipped = current.mask(update, secure.weight_share, secure.clip_range)
        if clipped:
            log.info("%d coordinates of the update were clipped to ±%g", clipped, secure.clip_range)
        return MaskedUpdate(words, clipped)

    @_locked
    def unmask(self, request: trainer_pb2.UnmaskRequest) -> trainer_pb2.UnmaskResponse:
        """Reveal the shares asked for; the round's secrets are gone afterwards, so this happens once."""
        current = self._current(messages.context_of(request.round))
        seeds, keys = current.unmask(
            messages.names(request.survivors, "survivors"), messages.names(request.dropped, "dropped sites")
        )
        self._runs[current.setup.context.run_id].round = None
        return trainer_pb2.UnmaskResponse(
            seed_shares=messages.revealed_list(seeds), key_shares=messages.revealed_list(keys)
        )

    def _current(self, context: Context) -> SiteRound:
        run = self._runs.get(context.run_id) or _RunRounds()
        current = run.round
        if current is None or current.setup.context != context:
            raise OutOfOrder(
                f"this site has no open secure-aggregation round {context.round} attempt {context.attempt} "
                f"of run {printable(context.run_id)} (last keyed: round {run.keyed[0]} attempt {run.keyed[1]})"
            )
        return current
