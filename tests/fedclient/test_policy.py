"""The device owner's policy: a file and flags, checked before anything starts, carried to the
ClientApp as node config that Flower parses back into the same policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedclient import cli
from fedclient.node import NodeOptions, node_config
from fedclient.policy import DEFAULT_MAX_MODEL_PARAMETERS, DevicePolicy, PolicyError, read_policy
from shared.flower_compat.app_config import parse_run_config
from shared.node_config import CERTIFICATE, ENROLLMENT_CA, SIGNING_KEY

STRICT = """\
require-secure-aggregation = true
min-secure-group = 5
max-local-epochs = 5
max-train-seconds = 600
allowed-models = "mlp,cnn"
max-model-parameters = 2_000_000
dp-clipping-norm = 1.0
dp-noise-multiplier = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_a_policy_file_is_read_and_flags_win_over_it(tmp_path):
    policy = read_policy(write(tmp_path, STRICT), {"max-local-epochs": 2})

    assert policy.require_secure_aggregation and policy.min_secure_group == 5
    assert policy.max_local_epochs == 2
    assert policy.max_train_seconds == 600.0  # an int where a float is meant
    assert policy.models == ("mlp", "cnn")


def test_the_default_policy_only_bounds_the_model_size():
    policy = read_policy(None)

    assert policy == DevicePolicy()
    assert policy.describe_short() == ["the defaults"]
    assert policy.max_model_parameters == DEFAULT_MAX_MODEL_PARAMETERS


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-local-epoch = 3", "unknown policy key 'max-local-epoch'"),
        ("max-local-epochs = 2.5", "'max-local-epochs' must be int"),
        ("require-secure-aggregation = 1", "must be bool"),
        ("min-secure-group = -1", "'min-secure-group' must be >= 0"),
        ("max-train-seconds = inf", "finite number"),
        ("dp-noise-multiplier = 1.0", "needs 'dp-clipping-norm'"),
        ('allowed-models = "mlp,resnet"', "names resnet"),
        ("max-local-epochs = ", "not valid TOML"),
    ],
)
def test_a_bad_policy_is_one_line_naming_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)

    with pytest.raises(PolicyError, match=message) as caught:
        read_policy(path)

    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_fedclient_policy_prints_every_key_or_exits_2(tmp_path, capsys):
    assert cli.main(["policy", str(write(tmp_path, STRICT))]) == 0
    out = capsys.readouterr().out
    assert "require-secure-aggregation = true" in out and 'allowed-models = "mlp,cnn"' in out
    assert len(out.splitlines()) == 8

    assert cli.main(["policy", str(write(tmp_path, "epochs = 1"))]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_fedclient_start_reads_the_policy_file_and_its_flags(tmp_path):
    args = cli.build_parser().parse_args(
        ["start", "--server", "h:1", "--ca", "c", "--key", "k", "--data", "d",
         "--policy", str(write(tmp_path, STRICT)), "--max-local-epochs", "1", "--dp-clipping-norm", "0.5"]
    )  # fmt: skip

    policy = cli.options_from(args).policy

    assert (policy.max_local_epochs, policy.dp_clipping_norm, policy.min_secure_group) == (1, 0.5, 5)


def test_the_policy_and_credentials_reach_the_client_app_as_flower_parses_node_config(tmp_path):
    # Prepare
    policy = read_policy(write(tmp_path, STRICT))
    options = NodeOptions("h:1", tmp_path / "ca.pem", tmp_path / "n.key", tmp_path / "data.npz", policy=policy,
                          enrollment_cert=tmp_path / "n.crt", enrollment_ca=tmp_path / "enroll-ca.pem")  # fmt: skip

    # Execute: what flower-supernode makes of its --node-config
    parsed = parse_run_config([node_config(options)])

    # Assert
    assert DevicePolicy.from_node_config(parsed) == policy
    assert parsed["data-path"] == str(tmp_path / "data.npz")
    assert (parsed[SIGNING_KEY], parsed[CERTIFICATE], parsed[ENROLLMENT_CA]) == (
        str(tmp_path / "n.key"), str(tmp_path / "n.crt"), str(tmp_path / "enroll-ca.pem"),
    )  # fmt: skip


def test_a_simulated_node_has_no_policy():
    assert DevicePolicy.from_node_config({"partition-id": 3}) is None
