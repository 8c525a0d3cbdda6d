"""The secure-aggregation package (`phalanx.secagg`) in memory, with no gRPC: one `SiteRound` per
simulated site and one `ServerRound`, driven stage by stage by direct calls.

Covered: the decoded sum with no dropouts, one dropout and the most dropouts the round's graph
allows (and the failure one more brings); sites missing before masking; masked words that look
uniform to the coordinator; replays from another round; substituted keys and certificates that do
not check out; tampered ciphertexts and wrong revealed shares; malformed masked inputs; that no
site reveals both shares of one peer; Shamir sharing; the neighbour graph and its parameters;
quantisation, clipping and overflow; the protobuf conversions.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from phalanx.pki import ROLE_COORDINATOR, ROLE_SITE, Authority, cert_pem, issue, key_pem, new_authority
from phalanx.secagg import graph, messages, shamir
from phalanx.secagg.errors import KeyRejected, OutOfOrder, SecAggError
from phalanx.secagg.keys import (
    Context,
    Signer,
    Verifier,
    agree,
    commitment,
    open_sealed,
    pair_seed,
    public_bytes,
    seal,
)
from phalanx.secagg.masks import dequantise, error_bound, levels, quantise, stream
from phalanx.secagg.protocol import MAX_PARTICIPANTS, SEALED_BYTES, ServerRound, Setup, SiteRound
from phalanx.v1 import trainer_pb2

NAMES = tuple(f"site-{i:02d}" for i in range(50))
CONTEXT = Context("run-1", 1, 0)
RANGE = 2.5
LENGTH = 257
FLOAT_SLACK = 1e-12
"""Room for float64 rounding in the expected sum, far below any error bound checked (~1e-9)."""

Revealed = dict[str, tuple[dict[str, bytes], dict[str, bytes]]]


@dataclass(frozen=True)
class Federation:
    authority: Authority
    verifier: Verifier
    signers: dict[str, Signer]


@pytest.fixture(scope="module")
def fed() -> Federation:
    authority = new_authority()
    signers = {}
    for name in NAMES:
        cert, key = issue(authority, name, ROLE_SITE, ["localhost"])
        signers[name] = Signer(cert_pem(cert), key_pem(key))
    return Federation(authority, Verifier(cert_pem(authority.cert)), signers)


class Round:
    """One round among the first `n` of NAMES, each stage run for every site still in it."""

    def __init__(
        self,
        fed: Federation,
        n: int,
        *,
        context: Context = CONTEXT,
        neighbours: int | None = None,
        threshold: int | None = None,
        length: int = LENGTH,
    ) -> None:
        k = neighbours if neighbours is not None else graph.default_neighbours(n)
        t = threshold if threshold is not None else graph.default_threshold(min(k, n - 1))
        self.n = n
        self.setup = Setup(context, NAMES[:n], k, t)
        self.sites = {
            name: SiteRound(self.setup, name, fed.signers[name], fed.verifier)
            for name in self.setup.participants
        }
        self.server = ServerRound(self.setup, fed.verifier, length)
        self.refused: dict[str, list[str]] = {}
        self.clipped: dict[str, int] = {}
        self.revealed: Revealed = {}

    @property
    def t(self) -> int:
        return self.setup.threshold

    def keys(self, absent: Sequence[str] = ()) -> None:
        for name, site in self.sites.items():
            if name not in absent:
                self.server.accept_keys(name, site.keys())

    def share(self, absent: Sequence[str] = ()) -> None:
        for name in [p for p in self.setup.participants if p in self.server.keys and p not in absent]:
            self.server.accept_shares(name, self.sites[name].share(self.server.keys_for(name)))

    def receive(self, tamper: Mapping[str, Mapping[str, bytes]] | None = None) -> None:
        """Deliver each sharer its shares; `tamper` replaces ciphertexts: recipient -> sender -> bytes."""
        for name in self.server.shared:
            delivered = {**self.server.shares_for(name), **(tamper or {}).get(name, {})}
            self.refused[name] = self.sites[name].receive(delivered)

    def mask(
        self, updates: Mapping[str, np.ndarray], shares: Mapping[str, float], absent: Sequence[str] = ()
    ) -> None:
        for name in self.server.shared:
            if name not in absent:
                words, self.clipped[name] = self.sites[name].mask(updates[name], shares[name], RANGE)
                self.server.accept_masked(name, words)

    def unmask(self, alter: Callable[[Revealed], None] | None = None) -> tuple[list[str], list[str]]:
        """Every survivor reveals (the dropped are gone); `alter` may change what reaches the server."""
        survivors, dropped = self.server.start_unmask(self.t)
        self.revealed = {name: self.sites[name].unmask(survivors, dropped) for name in survivors}
        if alter is not None:
            alter(self.revealed)
        for name, (seeds, keys) in self.revealed.items():
            self.server.accept_revealed(name, seeds, keys)
        return survivors, dropped

    def run(
        self,
        updates: Mapping[str, np.ndarray],
        shares: Mapping[str, float],
        *,
        no_keys: Sequence[str] = (),
        no_shares: Sequence[str] = (),
        no_input: Sequence[str] = (),
    ) -> np.ndarray:
        """Every stage, then the decoded weighted sum."""
        self.keys(no_keys)
        self.share(no_shares)
        self.receive()
        self.mask(updates, shares, no_input)
        self.unmask()
        return self.decoded()

    def decoded(self) -> np.ndarray:
        return dequantise(self.server.result(), RANGE, self.n)


def random_updates(
    n: int, length: int = LENGTH, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Updates in [-RANGE, RANGE] (both ends included) and unequal weight shares summing to 1."""
    rng = np.random.default_rng(seed)
    names = NAMES[:n]
    updates = {}
    for name in names:
        update = rng.uniform(-RANGE, RANGE, length)
        update[:2] = RANGE, -RANGE
        updates[name] = update
    weights = rng.integers(1, 1000, n).astype(np.float64)
    return updates, {name: float(w / weights.sum()) for name, w in zip(names, weights)}


def assert_weighted_sum(
    decoded: np.ndarray,
    updates: Mapping[str, np.ndarray],
    shares: Mapping[str, float],
    survivors: Sequence[str],
    n: int,
) -> None:
    expected = np.sum([shares[s] * updates[s] for s in survivors], axis=0)
    error = float(np.abs(decoded - expected).max())
    assert error <= error_bound(len(survivors), RANGE, n) + FLOAT_SLACK, error


