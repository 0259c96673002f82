"""`fedsim run --client-app MODULE:ATTR`: every virtual node runs the given ClientApp, in this
process or in worker processes; here the example that has a tenth of the nodes attack."""

from __future__ import annotations

import pytest

from simulations import cli

TEN_CLIENTS = ["--set", "num-clients=10", "--set", "clients-per-round=10", "--set", "rounds=2",
               "--set", 'hidden="8"', "--set", "synthetic-max-samples=200", "--quiet"]  # fmt: skip


@pytest.mark.parametrize("workers", ["1", "2"])
def test_every_node_runs_the_given_client_app(tmp_path, caplog, workers):
    out = tmp_path / "run"

    code = cli.main(["run", *TEN_CLIENTS, "--workers", workers, "--output", str(out),
                     "--client-app", "examples.malicious_client:inflated"])  # fmt: skip

    # Partition 0 (node 1001) attacks: its count is refused each round, the run completes
    refusals = [r.getMessage() for r in caplog.records if "update refused" in r.getMessage()]
    assert code == 0 and (out / "model.safetensors").is_file()
    assert refusals == ["node 1001: update refused: num-examples: 1000000000000 is not an integer in [1, 1000000] "
                        "(max-client-examples)"] * 2  # fmt: skip


def test_a_client_app_that_cannot_be_imported_is_one_line_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "run"

    code = cli.main(["run", *TEN_CLIENTS, "--output", str(out), "--client-app", "examples.no_such_module:app"])

    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert "--client-app 'examples.no_such_module:app': No module named 'examples.no_such_module'" in err
    assert not out.exists()


def test_a_client_app_reference_must_name_a_client_app(tmp_path, capsys):
    not_an_app = "examples.malicious_client:SHIFT"

    code = cli.main(["run", *TEN_CLIENTS, "--output", str(tmp_path / "run"), "--client-app", not_an_app])

    assert code != 0 and "is a float, not a ClientApp" in capsys.readouterr().err
