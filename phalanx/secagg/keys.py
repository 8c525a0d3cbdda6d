"""The round's keys: signed public keys, certificate checks, share encryption and pairwise seeds.

A site signs (run, round, attempt, its name, both public keys, its seed commitment) with the key
of its TLS certificate, so the coordinator, which relays the keys, cannot swap them. Everyone
checks a signature against the certificate sent with it, and that certificate against the
federation's CA: issued by it, valid now, role site, and the name the keys are for.

Shares travel encrypted with ChaCha20-Poly1305 under a key derived by HKDF-SHA256 from the two
sites' X25519 agreement, bound to the round and to sender and recipient (each direction has its
own key), so the coordinator can neither read nor redirect nor replay them into another round.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from phalanx.identity import identity_of, printable
from phalanx.pki import ROLE_SITE
from phalanx.secagg.errors import KeyRejected, SecAggError

KEY_BYTES = 32
MAX_SIGNATURE_BYTES = 80  # DER ECDSA P-256 is at most 72
MAX_CERTIFICATE_BYTES = 8192
_NONCE = bytes(12)  # every share key encrypts one message


@dataclass(frozen=True)
class Context:
    """What every signature, key derivation and ciphertext of one round is bound to."""

    run_id: str
    round: int
    attempt: int

    def encode(self, *parts: str | bytes) -> bytes:
        fields = [self.run_id.encode(), str(self.round).encode(), str(self.attempt).encode()]
        fields += [p.encode() if isinstance(p, str) else p for p in parts]
        return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


@dataclass(frozen=True)
class SignedKeys:
    """A site's public keys for one round, as it signed them."""

    site: str
    cipher_key: bytes
    mask_key: bytes
    commitment: bytes
    """SHA-256 of the site's self-mask seed: lets the coordinator check the seed it recovers."""
    signature: bytes
    certificate: bytes
    """The site's certificate (PEM)."""

    def message(self, context: Context) -> bytes:
        return context.encode(
            b"phalanx-secagg-keys-v1", self.site, self.cipher_key, self.mask_key, self.commitment
        )


def commitment(seed: bytes, context: Context, site: str) -> bytes:
    return hashlib.sha256(context.encode(b"phalanx-secagg-seed-v1", site, seed)).digest()


class Signer:
    """Signs with this site's certificate key (PEM), and sends the certificate along."""

    def __init__(self, certificate: bytes, key: bytes) -> None:
        private = serialization.load_pem_private_key(key, password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise SecAggError("secure aggregation signs with an EC certificate key")
        self.certificate = certificate
        self._key = private

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


class Verifier:
    """Checks signed keys against their certificate and the certificate against the CA (PEM)."""

    def __init__(self, ca: bytes) -> None:
        self._ca = x509.load_pem_x509_certificate(ca)
        # The same certificates come every round: their chain is checked once (failures are not kept).
        self._issued = functools.lru_cache(maxsize=4096)(self._load_issued)

    def check(self, keys: SignedKeys, context: Context, site: str) -> None:
        """Raise SecAggError unless `keys` are `site`'s, for this round, signed by its certificate."""
        if keys.site != site:
            raise SecAggError(f"keys are for site {printable(keys.site)}, expected {site}")
        if (
            len(keys.cipher_key) != KEY_BYTES
            or len(keys.mask_key) != KEY_BYTES
            or len(keys.commitment) != KEY_BYTES
        ):
            raise SecAggError(
                f"keys of site {site}: public keys and commitment must be {KEY_BYTES} bytes each"
            )
        if keys.cipher_key == keys.mask_key:
            raise SecAggError(f"keys of site {site}: the two public keys must differ")
        if (
            not 0 < len(keys.signature) <= MAX_SIGNATURE_BYTES
            or not 0 < len(keys.certificate) <= MAX_CERTIFICATE_BYTES
        ):
            raise SecAggError(f"keys of site {site}: signature or certificate missing or too long")
        try:
            cert = self._issued(keys.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise KeyRejected(
                f"keys of site {site}: the certificate is not one the federation's CA issued"
            ) from None
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise KeyRejected(f"keys of site {site}: the certificate is not valid now")
        identity = identity_of(keys.certificate)
        if identity.role != ROLE_SITE or identity.name != site:
            raise KeyRejected(
                f"keys of site {site}: the certificate is {printable(identity.role)} {printable(identity.name)}"
            )
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyRejected(f"keys of site {site}: the certificate key is not an EC key")
        try:
            public.verify(keys.signature, keys.message(context), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise KeyRejected(
                f"keys of site {site}: bad signature (not signed by its certificate for this round)"
            ) from None

    def _load_issued(self, pem: bytes) -> x509.Certificate:
        cert = x509.load_pem_x509_certificate(pem)
        cert.verify_directly_issued_by(self._ca)
        return cert


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 agreement of `private` with a peer's public key (raw: only ever fed to HKDF here)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError("a peer's public key is not a valid X25519 key") from None


def check_points(keys: SignedKeys) -> None:
    """Raise SecAggError if a public key is a low-order point (every agreement with it would be zero),
    so that a site cannot hand its neighbours keys they would all fail on."""
    probe = X25519PrivateKey.generate()
    for key in (keys.cipher_key, keys.mask_key):
        try:
            agree(probe, key)
        except SecAggError:
            raise SecAggError(f"keys of site {keys.site}: a public key is not a usable X25519 key") from None


def _derive(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pair_seed(shared: bytes, context: Context, a: str, b: str) -> bytes:
    """The mask seed two sites agree on (the same from either side: `a` and `b` are sorted)."""
    first, second = sorted((a, b))
    return _derive(shared, context.encode(b"phalanx-secagg-mask-v1", first, second))


def _share_cipher(shared: bytes, context: Context, sender: str, recipient: str) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_derive(shared, context.encode(b"phalanx-secagg-share-v1", sender, recipient)))


def seal(shared: bytes, context: Context, sender: str, recipient: str, plaintext: bytes) -> bytes:
    """Encrypt `plaintext` from `sender` to `recipient` under their agreement `shared`."""
    return _share_cipher(shared, context, sender, recipient).encrypt(_NONCE, plaintext, context.encode(sender, recipient))


def open_sealed(shared: bytes, context: Context, sender: str, recipient: str, ciphertext: bytes) -> bytes:
    try:
        return _share_cipher(shared, context, sender, recipient).decrypt(
            _NONCE, ciphertext, context.encode(sender, recipient)
        )
    except InvalidTag:
        raise SecAggError(
            f"shares from site {sender} fail authentication (tampered, misdirected or from another round)"
        ) from None