def short_of_neighbours(setup: Setup, gone: set[str]) -> list[str]:
    """Participants left with fewer than t neighbours outside `gone`, in participant order.

    A survivor's self-mask seed is recovered from its surviving neighbours' shares, and a dropped
    site's mask key likewise, so a set of dropped sites can be survived iff this is empty.
    """
    return [p for p in setup.participants if len(setup.graph[p] - gone) < setup.threshold]


def most_dropouts(setup: Setup) -> list[str]:
    """A maximal survivable set of dropped sites, by a greedy pass in participant order.

    Losing sites only takes neighbours away, so a site refused once stays refused: one pass
    leaves no site that could still be added.
    """
    gone: list[str] = []
    for p in setup.participants:
        if not short_of_neighbours(setup, {*gone, p}):
            gone.append(p)
    return gone


# --- correctness with dropouts --------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 10, 50])
def test_sum_of_all_sites_with_no_dropouts(fed: Federation, n: int) -> None:
    updates, shares = random_updates(n, seed=n)
    rnd = Round(fed, n)
    decoded = rnd.run(updates, shares)
    assert rnd.server.survivors == list(NAMES[:n])
    assert all(c == 0 for c in rnd.clipped.values()) and all(r == [] for r in rnd.refused.values())
    assert_weighted_sum(decoded, updates, shares, NAMES[:n], n)


@pytest.mark.parametrize("n", [10, 50])
def test_sum_with_one_dropout_after_masking(fed: Federation, n: int) -> None:
    updates, shares = random_updates(n, seed=n + 1)
    rnd = Round(fed, n)
    gone = NAMES[n // 2]
    assert not short_of_neighbours(rnd.setup, {gone})
    decoded = rnd.run(updates, shares, no_input=[gone])
    survivors = [p for p in NAMES[:n] if p != gone]
    assert rnd.server.survivors == survivors
    assert_weighted_sum(decoded, updates, shares, survivors, n)


def test_three_sites_cannot_survive_one_dropout(fed: Federation) -> None:
    """k = 2, t = 2: a survivor keeps one neighbour, so one share of its self-mask seed."""
    rnd = Round(fed, 3)
    assert (rnd.setup.neighbours, rnd.t) == (2, 2)
    updates, shares = random_updates(3)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares, absent=[NAMES[0]])
    rnd.unmask()
    with pytest.raises(SecAggError, match=f"cannot remove the mask of site {NAMES[1]}: 1 shares"):
        rnd.server.result()


@pytest.mark.parametrize(("n", "expected"), [(3, 0), (10, 3), (50, None)])
def test_sum_with_the_most_dropouts_the_threshold_allows(
    fed: Federation, n: int, expected: int | None
) -> None:
    updates, shares = random_updates(n, seed=n + 2)
    rnd = Round(fed, n)
    gone = most_dropouts(rnd.setup)
    if expected is not None:  # complete graphs: 3 sites lose none; 10 sites (t = 6 of 9) lose 3
        assert len(gone) == expected
    else:
        assert len(gone) >= 1
    for p in NAMES[:n]:
        if p not in gone:
            assert short_of_neighbours(rnd.setup, {*gone, p}), f"{p} could also drop"
    decoded = rnd.run(updates, shares, no_input=gone)
    survivors = [p for p in NAMES[:n] if p not in gone]
    assert (rnd.server.survivors, rnd.server.shared) == (survivors, list(NAMES[:n]))
    assert_weighted_sum(decoded, updates, shares, survivors, n)


@pytest.mark.parametrize("n", [3, 10, 50])
def test_one_dropout_more_than_the_threshold_allows_fails_the_round(fed: Federation, n: int) -> None:
    updates, shares = random_updates(n, seed=n + 3)
    rnd = Round(fed, n)
    gone = most_dropouts(rnd.setup)
    extra = next(p for p in rnd.setup.participants if p not in gone)
    gone = [p for p in rnd.setup.participants if p in {*gone, extra}]
    short = short_of_neighbours(rnd.setup, set(gone))
    assert short
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares, absent=gone)
    survivors = [p for p in NAMES[:n] if p not in gone]
    if len(survivors) < rnd.t:
        with pytest.raises(SecAggError, match="masked inputs arrived"):
            rnd.server.start_unmask(rnd.t)
        return
    rnd.unmask()
    # Survivors' seeds are recovered first, then the dropped sites' keys, each in participant order.
    first = next(p for p in [*survivors, *gone] if p in short)
    with pytest.raises(SecAggError, match=f"cannot remove the mask of site {first}:"):
        rnd.server.result()


@pytest.mark.parametrize("n", [10, 50])
def test_sites_missing_before_masking_are_left_out(fed: Federation, n: int) -> None:
    updates, shares = random_updates(n, seed=n + 4)
    rnd = Round(fed, n)
    no_keys, no_shares, no_input = NAMES[1], NAMES[4], NAMES[7]
    assert not short_of_neighbours(rnd.setup, {no_keys, no_shares, no_input})
    rnd.keys(absent=[no_keys])
    with pytest.raises(OutOfOrder):
        rnd.server.accept_shares(no_keys, {})
    rnd.share(absent=[no_shares])
    assert no_keys not in rnd.server.keys and no_shares in rnd.server.keys
    assert rnd.server.shared == [p for p in NAMES[:n] if p not in (no_keys, no_shares)]
    rnd.receive()
    assert no_keys not in rnd.refused and no_shares not in rnd.refused
    rnd.mask(updates, shares, absent=[no_input])
    with pytest.raises(OutOfOrder):
        rnd.server.accept_masked(
            no_shares, rnd.sites[no_input].mask(updates[no_input], shares[no_input], RANGE)[0]
        )
    survivors, dropped = rnd.unmask()
    assert dropped == [no_input]
    assert survivors == [p for p in NAMES[:n] if p not in (no_keys, no_shares, no_input)]
    assert_weighted_sum(rnd.decoded(), updates, shares, survivors, n)


def test_too_few_keyed_or_sharing_neighbours_stop_a_site(fed: Federation) -> None:
    rnd = Round(fed, 10)  # complete graph, t = 6 of 9
    rnd.keys(absent=NAMES[6:])
    with pytest.raises(SecAggError, match="only 5 neighbours have keys; the threshold is 6"):
        rnd.sites[NAMES[0]].share(rnd.server.keys_for(NAMES[0]))

    rnd = Round(fed, 10)
    rnd.keys()
    rnd.share(absent=NAMES[6:])
    with pytest.raises(SecAggError, match="only 5 neighbours sent shares; the threshold is 6"):
        rnd.sites[NAMES[0]].receive(rnd.server.shares_for(NAMES[0]))


