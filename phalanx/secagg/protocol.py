"""The two sides of one secure-aggregation round as plain state machines: `SiteRound` and `ServerRound`.

Both are driven stage by stage (keys, shares, masked input, unmask) by whatever carries the
messages, gRPC in the federation or direct calls in tests. A call out of order, or input that
does not check out, raises SecAggError naming the fault; nothing a site holds is revealed early.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from phalanx.identity import printable
from phalanx.pki import PkiError, check_site_name
from phalanx.secagg import graph, shamir
from phalanx.secagg.errors import OutOfOrder, SecAggError
from phalanx.secagg.keys import (
    Context,
    SignedKeys,
    Signer,
    Verifier,
    agree,
    check_points,
    commitment,
    open_sealed,
    pair_seed,
    public_bytes,
    seal,
)
from phalanx.secagg.masks import add_stream, quantise

MAX_PARTICIPANTS = 1024
SEALED_BYTES = 2 * shamir.SHARE_BYTES + 16
"""One encrypted pair of shares: the self-mask seed's and the mask key's, and the AEAD tag."""
MAX_RECOVERY_TRIES = 64
"""Subsets of t shares tried per secret when some shares are bad, before the round gives up."""


@dataclass(frozen=True)
class Setup:
    """What both sides know before the round's first message: its context, participants and graph parameters."""

    context: Context
    participants: tuple[str, ...]
    neighbours: int
    threshold: int

    def __post_init__(self) -> None:
        if len(self.participants) > MAX_PARTICIPANTS:
            raise SecAggError(f"{len(self.participants)} participants; at most {MAX_PARTICIPANTS}")
        if len(set(self.participants)) != len(self.participants):
            raise SecAggError("participants must be distinct")
        try:
            for name in self.participants:
                check_site_name(name)
        except PkiError as exc:
            raise SecAggError(f"participant list: {exc}") from None
        graph.check_params(len(self.participants), self.neighbours, self.threshold)

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        """Every participant's neighbours (the coordinator needs them all)."""
        return graph.neighbours(self.participants, self.neighbours, self._seed)

    def neighbours_of(self, site: str) -> frozenset[str]:
        """One participant's neighbours: what a site needs, without the whole graph."""
        return graph.neighbours_of(self.participants, self.neighbours, self._seed, site)

    @cached_property
    def _seed(self) -> bytes:
        return graph.graph_seed(self.context.run_id, self.context.round, self.context.attempt, self.participants)

    @cached_property
    def position(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.participants)}

    def x(self, site: str) -> int:
        """Where `site`'s shares are evaluated: its position plus one."""
        return self.position[site] + 1

    def adds(self, site: str, peer: str) -> bool:
        """Whether `site` adds (rather than subtracts) the mask it shares with `peer`."""
        return self.position[site] < self.position[peer]

    def check_site(self, site: str) -> None:
        if site not in self.position:
            raise SecAggError(f"site {printable(site)} is not a participant of round {self.context.round}")


@dataclass
class _Received:
    sender: str
    seed_share: bytes
    key_share: bytes


