"""Tests for the `fedserver` command line (init, add-client): exit codes, output, one-line errors."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509

from fedserver.cli import COMMANDS, main


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fedserver: error: "), err
    return err


def test_init_creates_pki_and_says_what_it_made_and_the_next_commands(tmp_path, capsys):
    # Prepare
    directory = tmp_path / "pki"

    # Execute
    code = main(["init", str(directory), "--host", "fl.example.org", "--host", "10.0.0.7", "--clients", "2"])

    # Assert
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"created a PKI in {directory}:"
    described = {
        "CA certificate": ["ca.pem"],
        "CA key": ["ca.key"],
        "server certificate": ["server.pem"],
        "server key": ["server.key"],
        "client key pair": ["clients/client-1.key", "clients/client-1.pub", "clients/client-1.crt"],
        "enrollment CA ": ["enrollment/enrollment-ca.pem"],
        "enrollment CA key": ["enrollment/enrollment-ca.key"],
    }
    for label, names in described.items():
        line = next(line for line in printed if line.strip().startswith(label))
        assert all(str(directory / name) in line for name in names), line
        assert (directory / names[0]).is_file()
    assert any(str(directory / "clients/client-2.key") in line for line in printed)
    assert f"next: fedserver start --pki {directory} --config RUN.toml" in printed
    assert any(f"fedclient start --server HOST:9092 --ca {directory / 'ca.pem'} --key" in line for line in printed)
    key_line = next(line for line in printed if "enrollment CA key" in line)
    assert "OFFLINE" in key_line and "fedserver enroll --ca-key" in key_line
    device_line = next(line for line in printed if line.startswith("then on each device"))
    assert f"--enrollment-cert {directory / 'clients/client-1.crt'}" in device_line
    assert f"--enrollment-ca {directory / 'enrollment/enrollment-ca.pem'}" in device_line
    cert = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert ipaddress.ip_address("10.0.0.7") in sans.get_values_for_type(x509.IPAddress)
    assert stat.S_IMODE((directory / "server.key").stat().st_mode) == 0o600


def test_init_refuses_existing_pki_without_force_then_overwrites_with_it(tmp_path, capsys):
    # Prepare
    assert main(["init", str(tmp_path), "--clients", "0"]) == 0
    old_ca = (tmp_path / "ca.pem").read_bytes()
    capsys.readouterr()

    # Execute
    refused = main(["init", str(tmp_path), "--clients", "0"])
    err = _error_line(capsys)
    forced = main(["init", str(tmp_path), "--clients", "0", "--force"])

    # Assert
    assert refused == 2
    assert str(tmp_path) in err and "--force" in err
    assert forced == 0
    assert (tmp_path / "ca.pem").read_bytes() != old_ca


def test_init_force_leaves_no_key_of_the_pki_it_replaces(tmp_path, capsys):
    main(["init", str(tmp_path), "--clients", "3"])
    old_pub = (tmp_path / "clients" / "client-1.pub").read_bytes()

    code = main(["init", str(tmp_path), "--clients", "1", "--force"])

    assert code == 0
    assert sorted(p.name for p in (tmp_path / "clients").iterdir()) == ["client-1.crt", "client-1.key", "client-1.pub"]
    assert (tmp_path / "clients" / "client-1.pub").read_bytes() != old_pub


def test_remove_client_without_a_daemon_deletes_the_key_pair_and_says_when_it_applies(tmp_path, capsys):
    main(["init", str(tmp_path / "pki"), "--clients", "2"])
    capsys.readouterr()

    code = main(["remove-client", str(tmp_path / "pki"), "client-1", "--state-dir", str(tmp_path / "state")])

    assert code == 0
    out = capsys.readouterr().out
    assert f"deleted {tmp_path / 'pki' / 'clients' / 'client-1.pub'}" in out
    assert "can no longer join once 'fedserver start' runs again" in out
    assert f"deleted {tmp_path / 'pki' / 'clients' / 'client-1.crt'}" in out
    assert sorted(p.name for p in (tmp_path / "pki" / "clients").iterdir()) == [
        "client-2.crt", "client-2.key", "client-2.pub",
    ]  # fmt: skip


def test_remove_client_of_an_unknown_name_is_one_line_exit_2(tmp_path, capsys):
    main(["init", str(tmp_path), "--clients", "1"])
    capsys.readouterr()

    code = main(["remove-client", str(tmp_path), "client-9"])

    assert code == 2
    assert "no client 'client-9'" in _error_line(capsys)


def test_add_client_prints_both_paths(tmp_path, capsys):
    # Prepare
    main(["init", str(tmp_path), "--clients", "0"])
    capsys.readouterr()

    # Execute
    code = main(["add-client", str(tmp_path), "edge-7"])

    # Assert
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [
        str(tmp_path / "clients" / "edge-7.key"),
        str(tmp_path / "clients" / "edge-7.pub"),
    ]


@pytest.mark.parametrize(
    ("setup", "argv", "expected"),
    [
        (True, ["add-client", "{d}", "client-1"], "already exists"),
        (True, ["add-client", "{d}", "../x"], "invalid client name"),
        (False, ["add-client", "{d}", "bob"], "not a PKI directory"),
    ],
)
def test_add_client_errors_are_one_line_exit_2(tmp_path, capsys, setup, argv, expected):
    # Prepare
    if setup:
        main(["init", str(tmp_path / "pki")])
    capsys.readouterr()

    # Execute
    code = main([a.format(d=tmp_path / "pki") for a in argv])

    # Assert
    assert code == 2
    assert expected in _error_line(capsys)


def test_enroll_writes_name_crt_issued_by_the_enrollment_ca(tmp_path, capsys):
    # Prepare
    main(["init", str(tmp_path), "--clients", "0"])
    main(["add-client", str(tmp_path), "edge-7"])
    capsys.readouterr()
    ca_key, ca_cert = tmp_path / "enrollment/enrollment-ca.key", tmp_path / "enrollment/enrollment-ca.pem"

    # Execute
    code = main(["enroll", "--ca-key", str(ca_key), "--ca-cert", str(ca_cert), str(tmp_path / "clients/edge-7.pub")])

    # Assert
    assert code == 0
    assert capsys.readouterr().out.splitlines() == [str(tmp_path / "clients" / "edge-7.crt")]
    certificate = x509.load_pem_x509_certificate((tmp_path / "clients/edge-7.crt").read_bytes())
    certificate.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert.read_bytes()))
    assert certificate.subject.rfc4514_string() == "CN=edge-7"


@pytest.mark.parametrize(
    ("ca_key", "ca_cert", "public_key", "expected"),
    [
        ("ca.key", "ca.pem", "clients/client-1.pub", "is not an enrollment CA certificate"),
        ("ca.key", "enrollment/enrollment-ca.pem", "clients/client-1.pub", "is not the key of"),
        ("enrollment/enrollment-ca.key", "enrollment/enrollment-ca.pem", "clients/client-1.key", "NAME.pub"),
        ("enrollment/enrollment-ca.key", "enrollment/enrollment-ca.pem", "clients/nobody.pub", "cannot read"),
    ],
)
def test_enroll_errors_are_one_line_exit_2(tmp_path, capsys, ca_key, ca_cert, public_key, expected):
    # Prepare
    main(["init", str(tmp_path), "--clients", "1"])
    capsys.readouterr()

    # Execute
    code = main(["enroll", "--ca-key", str(tmp_path / ca_key), "--ca-cert", str(tmp_path / ca_cert),
                 str(tmp_path / public_key), "--out", str(tmp_path / "out.crt")])  # fmt: skip

    # Assert
    assert code == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out.crt").exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["init"],
        ["init", "DIR", "--clients", "two"],
        ["init", "DIR", "--clients", "-1"],
        ["init", "DIR", "--bogus"],
        ["add-client", "DIR"],
        ["enroll", "DIR"],
        ["enroll", "--ca-key", "K", "DIR"],
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, argv):
    # Execute
    code = main([str(tmp_path / "pki") if a == "DIR" else a for a in argv])

    # Assert
    assert code == 2
    _error_line(capsys)
    assert not (tmp_path / "pki").exists()


def test_invalid_host_is_one_line_exit_2(tmp_path, capsys):
    # Execute
    code = main(["init", str(tmp_path / "pki"), "--host", "bad host"])

    # Assert
    assert code == 2
    assert "invalid host" in _error_line(capsys)


def test_subcommands_are_registered_in_a_dict():
    """Others add `start`, `status`, `stop` by adding entries to COMMANDS."""
    assert {"init", "add-client", "enroll"} <= set(COMMANDS)


@pytest.mark.parametrize(("flag", "front"), [([], True), (["--fleet-front", "on"], True), (["--fleet-front", "off"], False)])
def test_start_passes_fleet_front_to_the_daemon(tmp_path, monkeypatch, flag, front):
    from fedserver import daemon

    started = []
    monkeypatch.setattr(daemon, "start", lambda options: started.append(options) or 0)

    code = main(["start", "--pki", str(tmp_path), "--config", str(tmp_path / "run.toml"), *flag])

    assert code == 0 and started[0].fleet_front is front
