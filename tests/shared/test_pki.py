"""Tests for shared.pki: CA/server certificate, node keys in Flower's format, overwrite rules."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from shared.pki import PkiError, PkiPaths, add_client, enroll, init_pki, make_node_key_pair


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(paths: PkiPaths) -> x509.SubjectAlternativeName:
    return _cert(paths.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _flower_load_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """Flower's own `flower-supernode --auth-supernode-private-key` loader (exits on a bad key)."""
    args = argparse.Namespace(auth_supernode_private_key=str(path), auth_supernode_public_key=None)
    loaded = _try_setup_client_authentication(args)
    assert loaded is not None
    return loaded[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiPaths:
    """One PKI for the read-only tests: key generation is the slow part."""
    directory = tmp_path_factory.mktemp("pki")
    return init_pki(directory, hosts=["fl.example.org", "10.1.2.3", "::1"], clients=2)


# --- certificates --------------------------------------------------------------------------


def test_server_sans_include_defaults_and_each_host(pki):
    # Execute
    sans = _sans(pki)

    # Assert
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]


def test_default_hosts_given_again_are_not_duplicated(tmp_path):
    # Execute
    paths = init_pki(tmp_path / "pki", hosts=["localhost", "127.0.0.1"], clients=0)

    # Assert
    sans = _sans(paths)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_server_cert_is_issued_by_ca_for_server_auth(pki):
    # Prepare
    ca, server = _cert(pki.ca), _cert(pki.server_cert)

    # Execute
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong

    # Assert
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_server_cert_is_not_issued_by_another_ca(pki, tmp_path):
    # Prepare
    other = init_pki(tmp_path / "other", clients=0)

    # Execute / Assert
    with pytest.raises(Exception):
        _cert(pki.server_cert).verify_directly_issued_by(_cert(other.ca))


def test_certificates_are_valid_now_and_backdated(pki):
    # Prepare
    server = _cert(pki.server_cert)

    # Execute
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc

    # Assert
    assert 824 <= lifetime.days <= 826
    assert _cert(pki.ca).not_valid_after_utc >= server.not_valid_after_utc


def test_tls_handshake_verifies_hostname_and_ip(pki):
    """A real TLS handshake (OpenSSL via ssl, in memory) for each name the server answers to."""
    for server_name in ("localhost", "127.0.0.1", "fl.example.org", "10.1.2.3"):
        # Execute
        peer = _handshake(pki, server_name)

        # Assert
        assert peer is not None, server_name
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "not-in-the-cert.example.org")


def _handshake(pki: PkiPaths, server_name: str) -> dict | None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_name)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = [_step(client), _step(server)]
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return client.getpeercert()
    raise AssertionError("handshake did not finish")


def _step(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
        return True
    except ssl.SSLWantReadError:
        return False


# --- files and node keys -------------------------------------------------------------------


def test_layout_and_private_files_are_0600(pki):
    # Prepare
    private = [pki.ca_key, pki.server_key, *(key for key, _ in pki.client_keys)]
    public = [pki.ca, pki.server_cert, *(pub for _, pub in pki.client_keys)]

    # Assert
    root = pki.ca.parent
    assert [p.relative_to(root).as_posix() for p in (pki.ca, pki.ca_key, pki.server_cert, pki.server_key)] == [
        "ca.pem", "ca.key", "server.pem", "server.key",
    ]  # fmt: skip
    assert [k.relative_to(root).as_posix() for k, _ in pki.client_keys] == [
        "clients/client-1.key", "clients/client-2.key",
    ]  # fmt: skip
    assert {_mode(p) for p in private} == {0o600}
    assert {_mode(p) for p in public} == {0o644}


def test_node_keys_are_p256_openssh(pki):
    for key_path, pub_path in pki.client_keys:
        # Execute
        private = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(pub_path.read_bytes())

        # Assert
        assert key_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert pub_path.read_bytes().startswith(b"ecdsa-sha2-nistp256 ")
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP256R1)
        assert private.public_key() == public


