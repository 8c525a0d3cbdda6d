"""Shamir secret sharing of 32-byte secrets over GF(2^521 - 1).

Coefficients come from `secrets` (the operating system's random source). A share is the point
(x, f(x)); x is the holder's position in the round's participant list plus one, never 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from phalanx.secagg.errors import SecAggError

PRIME = 2**521 - 1
"""A Mersenne prime above every 32-byte secret."""
SHARE_BYTES = 66
SECRET_BYTES = 32


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` at the points `xs`: any `threshold` of them recover it, fewer say nothing."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"a secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} is outside 1-{len(xs)} for {len(xs)} shares")
    if len(set(xs)) != len(xs) or not all(0 < x < PRIME for x in xs):
        raise SecAggError("share points must be distinct and in 1..p-1")
    coefficients = [int.from_bytes(secret, "big"), *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes]) -> bytes:
    """The secret the given shares interpolate to at 0 (all of them are used: pass exactly t)."""
    if not shares:
        raise SecAggError("no shares to combine")
    points = []
    for x, share in shares.items():
        if len(share) != SHARE_BYTES or not 0 < x < PRIME:
            raise SecAggError(f"share at x={x} is malformed")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise SecAggError(f"share at x={x} is outside the field")
        points.append((x, y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * xj % PRIME
                denominator = denominator * (xj - xi) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("the shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