# --- what the coordinator sees --------------------------------------------------------------------

UNIFORM_WORDS = 200_000
BINS = 256


def _chi2_quantile(dof: int, z: float) -> float:
    """The chi-square quantile for the standard normal quantile z (Wilson-Hilferty, ~0.1% off at 255 dof)."""
    a = 2 / (9 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


Z_ONE_IN_A_MILLION = 4.753424
"""The standard normal quantile 1 - 1e-6: a uniform vector fails a check once in a million runs."""
CHI2_LIMIT = _chi2_quantile(BINS - 1, Z_ONE_IN_A_MILLION)  # 377.2 (scipy: 377.08)


def chi_square(words: np.ndarray, shift: int) -> float:
    """Goodness of fit of byte `shift // 8` of the words to the uniform distribution over 256 values."""
    counts = np.bincount(((words >> np.uint32(shift)) & np.uint32(0xFF)).astype(np.int64), minlength=BINS)
    expected = words.size / BINS
    return float(((counts - expected) ** 2 / expected).sum())


def test_chi_square_limit_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert CHI2_LIMIT == pytest.approx(stats.chi2.ppf(1 - 1e-6, BINS - 1), rel=2e-3)


@pytest.mark.parametrize("update", ["zero", "constant"])
def test_a_masked_input_looks_uniform_and_a_plain_one_does_not(fed: Federation, update: str) -> None:
    n = 5
    rnd = Round(fed, n, length=UNIFORM_WORDS)
    value = 0.0 if update == "zero" else 0.75 * RANGE
    updates = {name: np.full(UNIFORM_WORDS, value) for name in NAMES[:n]}
    shares = {name: 1 / n for name in NAMES[:n]}
    rnd.keys()
    rnd.share()
    rnd.receive()
    seen = {}
    for name in NAMES[:n]:
        seen[name], _ = rnd.sites[name].mask(updates[name], shares[name], RANGE)
        rnd.server.accept_masked(name, seen[name])
    for shift in (24, 0):  # the top byte and the bottom byte
        assert chi_square(seen[NAMES[0]], shift) < CHI2_LIMIT
    plain, _ = quantise(updates[NAMES[0]], shares[NAMES[0]], RANGE, n)
    assert chi_square(plain, 24) > 100 * CHI2_LIMIT
    noisy, _ = quantise(np.random.default_rng(0).uniform(-RANGE, RANGE, UNIFORM_WORDS), 1 / n, RANGE, n)
    assert chi_square(noisy, 24) > 100 * CHI2_LIMIT
    # The words tested are the real input: the round still decodes to the sum.
    rnd.unmask()
    assert np.abs(rnd.decoded() - value).max() <= error_bound(n, RANGE, n) + FLOAT_SLACK


# --- replays --------------------------------------------------------------------------------------

OTHER_CONTEXTS = [Context("run-1", 2, 0), Context("run-1", 1, 1), Context("run-2", 1, 0)]


@pytest.mark.parametrize("other", OTHER_CONTEXTS, ids=["round", "attempt", "run"])
def test_keys_from_another_round_are_refused(fed: Federation, other: Context) -> None:
    first, second = Round(fed, 5), Round(fed, 5, context=other)
    old = first.sites[NAMES[1]].keys()
    with pytest.raises(KeyRejected, match="bad signature"):
        fed.verifier.check(old, other, NAMES[1])
    with pytest.raises(KeyRejected, match="bad signature"):
        second.server.accept_keys(NAMES[1], old)
    second.keys()
    relayed = [old if k.site == NAMES[1] else k for k in second.server.keys_for(NAMES[0])]
    with pytest.raises(KeyRejected, match=f"keys of site {NAMES[1]}: bad signature"):
        second.sites[NAMES[0]].share(relayed)
    second.sites[NAMES[0]].share(second.server.keys_for(NAMES[0]))  # the refusal did not use up the step


def test_shares_from_another_round_are_refused_and_never_revealed(fed: Federation) -> None:
    first, second = Round(fed, 5), Round(fed, 5, context=OTHER_CONTEXTS[0])
    for rnd in (first, second):
        rnd.keys()
        rnd.share()
    sender, recipient = NAMES[0], NAMES[1]
    second.receive(tamper={recipient: {sender: first.server.shares_for(recipient)[sender]}})
    assert second.refused == {name: [sender] if name == recipient else [] for name in NAMES[:5]}
    updates, shares = random_updates(5)
    second.mask(updates, shares)
    second.unmask()
    assert sender not in second.revealed[recipient][0]
    assert sender in second.revealed[NAMES[2]][0]
    assert_weighted_sum(second.decoded(), updates, shares, NAMES[:5], 5)


def test_sealed_shares_are_bound_to_round_sender_and_recipient() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    plaintext = os.urandom(2 * shamir.SHARE_BYTES)
    sealed = seal(agree(a, public_bytes(b)), CONTEXT, "site-00", "site-01", plaintext)
    assert len(sealed) == SEALED_BYTES
    assert open_sealed(agree(b, public_bytes(a)), CONTEXT, "site-00", "site-01", sealed) == plaintext
    for context, sender, recipient in [
        (OTHER_CONTEXTS[0], "site-00", "site-01"),
        (OTHER_CONTEXTS[1], "site-00", "site-01"),
        (CONTEXT, "site-01", "site-00"),  # reflected back
        (CONTEXT, "site-02", "site-01"),  # claimed from someone else
    ]:
        with pytest.raises(SecAggError, match="fail authentication"):
            open_sealed(agree(b, public_bytes(a)), context, sender, recipient, sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(SecAggError, match="fail authentication"):
        open_sealed(agree(b, public_bytes(a)), CONTEXT, "site-00", "site-01", bytes(tampered))


def test_pair_seeds_agree_across_the_pair_and_differ_across_rounds() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    seed = pair_seed(agree(a, public_bytes(b)), CONTEXT, "site-00", "site-01")
    assert pair_seed(agree(b, public_bytes(a)), CONTEXT, "site-01", "site-00") == seed
    assert all(pair_seed(agree(a, public_bytes(b)), c, "site-00", "site-01") != seed for c in OTHER_CONTEXTS)
    assert pair_seed(agree(a, public_bytes(b)), CONTEXT, "site-00", "site-02") != seed
    own = os.urandom(32)
    assert commitment(own, CONTEXT, "site-00") != commitment(own, OTHER_CONTEXTS[0], "site-00")
    assert commitment(own, CONTEXT, "site-00") != commitment(own, CONTEXT, "site-01")
    with pytest.raises(SecAggError, match="not a valid X25519 key"):
        agree(a, bytes(32))  # the all-zero point


def test_server_stages_out_of_order_or_twice_are_refused(fed: Federation) -> None:
    rnd = Round(fed, 5)
    a, b = NAMES[0], NAMES[1]
    server = rnd.server
    with pytest.raises(OutOfOrder):
        server.accept_shares(a, {})
    with pytest.raises(OutOfOrder):
        server.accept_masked(a, np.zeros(LENGTH, np.uint32))
    with pytest.raises(OutOfOrder):
        server.accept_revealed(a, {}, {})
    with pytest.raises(OutOfOrder):
        server.result()
    rnd.keys()
    with pytest.raises(OutOfOrder, match="already sent its keys"):
        server.accept_keys(a, rnd.sites[a].keys())
    sealed = {name: rnd.sites[name].share(server.keys_for(name)) for name in NAMES[:5]}
    for name in NAMES[:5]:
        server.accept_shares(name, sealed[name])
    with pytest.raises(OutOfOrder, match="twice"):
        server.accept_shares(a, sealed[a])
    with pytest.raises(OutOfOrder):
        server.accept_revealed(a, {}, {})
    rnd.receive()
    updates, shares = random_updates(5)
    words = {name: rnd.sites[name].mask(updates[name], shares[name], RANGE)[0] for name in NAMES[:5]}
    for name in NAMES[:4]:
        server.accept_masked(name, words[name])
    with pytest.raises(OutOfOrder, match="twice"):
        server.accept_masked(a, words[a])
    with pytest.raises(OutOfOrder, match="after masked inputs began"):
        server.accept_shares(NAMES[4], sealed[NAMES[4]])
    with pytest.raises(OutOfOrder):
        server.result()
    survivors, dropped = server.start_unmask(3)
    with pytest.raises(OutOfOrder, match="after unmasking began"):
        server.accept_masked(NAMES[4], words[NAMES[4]])  # a late input cannot join once the lists are out
    assert (survivors, dropped) == (list(NAMES[:4]), [NAMES[4]])
    with pytest.raises(OutOfOrder, match="has begun already"):
        server.start_unmask(3)  # the lists go out once
    revealed = rnd.sites[a].unmask(survivors, dropped)
    server.accept_revealed(a, *revealed)
    with pytest.raises(OutOfOrder, match="twice"):
        server.accept_revealed(a, *revealed)
    with pytest.raises(SecAggError, match="not asked for"):
        server.accept_revealed(b, {NAMES[4]: bytes(shamir.SHARE_BYTES)}, {})  # a seed share of a dropped site


def test_site_steps_out_of_order_or_twice_are_refused(fed: Federation) -> None:
    rnd = Round(fed, 5)
    site = rnd.sites[NAMES[0]]
    updates, shares = random_updates(5)
    with pytest.raises(OutOfOrder):
        site.receive({})
    with pytest.raises(OutOfOrder):
        site.mask(updates[NAMES[0]], shares[NAMES[0]], RANGE)
    with pytest.raises(OutOfOrder):
        site.unmask(NAMES[:5], [])
    rnd.keys()
    rnd.share()
    with pytest.raises(OutOfOrder):
        site.share(rnd.server.keys_for(NAMES[0]))
    rnd.receive()
    with pytest.raises(OutOfOrder):
        site.receive(rnd.server.shares_for(NAMES[0]))
    site.mask(updates[NAMES[0]], shares[NAMES[0]], RANGE)
    with pytest.raises(OutOfOrder):
        site.mask(updates[NAMES[0]], shares[NAMES[0]], RANGE)
    site.unmask(NAMES[:5], [])
    with pytest.raises(OutOfOrder):
        site.unmask(NAMES[:5], [])


# --- substituted keys and certificates ------------------------------------------------------------


def _flipped(value: bytes, at: int) -> bytes:
    changed = bytearray(value)
    changed[at] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize(
    "field", ["cipher_key", "mask_key", "commitment", "signature", "coordinator's own key"]
)
def test_substituted_keys_are_refused(fed: Federation, field: str) -> None:
    rnd = Round(fed, 5)
    rnd.keys()
    victim, neighbour = NAMES[1], NAMES[0]
    genuine = rnd.server.keys[victim]
    if field == "coordinator's own key":
        forged = replace(genuine, mask_key=public_bytes(X25519PrivateKey.generate()))
    else:
        forged = replace(genuine, **{field: _flipped(getattr(genuine, field), -1)})
    relayed = [forged if k.site == victim else k for k in rnd.server.keys_for(neighbour)]
    with pytest.raises(KeyRejected, match=f"keys of site {victim}: bad signature"):
        rnd.sites[neighbour].share(relayed)
    with pytest.raises(KeyRejected, match="bad signature"):
        ServerRound(rnd.setup, fed.verifier, LENGTH).accept_keys(victim, forged)


def _signer(authority: Authority, name: str, role: str = ROLE_SITE, **validity: datetime) -> Signer:
    cert, key = issue(authority, name, role, ["localhost"], **validity)  # type: ignore[arg-type]
    return Signer(cert_pem(cert), key_pem(key))


@pytest.mark.parametrize("kind", ["another CA", "expired", "not yet valid", "coordinator", "another site"])
def test_keys_under_a_certificate_that_does_not_check_out_are_refused(fed: Federation, kind: str) -> None:
    name = NAMES[1]
    now = datetime.now(UTC)
    signer, reason = {
        "another CA": lambda: (_signer(new_authority(), name), "not one the federation's CA issued"),
        "expired": lambda: (
            _signer(
                fed.authority, name, not_before=now - timedelta(days=10), not_after=now - timedelta(days=1)
            ),
            "not valid now",
        ),
        "not yet valid": lambda: (
            _signer(
                fed.authority, name, not_before=now + timedelta(days=1), not_after=now + timedelta(days=10)
            ),
            "not valid now",
        ),
        "coordinator": lambda: (
            _signer(fed.authority, name, ROLE_COORDINATOR),
            f"the certificate is '?coordinator'? '?{name}",
        ),
        "another site": lambda: (fed.signers[NAMES[2]], f"the certificate is '?site'? '?{NAMES[2]}"),
    }[kind]()
    rnd = Round(fed, 5)
    rnd.sites[name] = SiteRound(rnd.setup, name, signer, fed.verifier)
    keys = rnd.sites[name].keys()
    with pytest.raises(KeyRejected, match=reason):
        fed.verifier.check(keys, CONTEXT, name)
    with pytest.raises(KeyRejected, match=reason):
        rnd.server.accept_keys(name, keys)
    rnd.keys(absent=[name])
    with pytest.raises(KeyRejected, match=reason):
        rnd.sites[NAMES[0]].share([*rnd.server.keys_for(NAMES[0]), keys])


def test_signed_keys_that_are_low_order_points_are_refused_before_any_site_uses_them(fed: Federation) -> None:
    """A site could sign a key every agreement with which is zero; the coordinator refuses it at the keys stage."""
    setup = Setup(CONTEXT, NAMES[:3], 2, 2)
    signer = fed.signers[NAMES[0]]
    honest = SiteRound(setup, NAMES[0], signer, fed.verifier).keys()
    unsigned = replace(honest, cipher_key=bytes(32), signature=b"")
    forged = replace(unsigned, signature=signer.sign(unsigned.message(CONTEXT)))
    fed.verifier.check(forged, CONTEXT, NAMES[0])  # the signature itself is good
    with pytest.raises(SecAggError, match="not a usable X25519 key"):
        ServerRound(setup, fed.verifier, LENGTH).accept_keys(NAMES[0], forged)


def test_keys_offered_under_another_sites_name_are_refused(fed: Federation) -> None:
    rnd = Round(fed, 5)
    rnd.keys()
    genuine = rnd.server.keys[NAMES[2]]
    with pytest.raises(SecAggError, match=f"keys are for site '?{NAMES[2]}'?, expected {NAMES[1]}"):
        ServerRound(rnd.setup, fed.verifier, LENGTH).accept_keys(NAMES[1], genuine)
    relabelled = replace(genuine, site=NAMES[1])
    with pytest.raises(KeyRejected):
        fed.verifier.check(relabelled, CONTEXT, NAMES[1])
    relayed = [relabelled if k.site == NAMES[1] else k for k in rnd.server.keys_for(NAMES[0])]
    with pytest.raises(KeyRejected):
        rnd.sites[NAMES[0]].share(relayed)
    twice = [*rnd.server.keys_for(NAMES[0]), genuine]
    with pytest.raises(SecAggError, match="distinct neighbours"):
        rnd.sites[NAMES[0]].share(twice)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mask_key": bytes(31)}, "must be 32 bytes"),
        ({"commitment": bytes(33)}, "must be 32 bytes"),
        ("same keys", "must differ"),
        ({"signature": b""}, "missing or too long"),
        ({"signature": bytes(81)}, "missing or too long"),
        ({"certificate": b"x" * 8193}, "missing or too long"),
        (
            {"certificate": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"},
            "not one the federation's CA",
        ),
    ],
)
def test_malformed_keys_are_refused(fed: Federation, change: dict[str, bytes] | str, reason: str) -> None:
    keys = Round(fed, 3).sites[NAMES[0]].keys()
    bad = replace(keys, mask_key=keys.cipher_key) if change == "same keys" else replace(keys, **change)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match=reason):
        fed.verifier.check(bad, CONTEXT, NAMES[0])


