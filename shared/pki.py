"""A small private PKI for a deployment: the CA, the SuperLink's TLS certificate, the SuperNodes'
authentication keys (OpenSSH format, as Flower 1.41 registers and loads them) and the enrollment CA.

The files and who holds each: docs/deploy.md. Everything is done by `cryptography`; no primitive
is written here.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import FlowerbedError
from shared.files import atomic_write_bytes

CA_DAYS = 3650
SERVER_DAYS = 825  # Apple platforms reject TLS server certificates valid for longer
BACKDATE = dt.timedelta(hours=1)  # tolerate clocks that are a little behind the issuer's
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
T = TypeVar("T")


class PkiError(FlowerbedError, ValueError):
    """A PKI directory or argument is unusable; the message is one line meant for the user."""


@dataclass(frozen=True)
class PkiPaths:
    """Where init_pki wrote each file."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_keys: tuple[tuple[Path, Path], ...]  # (private key, public key) per client
    enrollment_ca: Path
    enrollment_ca_key: Path
    client_certificates: tuple[Path, ...]  # each client's enrollment certificate, parallel to client_keys


def init_pki(
    directory: Path,
    hosts: Sequence[str] = (),
    clients: int = 1,
    force: bool = False,
) -> PkiPaths:
    """Create a CA, a server certificate for localhost/127.0.0.1 + `hosts`, and `clients` node keys.

    The CA private key (ca.key, mode 0600) is kept so the server certificate can be re-issued
    later for new hosts without changing ca.pem, which every client already trusts; node keys
    need no CA (see the module docstring) so ``add_client`` works without it. A separate
    enrollment CA (enrollment/) issues each of these clients its enrollment certificate
    (clients/NAME.crt) while its key is here; the operator then moves that key offline.

    Refuses a non-empty `directory` unless `force`; with `force` the files above are replaced and
    every other node key pair in clients/ is deleted (the next `fedserver start` unregisters it),
    so no device keeps a key of the PKI that was replaced.
    """
    directory = Path(directory)
    sans = _subject_alt_names(hosts)
    if clients < 0:
        raise PkiError(f"--clients must be >= 0, got {clients}")
    _check_can_write(directory, force)
    _remove_node_keys(directory / "clients")

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key)
    enrollment_key = ec.generate_private_key(ec.SECP384R1())
    enrollment_ca = _ca_certificate(enrollment_key, ENROLLMENT_CA_NAME)
    server_key = ec.generate_private_key(ec.SECP256R1())  # signs every TLS handshake: P-256, the cheaper curve
    server_cert = _server_certificate(server_key, ca_cert, ca_key, sans)

    paths = PkiPaths(
        ca=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_keys=tuple(_client_paths(directory, f"client-{k}") for k in range(1, clients + 1)),
        enrollment_ca=directory / ENROLLMENT_DIR / "enrollment-ca.pem",
        enrollment_ca_key=directory / ENROLLMENT_DIR / "enrollment-ca.key",
        client_certificates=tuple(directory / "clients" / f"client-{k}.crt" for k in range(1, clients + 1)),
    )
    _write(paths.ca_key, _pem_private(ca_key), PRIVATE_MODE)
    _write(paths.ca, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write(paths.server_key, _pem_private(server_key), PRIVATE_MODE)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write(paths.enrollment_ca_key, _pem_private(enrollment_key), PRIVATE_MODE)
    _write(paths.enrollment_ca, enrollment_ca.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    for (key_path, pub_path), certificate in zip(paths.client_keys, paths.client_certificates, strict=True):
        _write_node_key_pair(key_path, pub_path)
        _write_enrollment(pub_path, certificate, enrollment_ca, enrollment_key)
    return paths


def add_client(directory: Path, name: str) -> tuple[Path, Path]:
    """Add the node key pair clients/NAME.key and clients/NAME.pub to an initialised PKI."""
    directory = Path(directory)
    _check_client_name(name)
    _check_initialised(directory)
    return make_node_key_pair(directory / "clients", name)


def make_node_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write a node key pair NAME.key (0600) and NAME.pub in `directory`; returns their paths.

    What `fedclient keygen` runs on a device, so the private key never leaves it: only NAME.pub
    goes to the server's PKI (clients/NAME.pub). Never replaces a file: a key is a node's identity.
    """
    directory = Path(directory)
    _check_client_name(name)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    existing = [p.name for p in (key_path, pub_path) if p.exists()]
    if existing:
        raise PkiError(f"client {name!r} already exists in {directory} ({', '.join(existing)})")
    _write_node_key_pair(key_path, pub_path)
    return key_path, pub_path


def remove_client(directory: Path, name: str) -> list[Path]:
    """Delete clients/NAME.key, .pub and .crt (whichever exist); the paths deleted.

    The enrollment certificate stays valid wherever a copy is (no revocation list): with the node
    key unregistered the device cannot join, so only a server that relays it could use it.
    """
    directory = Path(directory)
    _check_client_name(name)
    _check_initialised(directory)
    certificate = directory / "clients" / f"{name}.crt"
    existing = [path for path in (*_client_paths(directory, name), certificate) if path.exists()]
    if not existing:
        raise PkiError(f"no client {name!r} in {directory / 'clients'}")
    for path in existing:
        path.unlink()
    return existing


def _remove_node_keys(clients: Path) -> None:
    for path in (*clients.glob("*.key"), *clients.glob("*.pub"), *clients.glob("*.crt")):
        path.unlink()


# --- checks ------------------------------------------------------------------------------


def _check_can_write(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise PkiError(f"{directory} is not empty; pass --force to overwrite the PKI in it")


def _check_initialised(directory: Path) -> None:
    if not directory.is_dir():
        raise PkiError(f"{directory} is not a PKI directory (run 'fedserver init {directory}' first)")
    missing = [n for n in ("ca.pem", "ca.key") if not (directory / n).is_file()]
    if missing:
        raise PkiError(f"{directory} is not an initialised PKI: missing {', '.join(missing)}")


def _check_client_name(name: str) -> None:
    """Names become file names: allow only [A-Za-z0-9_.-], and no leading dot (hidden/temp files)."""
    if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise PkiError(f"invalid client name {name!r}: use letters, digits, '_', '-', '.' (not first)")


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """localhost and 127.0.0.1 first, then `hosts`; an IP literal becomes an IPAddress SAN."""
    sans: list[x509.GeneralName] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        san = _general_name(host)
        if san not in sans:
            sans.append(san)
    return sans


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or not host.isascii() or any(c.isspace() or c in "/:@[]" for c in host):
        raise PkiError(f"invalid host {host!r}: give a DNS name or an IP address")
    return x509.DNSName(host.lower())


# --- certificates --------------------------------------------------------------------------


def _ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str = "Flowerbed CA") -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    return (
        _builder(name, name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: list[x509.GeneralName],
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Flowerbed SuperLink")])
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(name, ca_cert.subject, key.public_key(), SERVER_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
    )


# --- files ---------------------------------------------------------------------------------


def _client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    clients = directory / "clients"
    return clients / f"{name}.key", clients / f"{name}.pub"


def _write_node_key_pair(key_path: Path, pub_path: Path) -> None:
    """EC P-256 in OpenSSH format: what Flower's SuperNode auth and `flwr supernode register` load.
    P-256, not P-384: the SuperLink verifies a node's signature on every request it makes, and
    P-256 verifies several times faster (docs/benchmarks.md#a-fleet-on-one-server)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(key_path, private, PRIVATE_MODE)
    _write(pub_path, public + b"\n", PUBLIC_MODE)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """atomic_write_bytes creates via mkstemp (0600), so a key is never readable by others."""
    atomic_write_bytes(path, data)
    os.chmod(path, mode)


# --- a device's local link: the SuperNode's Runtime API certificate (fedclient/localcert.py) ---
# Kept apart from the deployment PKI above: made afresh by each `fedclient start`, trusted by that
# start's warm worker only, and deleted when it stops.

LOCAL_HOST = "127.0.0.1"  # where fedclient's SuperNode serves its Runtime API
LOCAL_DAYS = CA_DAYS  # a `fedclient start` may run for years; its certificate must not expire first


def write_local_certificate(certificate: Path, key_path: Path) -> None:
    """A new self-signed TLS certificate for 127.0.0.1 (`certificate`) and its private key (`key_path`, 0600).

    `fedclient start` gives both to its SuperNode (`--ssl-certfile`, `--ssl-keyfile`) and the
    certificate alone to its warm worker, which trusts no other: only the process that holds
    the key, that start's SuperNode, can answer the worker on the Runtime API port.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Flowerbed SuperNode Runtime API")])
    local = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOCAL_HOST))])
    cert = (
        _builder(name, name, key.public_key(), LOCAL_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(local, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_private(key), PRIVATE_MODE)
    _write(certificate, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


# --- enrollment: device certificates for secure aggregation (shared/secagg/enrollment.py) ---
# The enrollment CA is apart from the TLS CA, and the operator keeps its key offline: a
# certificate it issues binds a device name to that device's node key, with which the device
# signs its secure-aggregation keys each round, so a server cannot swap them or invent peers.

ENROLLMENT_DIR = "enrollment"
ENROLLMENT_CA_NAME = "Flowerbed enrollment CA"
ENROLLMENT_DAYS = 365  # a device is re-enrolled yearly; there is no revocation list


def enroll(ca_key: Path, ca_cert: Path, public_key: Path, out: Path | None = None) -> Path:
    """Sign the node key NAME.pub into an enrollment certificate (CN = NAME), by default NAME.crt beside it."""
    public_key = Path(public_key)
    if public_key.suffix != ".pub":
        raise PkiError(f"{public_key}: give the device's node public key, NAME.pub")
    key = _read(Path(ca_key), "an unencrypted PEM private key", lambda pem: serialization.load_pem_private_key(pem, None))
    certificate = _read(Path(ca_cert), "a PEM certificate", x509.load_pem_x509_certificate)
    names = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [ENROLLMENT_CA_NAME]:
        raise PkiError(f"{ca_cert} is not an enrollment CA certificate (enrollment/enrollment-ca.pem)")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise PkiError(f"{ca_key} is not the key of {ca_cert}")
    out = public_key.with_suffix(".crt") if out is None else Path(out)
    _write_enrollment(public_key, out, certificate, key)
    return out


def _write_enrollment(
    public_key: Path, out: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    name = public_key.stem
    _check_client_name(name)
    node_key = _read(public_key, "a node public key (OpenSSH)", serialization.load_ssh_public_key)
    if not isinstance(node_key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{public_key} is not an EC node key (fedclient keygen makes one)")
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    certificate = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), ca_cert.subject, node_key, ENROLLMENT_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(node_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(out, certificate.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def _read(path: Path, what: str, parse: Callable[[bytes], T]) -> T:
    try:
        return parse(path.read_bytes())
    except OSError as err:
        raise PkiError(f"cannot read {path}: {err.strerror}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise PkiError(f"{path} is not {what}") from None
