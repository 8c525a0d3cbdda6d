"""The errors of the secure-aggregation modules; each names what failed."""


class SecAggError(ValueError):
    """Secure-aggregation input that does not check out, or a round that cannot be completed."""


class OutOfOrder(SecAggError):
    """A step taken out of turn: before the one it needs, twice, or for a round that is closed (a replay)."""


class KeyRejected(SecAggError):
    """Signed keys whose certificate or signature does not check out: someone substituted them."""
