"""SecAgg keys bound to enrolled devices: what a device signs, and how it verifies its peers.

An enrolled device holds, in its own node config (a server cannot set node config), the paths of
its node private key (`SIGNING_KEY`), the X.509 certificate the operator's offline enrollment CA
issued for that key (`CERTIFICATE`), and the enrollment CA's certificate (`ENROLLMENT_CA`). At
advertise-keys it signs (round id, its node id, pk-c, pk-s) with ECDSA-SHA384; at share-keys it
refuses the round unless every peer's certificate was issued by its enrollment CA, is valid now,
is no other peer's nor its own, and signed that peer's keys for this round. So a server that
swaps keys or invents peers is refused before any share leaves the device. Everything is read
from the files each round: no state outlives the round.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.secagg import protocol as p
from shared.secagg.crypto import LABEL, ROUND_ID_BYTES
from shared.secagg.settings import (
    CERTIFICATE,
    ENROLLMENT_CA,
    ENROLLMENT_KEYS,
    SIGNING_KEY,
    SecAggError,
    SecAggUnverifiedPeer,
)

_SIGNED_KEYS = LABEL + b"advertise-keys-signature\x00"  # domain separation: nothing else is signed so
_KEY_BYTES = 32
_ALGORITHM = ec.ECDSA(hashes.SHA384())
T = TypeVar("T")


@dataclass(frozen=True)
class Enrollment:
    """A device's enrollment, loaded from its node config for one stage."""

    signing_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca: x509.Certificate


def load_enrollment(node_config: Mapping[str, object]) -> Enrollment | None:
    """The device's enrollment, or None when its node config names none of the three files."""
    given = [key for key in ENROLLMENT_KEYS if key in node_config]
    if not given:
        return None
    if len(given) < len(ENROLLMENT_KEYS):
        missing = ", ".join(key for key in ENROLLMENT_KEYS if key not in given)
        raise SecAggError(f"enrollment: node config sets {', '.join(given)} but not {missing}")
    key = _load(node_config[SIGNING_KEY], "signing key", lambda data: serialization.load_ssh_private_key(data, None))
    certificate = _load(node_config[CERTIFICATE], "certificate", x509.load_pem_x509_certificate)
    ca = _load(node_config[ENROLLMENT_CA], "enrollment CA", x509.load_pem_x509_certificate)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SecAggError("enrollment: the signing key must be an EC node key (fedclient keygen)")
    if certificate.public_key() != key.public_key():
        raise SecAggError("enrollment: the certificate is not for this device's signing key")
    try:
        _check_issued(ca, certificate, _now())
    except _Refused as err:
        raise SecAggError(f"enrollment: this device's certificate {err}") from None
    return Enrollment(key, certificate, ca)


def sign_keys(enrollment: Enrollment, round_id: bytes, node: int, pk_c: bytes, pk_s: bytes) -> dict[str, bytes]:
    """The advertise-keys reply entries of an enrolled device: its certificate and signature."""
    signature = enrollment.signing_key.sign(signed_keys(round_id, node, pk_c, pk_s), _ALGORITHM)
    return {p.CERTIFICATE: enrollment.certificate.public_bytes(serialization.Encoding.DER), p.SIGNATURE: signature}


def signed_keys(round_id: bytes, node: int, pk_c: bytes, pk_s: bytes) -> bytes:
    """The signed message: a label, then fixed-length fields (16 + 8 + 32 + 32 bytes)."""
    fields = (round_id, pk_c, pk_s)
    lengths = (ROUND_ID_BYTES, _KEY_BYTES, _KEY_BYTES)
    if not all(isinstance(f, bytes) for f in fields) or tuple(map(len, fields)) != lengths:
        raise ValueError("a round id of 16 bytes and two 32-byte keys are signed")
    if not isinstance(node, int) or not 0 <= node < 1 << 64:
        raise ValueError(f"node id {node!r} is not a 64-bit unsigned integer")
    return _SIGNED_KEYS + round_id + struct.pack(">Q", node) + pk_c + pk_s


def verify_peers(
    enrollment: Enrollment,
    round_id: bytes,
    peers: Sequence[int],
    keys: Sequence[tuple[bytes, bytes]],
    credentials: Sequence[tuple[object, object]],
) -> None:
    """Raise SecAggUnverifiedPeer unless every peer is a distinct enrolled device that signed its keys.

    `keys` and `credentials` ((certificate DER, signature) each) are parallel to `peers`.
    """
    if not len(peers) == len(keys) == len(credentials):
        raise SecAggUnverifiedPeer("share-keys: peers and their certificates differ in number")
    now = _now()
    seen = {_public_der(enrollment.certificate)}
    for peer, (pk_c, pk_s), (der, signature) in zip(peers, keys, credentials, strict=True):
        try:
            certificate = _peer_certificate(enrollment.ca, der, now)
            if _public_der(certificate) in seen:
                raise _Refused("is another peer's or this device's (one device counted twice)")
            seen.add(_public_der(certificate))
            _check_signature(certificate, signature, round_id, peer, pk_c, pk_s)
        except _Refused as err:
            raise SecAggUnverifiedPeer(f"share-keys: node {peer}'s certificate {err}") from None


def verify_keys(
    ca: x509.Certificate, round_id: bytes, node: int, keys: tuple[bytes, bytes], credentials: tuple[object, object]
) -> None:
    """For a server screening advertise-keys early: raise SecAggUnverifiedPeer unless `node` signed `keys`."""
    der, signature = credentials
    try:
        _check_signature(_peer_certificate(ca, der, _now()), signature, round_id, node, *keys)
    except _Refused as err:
        raise SecAggUnverifiedPeer(f"node {node}'s certificate {err}") from None


class _Refused(Exception):
    """Why a certificate or signature is refused (completes 'node N's certificate ...')."""


def _peer_certificate(ca: x509.Certificate, der: object, now: dt.datetime) -> x509.Certificate:
    if not isinstance(der, bytes) or not der:
        raise _Refused("is missing: its keys are unsigned")
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        raise _Refused("is malformed") from None
    _check_issued(ca, certificate, now)
    return certificate


def _check_issued(ca: x509.Certificate, certificate: x509.Certificate, now: dt.datetime) -> None:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise _Refused("is not issued by the enrollment CA") from None
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise _Refused("is not valid now (expired or not yet valid)")


def _check_signature(
    certificate: x509.Certificate, signature: object, round_id: bytes, peer: int, pk_c: bytes, pk_s: bytes
) -> None:
    public = certificate.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(signature, bytes):
        raise _Refused("holds no EC key, or the signature is not bytes")
    try:
        public.verify(signature, signed_keys(round_id, peer, pk_c, pk_s), _ALGORITHM)
    except (InvalidSignature, ValueError):
        raise _Refused("did not sign these keys for this round and node") from None


def _public_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load(path: object, what: str, parse: Callable[[bytes], T]) -> T:
    try:
        return parse(Path(str(path)).read_bytes())
    except OSError as err:
        raise SecAggError(f"enrollment: cannot read the {what} {path}: {err.strerror}") from None
    except (ValueError, TypeError):
        raise SecAggError(f"enrollment: the {what} {path} is not in the expected format") from None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
