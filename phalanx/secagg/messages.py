"""Secure-aggregation values to and from their protobuf messages (no gRPC here either).

Lists from the network are bounded before they are turned into maps: at most MAX_PARTICIPANTS
entries, names checked, no name twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from phalanx.identity import printable
from phalanx.pki import PkiError, check_site_name
from phalanx.secagg.errors import SecAggError
from phalanx.secagg.keys import Context, SignedKeys
from phalanx.secagg.protocol import MAX_PARTICIPANTS
from phalanx.v1 import trainer_pb2

MASKED_TENSOR = "secagg.masked"
"""The one tensor of a securely aggregated Train reply: the masked words, uint32."""


def context_of(message: trainer_pb2.SecureRound) -> Context:
    return Context(message.run_id, message.round, message.attempt)


def round_of(context: Context) -> trainer_pb2.SecureRound:
    return trainer_pb2.SecureRound(run_id=context.run_id, round=context.round, attempt=context.attempt)


def keys_to_message(keys: SignedKeys) -> trainer_pb2.SignedKeys:
    return trainer_pb2.SignedKeys(
        site=keys.site,
        cipher_public_key=keys.cipher_key,
        mask_public_key=keys.mask_key,
        seed_commitment=keys.commitment,
        signature=keys.signature,
        certificate=keys.certificate,
    )


def keys_from_message(message: trainer_pb2.SignedKeys) -> SignedKeys:
    return SignedKeys(
        site=message.site,
        cipher_key=message.cipher_public_key,
        mask_key=message.mask_public_key,
        commitment=message.seed_commitment,
        signature=message.signature,
        certificate=message.certificate,
    )


def by_site(
    entries: Sequence[trainer_pb2.SealedShares | trainer_pb2.RevealedShare], what: str
) -> dict[str, bytes]:
    """Entries keyed by site name; SecAggError if there are too many, a name is malformed or repeats."""
    if len(entries) > MAX_PARTICIPANTS:
        raise SecAggError(f"{len(entries)} {what}; at most {MAX_PARTICIPANTS}")
    out: dict[str, bytes] = {}
    for entry in entries:
        try:
            check_site_name(entry.site)
        except PkiError:
            raise SecAggError(f"{what}: malformed site name {printable(entry.site)}") from None
        if entry.site in out:
            raise SecAggError(f"{what}: site {entry.site} appears twice")
        out[entry.site] = entry.ciphertext if isinstance(entry, trainer_pb2.SealedShares) else entry.share
    return out


def sealed_list(sealed: Mapping[str, bytes]) -> list[trainer_pb2.SealedShares]:
    return [trainer_pb2.SealedShares(site=site, ciphertext=c) for site, c in sealed.items()]


def revealed_list(shares: Mapping[str, bytes]) -> list[trainer_pb2.RevealedShare]:
    return [trainer_pb2.RevealedShare(site=site, share=s) for site, s in shares.items()]


def names(values: Sequence[str], what: str) -> list[str]:
    """A bounded list of site names from the network."""
    if len(values) > MAX_PARTICIPANTS:
        raise SecAggError(f"{len(values)} {what}; at most {MAX_PARTICIPANTS}")
    return list(values)
