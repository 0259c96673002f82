"""The run config a deployment carries: pyproject's table for `flwr run .`, the daemon's staged app."""

from __future__ import annotations

import io
import tomllib
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedserver.staging import CLIENT_APP, SERVER_APP, stage_app
from shared.config import RunConfig
from shared.config_docs import FLWR_RUN_OVERRIDES

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_lists_every_run_config_key():
    # Flower accepts `flwr run . --run-config k=v` only for keys in [tool.flwr.app.config]:
    # a key added to RunConfig must be added there too.
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    keys = set(RunConfig().to_mapping())
    assert not keys - set(table), f"add to pyproject.toml [tool.flwr.app.config]: {sorted(keys - set(table))}"
    assert not set(table) - keys, f"not RunConfig keys: {sorted(set(table) - keys)}"
    RunConfig.from_mapping(table)  # and the defaults there are valid


def test_flwr_run_defaults_are_runconfigs_but_for_a_small_local_federation():
    # `flwr run .` on two or three local SuperNodes must not wait for RunConfig's 30 clients;
    # every other default is RunConfig's own.
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_mapping()

    differing = {key: value for key, value in table.items() if defaults[key] != value}

    assert differing == FLWR_RUN_OVERRIDES, "pyproject.toml is stale: run python -m shared.config_docs"
    assert set(differing) == {"num-clients", "clients-per-round", "rounds"}
    assert table["num-clients"] <= 2 and table["clients-per-round"] <= table["num-clients"]


def test_staged_app_builds_a_small_fab_whose_config_is_the_whole_run_config(tmp_path):
    # Prepare
    cfg = RunConfig.from_mapping({"dataset": "mnist", "model": "2nn", "rounds": 7, "run-dir": "/srv/run"})

    # Execute
    app = stage_app(tmp_path / "app", cfg)
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app)))

    # Assert
    manifest = tomllib.loads(fab.read("pyproject.toml").decode())
    assert manifest["tool"]["flwr"]["app"]["config"] == cfg.to_mapping()
    assert manifest["tool"]["flwr"]["app"]["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
    names = fab.namelist()
    assert {"fedserver/app.py", "fedclient/app.py", "shared/config.py"} <= set(names)
    assert not any(name.startswith(("tests/", ".venv/", "benchmarks/")) for name in names)


def test_staging_replaces_an_earlier_app(tmp_path):
    app = tmp_path / "app"
    stage_app(app, RunConfig())
    (app / "stale.py").write_text("")

    stage_app(app, RunConfig(rounds=2))

    assert not (app / "stale.py").exists()
    assert "rounds = 2" in (app / "pyproject.toml").read_text()