def test_node_keys_load_with_flowers_own_loaders(pki):
    for key_path, pub_path in pki.client_keys:
        # Execute
        private = _flower_load_private(key_path)  # flower-supernode --auth-supernode-private-key
        registered = try_load_public_key(pub_path)  # flwr supernode register <pub>

        # Assert
        assert registered == public_key_to_bytes(private.public_key())


def test_flowers_loader_rejects_a_non_openssh_key(pki, monkeypatch):
    """Guards the test above: Flower's loader really does reject the wrong format."""
    supernode_cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not its function

    def exit_now(code, message=None, **_):  # Flower's own exit arms a timer that os._exit()s pytest
        raise SystemExit(code)

    monkeypatch.setattr(supernode_cli, "flwr_exit", exit_now)
    with pytest.raises(SystemExit):
        _flower_load_private(pki.server_key)  # PKCS#8 PEM, not OpenSSH


def test_node_keys_are_distinct(pki):
    # Execute
    pubs = {pub.read_bytes() for _, pub in pki.client_keys}

    # Assert
    assert len(pubs) == len(pki.client_keys)


# --- overwrite rules and arguments ---------------------------------------------------------


def test_refuses_non_empty_dir_without_force(tmp_path):
    # Prepare
    (tmp_path / "notes.txt").write_text("keep me")

    # Execute / Assert
    with pytest.raises(PkiError, match=r"not empty.*--force") as err:
        init_pki(tmp_path, clients=0)
    assert str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ca.pem").exists()


def test_force_replaces_the_pki(tmp_path):
    # Prepare
    first = init_pki(tmp_path, clients=1)
    old_ca, old_key = first.ca.read_bytes(), first.client_keys[0][0].read_bytes()

    # Execute
    second = init_pki(tmp_path, clients=1, force=True)

    # Assert
    assert second.ca.read_bytes() != old_ca
    assert second.client_keys[0][0].read_bytes() != old_key
    _cert(second.server_cert).verify_directly_issued_by(_cert(second.ca))


def test_empty_existing_dir_is_accepted(tmp_path):
    # Execute
    paths = init_pki(tmp_path, clients=0)

    # Assert
    assert paths.ca.is_file()
    assert paths.client_keys == ()


@pytest.mark.parametrize("host", ["", "bad host", "a/b", "[::1]", "bücher.de"])
def test_rejects_invalid_hosts_before_writing(tmp_path, host):
    with pytest.raises(PkiError, match="invalid host"):
        init_pki(tmp_path / "pki", hosts=[host])
    assert not (tmp_path / "pki").exists()


def test_rejects_negative_clients(tmp_path):
    with pytest.raises(PkiError, match="clients"):
        init_pki(tmp_path / "pki", clients=-1)


# --- add_client ----------------------------------------------------------------------------


def test_add_client_writes_flower_loadable_pair(tmp_path):
    # Prepare
    init_pki(tmp_path, clients=0)

    # Execute
    key_path, pub_path = add_client(tmp_path, "hospital-a")

    # Assert
    assert (key_path, pub_path) == (tmp_path / "clients/hospital-a.key", tmp_path / "clients/hospital-a.pub")
    assert (_mode(key_path), _mode(pub_path)) == (0o600, 0o644)
    private = _flower_load_private(key_path)
    assert try_load_public_key(pub_path) == public_key_to_bytes(private.public_key())


def test_add_client_refuses_existing_name(tmp_path):
    # Prepare
    paths = init_pki(tmp_path, clients=1)
    before = paths.client_keys[0][0].read_bytes()

    # Execute / Assert
    with pytest.raises(PkiError, match="already exists"):
        add_client(tmp_path, "client-1")
    assert paths.client_keys[0][0].read_bytes() == before


@pytest.mark.parametrize("name", ["", "../evil", "a/b", "has space", ".hidden", "x\n", "ü"])
def test_add_client_refuses_unsafe_names(tmp_path, name):
    # Prepare
    init_pki(tmp_path, clients=0)

    # Execute / Assert
    with pytest.raises(PkiError, match="invalid client name"):
        add_client(tmp_path, name)
    assert list((tmp_path / "clients").glob("*")) == []