# --- bad shares -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flipped", "truncated", "another sender's"])
def test_a_ciphertext_tampered_in_transit_is_refused_and_the_round_completes(
    fed: Federation, how: str
) -> None:
    n = 10
    rnd = Round(fed, n)
    rnd.keys()
    rnd.share()
    sender, recipient = NAMES[0], NAMES[1]
    genuine = rnd.server.shares_for(recipient)
    bad = {
        "flipped": lambda: _flipped(genuine[sender], 40),
        "truncated": lambda: genuine[sender][:-1],
        "another sender's": lambda: genuine[NAMES[2]],
    }[how]()
    rnd.receive(tamper={recipient: {sender: bad}})
    assert rnd.refused[recipient] == [sender]
    assert all(rnd.refused[p] == [] for p in NAMES[:n] if p != recipient)
    updates, shares = random_updates(n, seed=7)
    rnd.mask(updates, shares, absent=[NAMES[5]])
    survivors, _ = rnd.unmask()
    assert sender not in rnd.revealed[recipient][0]
    assert_weighted_sum(rnd.decoded(), updates, shares, survivors, n)


def test_too_many_tampered_ciphertexts_fail_the_round_naming_the_sender(fed: Federation) -> None:
    rnd = Round(fed, 5)  # complete graph, t = 3 of 4
    rnd.keys()
    rnd.share()
    sender = NAMES[2]
    rnd.receive(tamper={p: {sender: _flipped(rnd.server.shares_for(p)[sender], 0)} for p in NAMES[3:5]})
    updates, shares = random_updates(5)
    rnd.mask(updates, shares)
    rnd.unmask()
    with pytest.raises(
        SecAggError, match=f"cannot remove the mask of site {sender}: 2 shares of its self-mask seed"
    ):
        rnd.server.result()