class SiteRound:
    """One site's side of one round. Its secrets live only in this object, and are dropped after unmask."""

    def __init__(self, setup: Setup, site: str, signer: Signer, verifier: Verifier) -> None:
        setup.check_site(site)
        self.setup = setup
        self.site = site
        self._verifier = verifier
        self._cipher = X25519PrivateKey.generate()
        self._mask: X25519PrivateKey | None = X25519PrivateKey.generate()
        self._seed: bytes | None = os.urandom(32)
        context = setup.context
        commit = commitment(self._seed, context, site)
        unsigned = SignedKeys(
            site, public_bytes(self._cipher), public_bytes(self._mask), commit, b"", signer.certificate
        )
        self._keys = replace(unsigned, signature=signer.sign(unsigned.message(context)))
        self._peers: dict[str, SignedKeys] = {}
        self._agreed: dict[str, bytes] = {}  # X25519 agreement with each peer's cipher key
        self._received: dict[str, _Received] = {}
        self._maskers: list[str] = []
        self.stage = "keys"

    def keys(self) -> SignedKeys:
        return self._keys

    def share(self, peers: Sequence[SignedKeys]) -> dict[str, bytes]:
        """Check the neighbours' signed keys; return each one its encrypted pair of shares, by name.

        Raises SecAggError if a key does not check out (someone substituted it), if a peer is not
        a neighbour or appears twice, or if fewer than t neighbours remain.
        """
        self._expect("keys", "shares")
        mine = self.setup.neighbours_of(self.site)
        names = [p.site for p in peers]
        if len(set(names)) != len(names) or not set(names) <= mine:
            raise SecAggError(f"keys offered to site {self.site} are not for distinct neighbours of it")
        if len(peers) < self.setup.threshold:
            raise SecAggError(
                f"only {len(peers)} neighbours have keys; the threshold is {self.setup.threshold}"
            )
        for peer in peers:
            self._verifier.check(peer, self.setup.context, peer.site)
        assert self._seed is not None and self._mask is not None
        xs = [self.setup.x(name) for name in names]
        seed_shares = shamir.split(self._seed, xs, self.setup.threshold)
        key_shares = shamir.split(self._mask.private_bytes_raw(), xs, self.setup.threshold)
        sealed = {}
        for peer, x in zip(peers, xs, strict=True):
            # One agreement per peer serves both directions: the HKDF info names sender and recipient.
            self._agreed[peer.site] = agree(self._cipher, peer.cipher_key)
            plaintext = seed_shares[x] + key_shares[x]
            sealed[peer.site] = seal(self._agreed[peer.site], self.setup.context, self.site, peer.site, plaintext)
        self._peers = {p.site: p for p in peers}
        self.stage = "shared"
        return sealed

    def receive(self, sealed: Mapping[str, bytes]) -> list[str]:
        """Take the shares the neighbours sent this site; return the senders whose shares were refused.

        Every sender is masked with, whether its shares open or not (it masks with this site),
        but only shares that authenticate are kept to be revealed later.
        """
        self._expect("shared", "masked input")
        if not set(sealed) <= set(self._peers):
            raise SecAggError(
                f"shares offered to site {self.site} come from sites that are not its keyed neighbours"
            )
        if len(sealed) < self.setup.threshold:
            raise SecAggError(
                f"only {len(sealed)} neighbours sent shares; the threshold is {self.setup.threshold}"
            )
        refused = []
        for sender, ciphertext in sealed.items():
            try:
                if len(ciphertext) != SEALED_BYTES:
                    raise SecAggError(
                        f"shares from site {sender} are {len(ciphertext)} bytes, not {SEALED_BYTES}"
                    )
                plain = open_sealed(self._agreed[sender], self.setup.context, sender, self.site, ciphertext)
            except SecAggError:
                refused.append(sender)
                continue
            self._received[sender] = _Received(
                sender, plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES :]
            )
        self._maskers = sorted(sealed, key=self.setup.position.__getitem__)
        self.stage = "received"
        return refused

    def mask(self, update: np.ndarray, weight_share: float, clip_range: float) -> tuple[np.ndarray, int]:
        """The masked, quantised update (uint32 words), and how many coordinates were clipped to the range."""
        self._expect("received", "masked input")
        assert self._seed is not None and self._mask is not None
        words, clipped = quantise(update, weight_share, clip_range, len(self.setup.participants))
        words = words.copy()
        add_stream(words, self._seed)
        for peer in self._maskers:
            shared = agree(self._mask, self._peers[peer].mask_key)
            seed = pair_seed(shared, self.setup.context, self.site, peer)
            add_stream(words, seed, subtract=not self.setup.adds(self.site, peer))
        self.stage = "masked"
        return words, clipped

    def unmask(
        self, survivors: Sequence[str], dropped: Sequence[str]
    ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Reveal, for each neighbour, its self-mask share if it survived or its mask-key share if it
        dropped; once per round, so no peer ever gets both revealed. Returns (seed shares, key shares).

        Refused if the two lists overlap, name non-participants, or leave fewer survivors than
        the threshold (the sum of so few would expose them).
        """
        self._expect("masked", "unmask")
        alive, gone = set(survivors), set(dropped)
        if len(alive) != len(survivors) or len(gone) != len(dropped) or alive & gone:
            raise SecAggError("survivors and dropped sites must be distinct lists with no site in both")
        for name in alive | gone:
            self.setup.check_site(name)
        if len(alive) < self.setup.threshold:
            raise SecAggError(
                f"only {len(alive)} survivors; at least {self.setup.threshold} are needed to unmask"
            )
        self.stage = "done"
        self._seed = self._mask = None
        seeds = {name: r.seed_share for name, r in self._received.items() if name in alive}
        keys = {name: r.key_share for name, r in self._received.items() if name in gone}
        self._received.clear()
        self._agreed.clear()
        return seeds, keys

    def _expect(self, stage: str, step: str) -> None:
        if self.stage != stage:
            raise OutOfOrder(
                f"site {self.site} cannot take the {step} step now (its round is at {self.stage})"
            )


class ServerRound:
    """The coordinator's side of one round: relays keys and shares, sums masked inputs, removes the masks.

    It sees only public keys, ciphertexts, masked words and the shares revealed for unmasking.
    """

    def __init__(self, setup: Setup, verifier: Verifier, length: int) -> None:
        self.setup = setup
        self.length = length
        self._verifier = verifier
        self.keys: dict[str, SignedKeys] = {}
        self._sealed: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> ciphertext
        self._masked: set[str] = set()
        self._total = np.zeros(length, dtype=np.uint32)
        self._seed_shares: dict[str, dict[int, bytes]] = {}  # revealed shares: site -> x -> share
        self._key_shares: dict[str, dict[int, bytes]] = {}
        self._revealed: set[str] = set()
        self._unmasking: tuple[frozenset[str], frozenset[str]] | None = None

    @property
    def shared(self) -> list[str]:
        """Sites whose shares were accepted (U2), in participant order."""
        return [p for p in self.setup.participants if p in self._sealed]

    @property
    def survivors(self) -> list[str]:
        """Sites whose masked input is in the sum, in participant order."""
        return [p for p in self.setup.participants if p in self._masked]

    def accept_keys(self, site: str, keys: SignedKeys) -> None:
        self.setup.check_site(site)
        if site in self.keys:
            raise OutOfOrder(f"site {site} already sent its keys")
        self._verifier.check(keys, self.setup.context, site)
        check_points(keys)
        self.keys[site] = keys

    def keys_for(self, site: str) -> list[SignedKeys]:
        """The keyed neighbours' signed keys, to relay to `site`."""
        return [
            self.keys[p] for p in self.setup.participants if p in self.setup.graph[site] and p in self.keys
        ]

    def accept_shares(self, site: str, sealed: Mapping[str, bytes]) -> None:
        """Keep `site`'s encrypted shares: one per keyed neighbour, each SEALED_BYTES long."""
        if self._masked:
            raise OutOfOrder(f"site {site} sent shares after masked inputs began to arrive")
        if site not in self.keys or site in self._sealed:
            raise OutOfOrder(f"site {site} sent shares without keys, or twice")
        expected = {k.site for k in self.keys_for(site)}
        if set(sealed) != expected:
            raise SecAggError(
                f"site {site} sent shares for {len(sealed)} sites, not one for each of its {len(expected)} keyed neighbours"
            )
        if any(len(c) != SEALED_BYTES for c in sealed.values()):
            raise SecAggError(f"site {site} sent a share of the wrong length (each is {SEALED_BYTES} bytes)")
        self._sealed[site] = dict(sealed)

    def shares_for(self, site: str) -> dict[str, bytes]:
        """The encrypted shares addressed to `site` by the sites that shared, by sender."""
        return {sender: by[site] for sender, by in self._sealed.items() if site in by}

    def accept_masked(self, site: str, words: np.ndarray) -> None:
        """Add `site`'s masked input to the sum; its length and type must match, and only once."""
        if site not in self._sealed or site in self._masked:
            raise OutOfOrder(f"site {site} sent a masked input without sharing first, or twice")
        if self._unmasking is not None:
            raise OutOfOrder(f"site {site} sent its masked input after unmasking began")
        if words.dtype != np.uint32 or words.shape != (self.length,):
            raise SecAggError(f"site {site} sent {words.size} masked words; the round sums {self.length}")
        self._total += words
        self._masked.add(site)

    def start_unmask(self, min_survivors: int) -> tuple[list[str], list[str]]:
        """Close the inputs: the survivors and the dropped (shared, no input), to ask every site for their shares."""
        if self._unmasking is not None:
            raise OutOfOrder("unmasking has begun already")
        survivors = self.survivors
        need = max(min_survivors, self.setup.threshold)
        if len(survivors) < need:
            raise SecAggError(f"{len(survivors)} masked inputs arrived; unmasking needs {need}")
        dropped = [p for p in self.shared if p not in self._masked]
        self._unmasking = (frozenset(survivors), frozenset(dropped))
        return survivors, dropped

    def accept_revealed(
        self, site: str, seed_shares: Mapping[str, bytes], key_shares: Mapping[str, bytes]
    ) -> None:
        """Keep the shares `site` revealed: self-mask shares of surviving neighbours, mask-key shares of dropped ones."""
        if self._unmasking is None:
            raise OutOfOrder("shares arrived before unmasking began")
        if site not in self._sealed or site in self._revealed:
            raise OutOfOrder(f"site {site} revealed shares without having shared, or twice")
        alive, gone = self._unmasking
        mine = self.setup.graph[site]
        if not set(seed_shares) <= alive & mine or not set(key_shares) <= gone & mine:
            raise SecAggError(f"site {site} revealed shares it was not asked for")
        if any(len(s) != shamir.SHARE_BYTES for s in (*seed_shares.values(), *key_shares.values())):
            raise SecAggError(
                f"site {site} revealed a share of the wrong length (each is {shamir.SHARE_BYTES} bytes)"
            )
        x = self.setup.x(site)
        for peer, share in seed_shares.items():
            self._seed_shares.setdefault(peer, {})[x] = share
        for peer, share in key_shares.items():
            self._key_shares.setdefault(peer, {})[x] = share
        self._revealed.add(site)

    def result(self) -> np.ndarray:
        """The sum of the survivors' quantised inputs (uint32 words), every mask removed.

        Raises SecAggError naming the site whose mask cannot be removed (too few good shares).
        CPU-heavy for many sites or long vectors: run it in a worker thread.
        """
        if self._unmasking is None:
            raise OutOfOrder("unmasking has not begun")
        alive, gone = self._unmasking
        total = self._total.copy()
        context = self.setup.context
        for site in self.survivors:
            keys = self.keys[site]
            seed = self._recover(
                site,
                "self-mask seed",
                self._seed_shares,
                lambda s, k=keys, n=site: commitment(s, context, n) == k.commitment,
            )
            add_stream(total, seed, subtract=True)
        for site in (p for p in self.setup.participants if p in gone):
            keys = self.keys[site]
            raw = self._recover(
                site, "mask key", self._key_shares,
                lambda s, k=keys: public_bytes(X25519PrivateKey.from_private_bytes(s)) == k.mask_key,
            )  # fmt: skip
            private = X25519PrivateKey.from_private_bytes(raw)
            for peer in self.setup.graph[site] & alive:
                # The survivor masked with the dropped site: take its term back out.
                seed = pair_seed(agree(private, self.keys[peer].mask_key), context, site, peer)
                add_stream(total, seed, subtract=self.setup.adds(peer, site))
        return total

    def _recover(
        self, site: str, what: str, store: Mapping[str, Mapping[int, bytes]], valid: Callable[[bytes], bool]
    ) -> bytes:
        shares = store.get(site, {})
        t = self.setup.threshold
        if len(shares) < t:
            raise SecAggError(
                f"cannot remove the mask of site {site}: {len(shares)} shares of its {what} arrived, {t} needed"
            )
        for subset in _subsets(sorted(shares), t, site):
            try:
                secret = shamir.combine({x: shares[x] for x in subset})
            except SecAggError:
                continue
            if valid(secret):
                return secret
        raise SecAggError(
            f"cannot remove the mask of site {site}: its {what} shares do not reconstruct the committed value"
        )


def _subsets(xs: list[int], t: int, site: str) -> Iterator[tuple[int, ...]]:
    """At most MAX_RECOVERY_TRIES subsets of t of the points `xs`: all of them if there are no
    more, else the first t and then random ones. In lexicographic order the first tries would all
    keep the lowest points, so one bad share there would stop the recovery however many good
    ones arrived. The draw is seeded by the site: which subsets are tried is not secret.
    """
    if math.comb(len(xs), t) <= MAX_RECOVERY_TRIES:
        yield from itertools.combinations(xs, t)
        return
    yield tuple(xs[:t])
    rng = random.Random(site)
    for _ in range(MAX_RECOVERY_TRIES - 1):
        yield tuple(sorted(rng.sample(xs, t)))
