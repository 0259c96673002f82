"""`fedclient keygen`: a device makes its own key pair; only the public key leaves it."""

from __future__ import annotations

import stat

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedclient import cli


def test_keygen_writes_a_private_key_only_its_user_reads_and_its_public_key(tmp_path, capsys):
    # Execute
    code = cli.main(["keygen", "pi-7", "--dir", str(tmp_path)])

    # Assert: a pair that signs and verifies, in the format Flower's SuperNode auth loads
    out = capsys.readouterr().out
    key, pub = tmp_path / "pi-7.key", tmp_path / "pi-7.pub"
    assert code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key(key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pub.read_bytes())
    signature = private.sign(b"x", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg,union-attr]
    public.verify(signature, b"x", ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg,union-attr]
    assert f"--key {key}" in out and "clients/pi-7.pub" in out


def test_keygen_never_replaces_a_key(tmp_path, capsys):
    assert cli.main(["keygen", "pi-7", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "pi-7.key").read_bytes()

    code = cli.main(["keygen", "pi-7", "--dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "already exists" in err
    assert (tmp_path / "pi-7.key").read_bytes() == before


def test_keygen_refuses_a_name_that_is_not_a_plain_file_name(tmp_path, capsys):
    code = cli.main(["keygen", "../evil", "--dir", str(tmp_path)])

    assert code != 0 and capsys.readouterr().err.startswith("fedclient: error: ")
    assert list(tmp_path.iterdir()) == []