def _lagrange_at_zero(xs: Sequence[int], x: int) -> int:
    numerator, denominator = 1, 1
    for other in xs:
        if other != x:
            numerator = numerator * other % shamir.PRIME
            denominator = denominator * (other - x) % shamir.PRIME
    return numerator * pow(denominator, -1, shamir.PRIME) % shamir.PRIME


def _bad_share(kind: str, shares: Mapping[int, bytes], liar: int, t: int) -> bytes:
    """What a lying site reveals instead of its share at x = `liar`, given the honest ones."""
    if kind == "random":
        return secrets.randbelow(shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")
    if kind == "another secret's":
        return shamir.split(os.urandom(32), sorted(shares), t)[liar]
    # "shifted": with the first t shares the server tries, it interpolates to a valid but wrong
    # 32-byte secret, so only the commitment (or the public key) can tell.
    first = sorted(shares)[:t]
    assert liar in first
    secret = int.from_bytes(shamir.combine({x: shares[x] for x in first}), "big")
    shift = 1 << 128 if secret < 1 << 255 else -(1 << 128)
    y = (
        int.from_bytes(shares[liar], "big") + shift * pow(_lagrange_at_zero(first, liar), -1, shamir.PRIME)
    ) % shamir.PRIME
    return y.to_bytes(shamir.SHARE_BYTES, "big")


def _lie(rnd: Round, victim: str, kind: str, secret: str) -> Callable[[Revealed], None]:
    """Make the revealer of `victim`'s share with the lowest x reveal a bad one instead."""
    which = 0 if secret == "seed" else 1

    def alter(revealed: Revealed) -> None:
        holders = {rnd.setup.x(name): name for name, both in revealed.items() if victim in both[which]}
        shares = {x: revealed[name][which][victim] for x, name in holders.items()}
        liar = min(holders)
        revealed[holders[liar]][which][victim] = _bad_share(kind, shares, liar, rnd.t)

    return alter


def _drop_to_exactly_t(setup: Setup, victim: str, gone: set[str]) -> list[str]:
    """More dropped neighbours of `victim`, still survivable, until exactly t of them remain.

    The neighbours sharing the fewest neighbours with it (the farthest on the ring) go first.
    """
    gone = set(gone)
    mine = setup.graph[victim]
    for p in sorted(setup.participants, key=lambda p: (len(mine & setup.graph[p]), setup.x(p))):
        if len(setup.graph[victim] - gone) == setup.threshold:
            break
        if p in setup.graph[victim] and p not in gone and not short_of_neighbours(setup, gone | {p}):
            gone.add(p)
    assert len(setup.graph[victim] - gone) == setup.threshold
    return [p for p in setup.participants if p in gone]


KINDS = ["random", "another secret's", "shifted"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("secret", ["seed", "key"])
@pytest.mark.parametrize("n", [5, 10, 50])
def test_a_wrong_revealed_share_is_outvoted_when_more_than_t_arrived(
    fed: Federation, n: int, secret: str, kind: str
) -> None:
    rnd = Round(fed, n)
    victim = NAMES[n - 1]  # the liar is its neighbour with the lowest x: in the first subsets tried
    gone = [victim] if secret == "key" else []
    updates, shares = random_updates(n, seed=11)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares, absent=gone)
    survivors, _ = rnd.unmask(_lie(rnd, victim, kind, secret))
    arrived = sum(victim in both[0 if secret == "seed" else 1] for both in rnd.revealed.values())
    assert arrived == len(rnd.setup.graph[victim]) > rnd.t
    assert_weighted_sum(rnd.decoded(), updates, shares, survivors, n)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "secret"), [(5, "seed"), (10, "seed"), (50, "seed"), (50, "key")])