def test_add_client_refuses_a_dir_that_is_not_a_pki(tmp_path):
    # Prepare
    (tmp_path / "ca.pem").write_text("only half a PKI")

    # Execute / Assert
    with pytest.raises(PkiError, match=r"missing ca\.key"):
        add_client(tmp_path, "bob")
    with pytest.raises(PkiError, match="not a PKI directory"):
        add_client(tmp_path / "absent", "bob")
    assert not (tmp_path / "clients").exists()


# --- enrollment ----------------------------------------------------------------------------


def test_init_makes_an_enrollment_ca_apart_from_the_tls_ca(pki):
    # Execute
    enrollment_ca, tls_ca = _cert(pki.enrollment_ca), _cert(pki.ca)

    # Assert
    root = pki.ca.parent
    assert pki.enrollment_ca.relative_to(root).as_posix() == "enrollment/enrollment-ca.pem"
    assert pki.enrollment_ca_key.relative_to(root).as_posix() == "enrollment/enrollment-ca.key"
    assert (_mode(pki.enrollment_ca_key), _mode(pki.enrollment_ca)) == (0o600, 0o644)
    assert enrollment_ca.public_key() != tls_ca.public_key()
    assert enrollment_ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(ValueError):
        enrollment_ca.verify_directly_issued_by(tls_ca)


def test_init_enrolls_each_client_it_makes(pki):
    for (_, pub_path), certificate_path in zip(pki.client_keys, pki.client_certificates, strict=True):
        # Execute
        certificate = _cert(certificate_path)

        # Assert
        certificate.verify_directly_issued_by(_cert(pki.enrollment_ca))
        assert certificate.public_key() == serialization.load_ssh_public_key(pub_path.read_bytes())
        assert certificate.subject.rfc4514_string() == f"CN={pub_path.stem}"
        assert not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_enroll_signs_a_device_key_and_another_ca_cannot_stand_in(pki, tmp_path):
    # Prepare
    _, pub = make_node_key_pair(tmp_path, "edge-7")
    other = init_pki(tmp_path / "other", clients=0)

    # Execute
    written = enroll(pki.enrollment_ca_key, pki.enrollment_ca, pub)
    foreign = enroll(other.enrollment_ca_key, other.enrollment_ca, pub, tmp_path / "foreign.crt")

    # Assert
    assert written == tmp_path / "edge-7.crt" and _mode(written) == 0o644
    certificate = _cert(written)
    certificate.verify_directly_issued_by(_cert(pki.enrollment_ca))
    assert certificate.subject.rfc4514_string() == "CN=edge-7"
    with pytest.raises(InvalidSignature):  # same CA name, another key
        _cert(foreign).verify_directly_issued_by(_cert(pki.enrollment_ca))


@pytest.mark.parametrize(
    ("ca_key", "ca_cert", "public_key", "expected"),
    [
        ("ca_key", "ca", "pub", "is not an enrollment CA certificate"),
        ("ca_key", "enrollment_ca", "pub", "is not the key of"),
        ("enrollment_ca", "enrollment_ca", "pub", "is not an unencrypted PEM private key"),
        ("enrollment_ca_key", "enrollment_ca", "key", "give the device's node public key"),
        ("enrollment_ca_key", "enrollment_ca", "absent", "cannot read"),
    ],
)
def test_enroll_refuses_bad_inputs_in_one_line(pki, tmp_path, ca_key, ca_cert, public_key, expected):
    # Prepare
    key, pub = pki.client_keys[0]
    files = {"pub": pub, "key": key, "absent": tmp_path / "absent.pub"}

    # Execute / Assert
    with pytest.raises(PkiError, match=expected) as err:
        enroll(getattr(pki, ca_key), getattr(pki, ca_cert), files[public_key], tmp_path / "out.crt")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.crt").exists()


def test_enroll_refuses_a_pub_that_is_not_an_ec_node_key(pki, tmp_path):
    # Prepare
    rsa_pub = tmp_path / "legacy.pub"
    rsa_pub.write_bytes(b"ssh-rsa AAAA\n")

    # Execute / Assert
    with pytest.raises(PkiError, match=r"legacy\.pub is not a node public key"):
        enroll(pki.enrollment_ca_key, pki.enrollment_ca, rsa_pub)