def test_a_wrong_revealed_share_fails_the_round_when_only_t_arrived(
    fed: Federation, n: int, secret: str, kind: str
) -> None:
    rnd = Round(fed, n)
    victim = NAMES[n - 1]
    gone = _drop_to_exactly_t(rnd.setup, victim, {victim} if secret == "key" else set())
    assert not short_of_neighbours(rnd.setup, set(gone))
    updates, shares = random_updates(n, seed=12)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares, absent=gone)
    rnd.unmask(_lie(rnd, victim, kind, secret))
    arrived = sum(victim in both[0 if secret == "seed" else 1] for both in rnd.revealed.values())
    assert arrived == rnd.t
    what = "self-mask seed" if secret == "seed" else "mask key"
    with pytest.raises(
        SecAggError, match=f"cannot remove the mask of site {victim}: its {what} shares do not reconstruct"
    ):
        rnd.server.result()


# --- malformed masked inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["short", "long", "int32", "float64", "two-dimensional"])
def test_a_malformed_masked_input_is_refused_and_its_site_counts_as_dropped(
    fed: Federation, how: str
) -> None:
    n = 10
    rnd = Round(fed, n)
    victim = NAMES[3]
    updates, shares = random_updates(n, seed=13)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares, absent=[victim])
    words, _ = rnd.sites[victim].mask(updates[victim], shares[victim], RANGE)
    bad = {
        "short": lambda: words[:-1],
        "long": lambda: np.append(words, np.uint32(0)),
        "int32": lambda: words.view(np.int32),
        "float64": lambda: words.astype(np.float64),
        "two-dimensional": lambda: words.reshape(1, -1),
    }[how]()
    with pytest.raises(SecAggError, match=f"site {victim} sent"):
        rnd.server.accept_masked(victim, bad)
    survivors, dropped = rnd.unmask()
    assert dropped == [victim] and victim not in survivors
    assert_weighted_sum(rnd.decoded(), updates, shares, survivors, n)


# --- never both shares of one peer ----------------------------------------------------------------


def test_unmask_refuses_overlapping_lists_a_second_call_and_too_few_survivors(fed: Federation) -> None:
    n = 5
    rnd = Round(fed, n)
    names = list(NAMES[:n])
    updates, shares = random_updates(n)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares)
    site = rnd.sites[names[0]]
    with pytest.raises(SecAggError, match="no site in both"):
        site.unmask(names, [names[1]])
    with pytest.raises(SecAggError, match="no site in both"):
        site.unmask([*names, names[1]], [])
    with pytest.raises(SecAggError, match="not a participant"):
        site.unmask(names, ["site-99"])
    with pytest.raises(SecAggError, match="only 2 survivors; at least 3"):
        site.unmask(names[:2], names[2:])
    seeds, keys = site.unmask(names[:3], names[3:])  # refusals used nothing up; this one answers
    assert set(seeds) == {names[1], names[2]} and set(keys) == {names[3], names[4]}
    with pytest.raises(OutOfOrder):
        site.unmask(names, [])


@pytest.mark.parametrize("n", [10, 50])
def test_what_honest_sites_reveal_never_gives_both_secrets_of_a_site(fed: Federation, n: int) -> None:
    """The coordinator tells each site its own story; t > k/2 still keeps one kind below t."""
    rnd = Round(fed, n)
    setup, t = rnd.setup, rnd.t
    updates, shares = random_updates(n)
    rnd.keys()
    rnd.share()
    rnd.receive()
    rnd.mask(updates, shares)
    target = NAMES[0]
    # Half the target's neighbours hear that it survived, the other half that it dropped.
    told_alive = set(sorted(setup.graph[target])[::2])
    rng = random.Random(n)
    seeds_of: Counter[str] = Counter()
    keys_of: Counter[str] = Counter()
    for name in setup.participants:
        others = [p for p in setup.participants if p != target]
        rng.shuffle(others)
        cut = rng.randint(t, len(others))
        alive, gone = others[:cut], others[cut:]
        (alive if name in told_alive else gone).append(target)
        seeds, keys = rnd.sites[name].unmask(alive, gone)
        assert not set(seeds) & set(keys) and set(seeds) | set(keys) <= setup.graph[name]
        seeds_of.update(list(seeds))
        keys_of.update(list(keys))
    assert (seeds_of[target], keys_of[target]) == (
        len(told_alive),
        len(setup.graph[target]) - len(told_alive),
    )
    for p in setup.participants:
        degree = len(setup.graph[p])
        assert t > degree / 2
        assert seeds_of[p] + keys_of[p] <= degree
        assert seeds_of[p] < t or keys_of[p] < t


# --- Shamir ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("points", "t"), [(5, 3), (7, 4), (9, 9), (4, 1)])
def test_any_t_shares_recover_the_secret_and_t_minus_one_do_not(points: int, t: int) -> None:
    secret = os.urandom(shamir.SECRET_BYTES)
    xs = [3 * i + 1 for i in range(points)]
    shares = shamir.split(secret, xs, t)
    assert set(shares) == set(xs)
    assert all(
        len(s) == shamir.SHARE_BYTES and int.from_bytes(s, "big") < shamir.PRIME for s in shares.values()
    )
    for subset in itertools.combinations(xs, t):
        assert shamir.combine({x: shares[x] for x in subset}) == secret
    assert shamir.combine(shares) == secret  # more than t consistent shares also interpolate to it
    for subset in itertools.combinations(xs, t - 1) if t > 1 else ():
        try:
            assert shamir.combine({x: shares[x] for x in subset}) != secret
        except SecAggError:
            pass
    if t > 1:
        assert shamir.split(secret, xs, t) != shares  # fresh coefficients each time


def test_shamir_refuses_bad_parameters_and_malformed_shares() -> None:
    secret = os.urandom(32)
    for args, reason in [
        ((secret[:31], [1, 2, 3], 2), "a secret is 32 bytes"),
        ((secret, [1, 2, 3], 0), "threshold 0 is outside"),
        ((secret, [1, 2, 3], 4), "threshold 4 is outside"),
        ((secret, [1, 1, 2], 2), "distinct"),
        ((secret, [0, 1, 2], 2), "distinct and in 1..p-1"),
        ((secret, [1, 2, shamir.PRIME], 2), "distinct and in 1..p-1"),
    ]:
        with pytest.raises(SecAggError, match=reason):
            shamir.split(*args)  # type: ignore[arg-type]
    with pytest.raises(SecAggError, match="no shares"):
        shamir.combine({})
    with pytest.raises(SecAggError, match="malformed"):
        shamir.combine({1: bytes(65)})
    with pytest.raises(SecAggError, match="malformed"):
        shamir.combine({0: bytes(66)})
    with pytest.raises(SecAggError, match="outside the field"):
        shamir.combine({1: shamir.PRIME.to_bytes(66, "big")})


# --- the graph ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(3, 2), (5, 4), (10, 9), (11, 4), (50, 18), (101, 20), (20, 100)])
def test_the_graph_is_symmetric_and_regular(n: int, k: int) -> None:
    names = [f"s{i}" for i in range(n)]
    seed = graph.graph_seed("run", 1, 0, names)
    g = graph.neighbours(names, k, seed)
    assert set(g) == set(names)
    for p, ns in g.items():
        assert len(ns) == min(k, n - 1) and p not in ns and ns <= set(names)
        assert all(p in g[q] for q in ns)
        assert graph.neighbours_of(names, k, seed, p) == ns  # what a site computes of it alone
    assert graph.neighbours(names, k, seed) == g
    if k < n - 1:
        assert graph.neighbours(names, k, graph.graph_seed("run", 2, 0, names)) != g


def test_the_graph_seed_depends_on_everything_that_fixes_the_round() -> None:
    names = ["a", "b", "c"]
    seed = graph.graph_seed("run", 1, 0, names)
    others = [
        graph.graph_seed("run2", 1, 0, names),
        graph.graph_seed("run", 2, 0, names),
        graph.graph_seed("run", 1, 1, names),
        graph.graph_seed("run", 1, 0, ["b", "a", "c"]),
        graph.graph_seed("run", 1, 0, ["a", "b"]),
        graph.graph_seed("run", 1, 0, ["ab", "c"]),  # no ambiguity from joining the parts
    ]
    assert len({seed, *others}) == len(others) + 1
    assert graph.graph_seed("run", 1, 0, names) == seed


def test_default_parameters() -> None:
    assert [graph.default_neighbours(n) for n in (3, 5, 10, 11, 50, 100, 1000)] == [2, 4, 9, 10, 18, 20, 30]
    for k in range(1, 200):
        t = graph.default_threshold(k)
        assert k / 2 < t <= k and t >= math.ceil(2 * k / 3)
    for n in range(3, MAX_PARTICIPANTS + 1, 7):
        k = graph.default_neighbours(n)
        graph.check_params(n, k, graph.default_threshold(min(k, n - 1)))


@pytest.mark.parametrize(
    ("n", "k", "t", "reason"),
    [
        (2, 1, 1, "at least 3 sites"),
        (50, 0, 1, "neighbours must be positive"),
        (50, 17, 12, "must be even"),
        (50, 18, 9, "more than half"),
        (50, 18, 19, "at most all"),
        (5, 10, 2, "more than half the 4 neighbours"),
    ],
)
def test_check_params_refuses(n: int, k: int, t: int, reason: str) -> None:
    with pytest.raises(SecAggError, match=reason):
        graph.check_params(n, k, t)


def test_check_params_accepts_an_odd_complete_graph() -> None:
    graph.check_params(10, 9, 6)
    graph.check_params(10, 15, 5)


def test_setup_refuses_bad_participant_lists() -> None:
    with pytest.raises(SecAggError, match="distinct"):
        Setup(CONTEXT, ("a", "b", "a"), 2, 2)
    with pytest.raises(SecAggError, match="participant list"):
        Setup(CONTEXT, ("a", "b", "../c"), 2, 2)
    with pytest.raises(SecAggError, match="at most"):
        Setup(CONTEXT, tuple(f"s{i}" for i in range(MAX_PARTICIPANTS + 1)), 20, 14)
    with pytest.raises(SecAggError, match="at least 3"):
        Setup(CONTEXT, ("a", "b"), 1, 1)
    with pytest.raises(SecAggError, match="not a participant"):
        Setup(CONTEXT, ("a", "b", "c"), 2, 2).check_site("d")


# --- quantisation ---------------------------------------------------------------------------------


def test_values_beyond_the_range_are_clipped_and_counted() -> None:
    n, w = 10, 0.3
    x = np.array([-3 * RANGE, -RANGE, -0.5, 0.0, 0.5, RANGE, 2 * RANGE, np.inf, -np.inf])
    words, clipped = quantise(x, w, RANGE, n)
    assert clipped == 4
    assert words.dtype == np.uint32 and words.shape == x.shape
    expected = w * np.clip(x, -RANGE, RANGE)
    assert np.abs(dequantise(words, RANGE, n) - expected).max() <= error_bound(1, RANGE, n) + FLOAT_SLACK


def test_quantise_refuses_bad_weight_shares_and_nan() -> None:
    for share in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="weight share"):
            quantise(np.zeros(3), share, RANGE, 3)
    # A NaN is no value to clip: it would become -2^31 and silently wreck the sum.
    with pytest.raises(SecAggError, match="NaN"):
        quantise(np.array([0.0, np.nan, 1.0]), 0.5, RANGE, 3)


def test_a_site_whose_update_has_nan_cannot_mask_and_is_dropped(fed: Federation) -> None:
    n = 10
    rnd = Round(fed, n)
    victim = NAMES[2]
    updates, shares = random_updates(n, seed=6)
    updates[victim][5] = np.nan
    rnd.keys()
    rnd.share()
    rnd.receive()
    with pytest.raises(SecAggError, match="1 NaN"):
        rnd.sites[victim].mask(updates[victim], shares[victim], RANGE)
    rnd.mask(updates, shares, absent=[victim])
    survivors, dropped = rnd.unmask()
    assert dropped == [victim]
    assert_weighted_sum(rnd.decoded(), updates, shares, survivors, n)


def test_the_error_bound_holds_for_many_random_sums() -> None:
    rng = np.random.default_rng(2024)
    for _ in range(200):
        n = int(rng.integers(3, 1025))
        summed = int(rng.integers(1, min(n, 60) + 1))
        clip_range = float(rng.choice([1e-3, 0.1, 1.0, RANGE, 1e3]))
        weights = rng.integers(1, 10**6, n).astype(np.float64)
        shares = weights[:summed] / weights.sum()
        x = rng.uniform(-clip_range, clip_range, (summed, 64))
        total = np.zeros(64, np.uint32)
        for i in range(summed):
            total += quantise(x[i], float(shares[i]), clip_range, n)[0]
        expected = (shares[:, None] * x).sum(axis=0)
        error = np.abs(dequantise(total, clip_range, n) - expected).max()
        assert error <= error_bound(summed, clip_range, n) + FLOAT_SLACK * clip_range


@pytest.mark.parametrize("n", [3, 50, MAX_PARTICIPANTS])
@pytest.mark.parametrize("sign", [1, -1])
def test_the_largest_sum_does_not_overflow(n: int, sign: int) -> None:
    rng = np.random.default_rng(n)
    weights = rng.integers(1, 10**6, n).astype(np.float64)
    shares = weights / weights.sum()
    x = np.full(8, sign * RANGE)
    parts = [quantise(x, float(s), RANGE, n)[0] for s in shares]
    exact = np.sum([p.view(np.int32).astype(np.int64) for p in parts], axis=0)
    assert np.abs(exact).max() < 2**31
    total = np.zeros(8, np.uint32)
    for p in parts:
        total += p
    assert np.array_equal(total.view(np.int32).astype(np.int64), exact)  # no wrap-around
    assert np.abs(dequantise(total, RANGE, n) - sign * RANGE).max() <= error_bound(n, RANGE, n) + FLOAT_SLACK
    single = quantise(x, 1.0, RANGE, n)[0].view(np.int32)
    assert np.array_equal(single, np.full(8, sign * levels(n), np.int32))


def test_the_largest_sum_survives_masking(fed: Federation) -> None:
    n = 10
    updates, shares = random_updates(n, seed=5)
    updates = {name: np.where(np.arange(LENGTH) % 2 == 0, RANGE, -RANGE) for name in updates}
    decoded = Round(fed, n).run(updates, shares)
    assert_weighted_sum(decoded, updates, shares, NAMES[:n], n)
    assert np.abs(np.abs(decoded) - RANGE).max() <= error_bound(n, RANGE, n) + FLOAT_SLACK


def test_mask_streams_are_fixed_by_their_seed() -> None:
    seed = os.urandom(32)
    words = stream(seed, 1000)
    assert words.dtype == np.dtype("<u4") and np.array_equal(stream(seed, 1000), words)
    assert np.array_equal(stream(seed, 10), words[:10])
    assert not np.array_equal(stream(os.urandom(32), 1000), words)


# --- protobuf conversions -------------------------------------------------------------------------


def test_keys_survive_the_wire_and_still_verify(fed: Federation) -> None:
    keys = Round(fed, 3).sites[NAMES[0]].keys()
    wire = trainer_pb2.SignedKeys.FromString(messages.keys_to_message(keys).SerializeToString())
    back = messages.keys_from_message(wire)
    assert back == keys
    fed.verifier.check(back, CONTEXT, NAMES[0])
    assert messages.context_of(messages.round_of(CONTEXT)) == CONTEXT


def test_share_lists_are_bounded_and_checked() -> None:
    sealed = {"site-00": b"a", "site-01": b"b"}
    assert messages.by_site(messages.sealed_list(sealed), "shares") == sealed
    assert messages.by_site(messages.revealed_list(sealed), "seed shares") == sealed
    with pytest.raises(SecAggError, match="appears twice"):
        messages.by_site([*messages.sealed_list(sealed), *messages.sealed_list({"site-00": b"c"})], "shares")
    with pytest.raises(SecAggError, match="malformed site name"):
        messages.by_site(messages.sealed_list({"../x": b"a"}), "shares")
    many = messages.revealed_list({f"s{i}": b"" for i in range(MAX_PARTICIPANTS + 1)})
    with pytest.raises(SecAggError, match="at most"):
        messages.by_site(many, "key shares")
    with pytest.raises(SecAggError, match="at most"):
        messages.names([f"s{i}" for i in range(MAX_PARTICIPANTS + 1)], "survivors")
    assert messages.names(["a", "b"], "survivors") == ["a", "b"]
