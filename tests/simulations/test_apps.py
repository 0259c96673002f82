"""`fedsim run --app DIR`: a Flower app directory on the in-process Grid, as Flower's simulation runs it.

The apps under tests/simulations/apps/ are deterministic, so their final arrays are known: by
hand (numpy_app) or by replaying their seeded noise (quickstart_numpy, the shape of Flower's
quickstart-numpy example). Where Ray is installed, Flower's own engine runs the same apps too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from simulations import apps, cli, runner
from simulations.apps import TIMING_FILE, AppError, load_flower_app

APPS = Path(__file__).parent / "apps"
NUMPY_APP = APPS / "numpy_app"
QUICKSTART = APPS / "quickstart_numpy"
REPO = Path(__file__).resolve().parents[2]
DIRECTION = np.array([1.0, -1.0, 0.5])  # numpy_app's direction of travel


@pytest.fixture(autouse=True)
def app_sys_path(monkeypatch):
    """Flower's loader puts each app's directory on sys.path: take it off after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def numpy_app_final(nodes: int, rounds: int, step: float) -> np.ndarray:
    """numpy_app after `rounds` rounds of every one of `nodes` nodes (see its client_app.py)."""
    return step * rounds * (rounds + 1) / 2 * (2 * nodes + 1) / (3 * nodes) * DIRECTION


def quickstart_final(nodes: int, rounds: int) -> np.ndarray:
    """quickstart_numpy: ones, plus the mean of the nodes' seeded noise, every round."""
    weights = np.ones((1, 1))
    for server_round in range(1, rounds + 1):
        weights = weights + np.mean([np.random.default_rng([p, server_round]).random((1, 1)) for p in range(nodes)], axis=0)
    return weights


def fedsim(*args: str) -> int:
    return cli.main(["run", *args, "--quiet"])


def write_app(root: Path, source: str, *, components: str | None = None, module: str | None = None) -> Path:
    """A Flower app directory whose one module, named as no other test's, holds `source`.

    `components` is the body of [tool.flwr.app.components] (default: the module's `server` and
    `client`; empty: no such table).
    """
    module = module or f"fedsim_test_app_{uuid.uuid4().hex}"
    (root / f"{module}.py").write_text(source)
    if components is None:
        components = f'serverapp = "{module}:server"\nclientapp = "{module}:client"\n'
    table = f"[tool.flwr.app.components]\n{components}\n" if components else ""
    (root / "pyproject.toml").write_text(
        '[project]\nname = "test-app"\nversion = "1.0.0"\n\n[tool.flwr.app]\npublisher = "flowerbed"\n\n' + table
    )
    return root


APP_SOURCE = """
import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    FedAvg(fraction_evaluate=0.0).start(grid=grid, initial_arrays=ArrayRecord([np.zeros(2)]), num_rounds=2)


@client.train()
def train(msg, context):
    if context.node_config["partition-id"] == 0:
        raise RuntimeError("this node always fails")
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
"""


def test_a_flower_app_ends_with_the_hand_computed_arrays(tmp_path):
    # Prepare
    result = tmp_path / "final.npy"

    # Execute
    code = fedsim("--app", str(NUMPY_APP), "--run-config", f"step=2 result-path='{result}'", "--output", str(tmp_path / "out"))

    # Assert
    assert code == 0
    np.testing.assert_allclose(np.load(result), numpy_app_final(nodes=4, rounds=3, step=2.0))
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert timing["num_supernodes"] == 4  # the app's local-simulation federation
    assert (timing["rounds"], timing["messages"], timing["client_errors"]) == (3, {"evaluate": 12, "train": 12}, 0)
    assert timing["wall_seconds"] > 0 and timing["interrupted"] is False
    assert timing["workers"] == 1  # `auto` (the default): its first round is too quick to pay for a worker


def test_worker_processes_end_with_the_arrays_of_one_process(tmp_path):
    # Prepare: numpy_app's nodes count their rounds in Context.state, whichever worker serves them
    result = tmp_path / "final.npy"

    # Execute
    code = fedsim("--app", str(NUMPY_APP), "--workers", "2", "--run-config", f"step=2 result-path='{result}'",
                  "--output", str(tmp_path / "out"))  # fmt: skip

    # Assert
    assert code == 0
    # Equal up to the order FedAvg sums the replies in (Flower samples the nodes in a random order,
    # and four floats summed in another order may differ in the last bit); a node whose state was
    # lost between workers would be a whole step off.
    np.testing.assert_allclose(np.load(result), numpy_app_final(nodes=4, rounds=3, step=2.0), rtol=1e-12)
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert (timing["workers"], timing["client_errors"]) == (2, 0)


def test_auto_workers_are_capped_by_the_supernodes(tmp_path):
    result = tmp_path / "final.npy"

    code = fedsim("--app", str(NUMPY_APP), "--workers", "auto", "--num-supernodes", "2",
                  "--run-config", f"result-path='{result}'", "--output", str(tmp_path / "out"))  # fmt: skip

    assert code == 0
    np.testing.assert_array_equal(np.load(result), numpy_app_final(nodes=2, rounds=3, step=1.0))
    assert json.loads((tmp_path / "out" / TIMING_FILE).read_text())["workers"] == 1  # 2 nodes: not worth a process


def test_num_supernodes_sets_the_nodes_and_their_num_partitions(tmp_path):
    result = tmp_path / "final.npy"

    code = fedsim("--app", str(NUMPY_APP), "--num-supernodes", "2", "--run-config", f"result-path='{result}'",
                  "--output", str(tmp_path / "out"))  # fmt: skip

    assert code == 0
    np.testing.assert_allclose(np.load(result), numpy_app_final(nodes=2, rounds=3, step=1.0))


def test_the_quickstart_shaped_app_ends_with_its_known_arrays(tmp_path):
    result = tmp_path / "final.npy"

    code = fedsim("--app", str(QUICKSTART), "--run-config", f"result-path='{result}'", "--output", str(tmp_path / "out"))

    assert code == 0
    np.testing.assert_allclose(np.load(result), quickstart_final(nodes=10, rounds=3), rtol=1e-12)


def test_the_run_config_is_the_apps_merged_with_run_config_as_flwr_run_merges_them(tmp_path):
    overrides = tmp_path / "overrides.toml"
    overrides.write_text('result-path = "from a file"\n')

    merged = load_flower_app(NUMPY_APP, ["step=2 result-path='a b'", "num-server-rounds=5"]).run_config
    later_wins = load_flower_app(NUMPY_APP, ["step=2", "step=3"]).run_config
    from_file = load_flower_app(NUMPY_APP, [str(overrides)]).run_config

    assert merged == {"num-server-rounds": 5, "step": 2, "result-path": "a b"}
    assert later_wins["step"] == 3
    assert from_file == {"num-server-rounds": 3, "step": 1.0, "result-path": "from a file"}


def test_without_a_federation_an_app_gets_flowers_default_of_two_supernodes(tmp_path):
    app = write_app(tmp_path, APP_SOURCE)

    assert load_flower_app(app, []).num_supernodes == 2
    assert load_flower_app(app, [], num_supernodes=7).num_supernodes == 7


def test_a_failing_client_is_an_error_reply_counted_in_the_timing(tmp_path):
    app = write_app(tmp_path, APP_SOURCE)

    code = fedsim("--app", str(app), "--num-supernodes", "3", "--output", str(tmp_path / "out"))

    assert code == 0
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert (timing["rounds"], timing["messages"], timing["client_errors"]) == (2, {"train": 6}, 2)


def failing_in_workers(condition: str) -> str:
    """APP_SOURCE, except that its module raises on import in a worker process where `condition` holds."""
    guard = f"import multiprocessing, os\nif multiprocessing.parent_process() is not None and {condition}:\n" \
            "    raise RuntimeError('no such device in this worker')\n"  # fmt: skip
    return guard + APP_SOURCE.replace('if context.node_config["partition-id"] == 0:', "if False:")


def test_a_clientapp_no_worker_process_can_load_leaves_the_share_served_here(tmp_path, caplog):
    app = write_app(tmp_path, failing_in_workers("True"))

    code = fedsim("--app", str(app), "--num-supernodes", "4", "--workers", "2", "--output", str(tmp_path / "out"))

    # fedsim's own process loaded the app: it serves a share of every batch, the worker's are errors
    assert code == 0
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert 0 < timing["client_errors"] < timing["messages"]["train"]
    reports = [r for r in caplog.records if "the ClientApp could not be loaded: " in r.getMessage()]
    assert len(reports) == 1 and "no such device in this worker" in reports[0].getMessage()


def test_a_clientapp_some_workers_cannot_load_is_reported_once(tmp_path, monkeypatch, caplog):
    # Prepare: two "GPUs", the worker on the second cannot load the app
    monkeypatch.setattr(runner, "visible_gpus", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    app = write_app(tmp_path, failing_in_workers("os.environ['CUDA_VISIBLE_DEVICES'] == '1'"))

    # Execute
    code = fedsim("--app", str(app), "--num-supernodes", "4", "--workers", "2", "--output", str(tmp_path / "out"))

    # Assert: the other worker served the rest (each is handed messages from the start)
    assert code == 0
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert 0 < timing["client_errors"] < timing["messages"]["train"]
    reports = [r for r in caplog.records if "no such device in this worker" in r.getMessage()]
    assert len(reports) == 1 and reports[0].levelname == "WARNING"


def test_ctrl_c_in_the_serverapp_keeps_the_timing_and_exits_130(tmp_path):
    source = APP_SOURCE.replace("num_rounds=2)", "num_rounds=1)\n    raise KeyboardInterrupt")  # after a round
    app = write_app(tmp_path, source)

    code = fedsim("--app", str(app), "--output", str(tmp_path / "out"))

    assert code == 130
    timing = json.loads((tmp_path / "out" / TIMING_FILE).read_text())
    assert (timing["interrupted"], timing["rounds"]) == (True, 1)


def test_an_output_that_holds_a_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / TIMING_FILE).write_text("{}")

    code = fedsim("--app", str(NUMPY_APP), "--output", str(out))

    assert code == 2
    assert "already holds a run" in capsys.readouterr().err


BAD_APPS = {
    "no pyproject": (None, "has no pyproject.toml"),
    "no components": ("", "Missing [tool.flwr.app.components] section"),
    "no serverapp object": ('serverapp = "{m}:nowhere"\nclientapp = "{m}:client"\n',
                            "the serverapp '{m}:nowhere' cannot be loaded: Unable to load attribute nowhere"),
    "no clientapp object": ('serverapp = "{m}:server"\nclientapp = "{m}:nowhere"\n',
                            "the clientapp '{m}:nowhere' cannot be loaded"),
    "clientapp of another type": ('serverapp = "{m}:server"\nclientapp = "{m}:server"\n',
                                  "the clientapp '{m}:server' is a ServerApp, not a ClientApp"),
    "no module": ('serverapp = "no_such_module:app"\nclientapp = "{m}:client"\n', "No module named 'no_such_module'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_APPS))
def test_an_unusable_app_is_one_line_and_exit_2(tmp_path, capsys, case):
    # Prepare
    components, expected = BAD_APPS[case]
    module = f"fedsim_test_app_{uuid.uuid4().hex}"
    if components is not None:
        write_app(tmp_path, APP_SOURCE, components=components.format(m=module), module=module)

    # Execute
    code = fedsim("--app", str(tmp_path), "--output", str(tmp_path / "out"))

    # Assert
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedsim: error: ") and err.count("\n") == 1, err
    assert expected.format(m=module) in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--app", "A", "C.toml"], "not CONFIG"),
        (["--app", "A", "--config", "C.toml"], "not CONFIG"),
        (["--app", "A", "--set", "rounds=2"], "not --set"),
        (["--app", "A", "--resume", "R"], "not --resume"),
        (["--app", "A", "--workers", "0"], "config key 'workers' must be 'auto' or an integer >= 1"),
        (["--app", "A", "--gpu-memory-fraction", "-1"], "config key 'gpu-memory-fraction' must be in [0, 1]"),
        (["--run-config", "step=2"], "go with --app"),
        (["--num-supernodes", "3"], "go with --app"),
        (["--app", str(NUMPY_APP), "--run-config", "step=abc"], "--run-config: The provided configuration string"),
        (["--app", str(NUMPY_APP), "--run-config", "stpe=2"], "'stpe' not in the app's [tool.flwr.app.config]"),
        (["--app", str(NUMPY_APP), "--run-config", "step = 2"], "holds no KEY=VALUE pair"),
        (["--app", str(NUMPY_APP), "--run-config", "step=[1,2]"], "--run-config: The value for key step"),
        (["--app", str(NUMPY_APP), "--num-supernodes", "0"], "num-supernodes must be a whole number >= 1"),
    ],
    ids=["config", "--config", "--set", "--resume", "--workers", "--gpu-memory-fraction", "run-config-alone", "num-supernodes-alone", "not-toml",
         "unknown-key", "no-pair", "list-value", "zero-nodes"],  # fmt: skip
)
def test_bad_app_arguments_are_one_line_and_exit_2(capsys, args, expected):
    code = fedsim(*args)

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedsim: error: ") and err.count("\n") == 1, err
    assert expected in err


def test_an_app_error_is_a_value_error_for_library_callers(tmp_path):
    with pytest.raises(AppError, match="has no pyproject.toml"):
        load_flower_app(tmp_path, [])
    assert issubclass(AppError, ValueError)


# --- Flower's own simulation engine (Ray) on the same apps -------------------------------------


def ray_processes() -> set[int]:
    """Live processes of Ray (its actors, raylet, GCS server), zombies aside."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError):
            continue
        if state != "Z" and (cmdline.startswith(b"ray::") or b"/ray/" in cmdline):
            found.add(int(stat.parent.name))
    return found


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install -e '.[ray]'")
@pytest.mark.parametrize(("app", "nodes", "expected"),
                         [(NUMPY_APP, 4, numpy_app_final(4, 3, 2.0)), (QUICKSTART, 5, quickstart_final(5, 3))],
                         ids=["numpy_app", "quickstart_numpy"])  # fmt: skip
def test_fedsim_ends_where_flowers_ray_engine_ends(tmp_path, app, nodes, expected, one_ray_engine_at_a_time):
    # Prepare
    before = ray_processes()
    run_config = ["step=2"] if app == NUMPY_APP else []

    # Execute: Flower's engine in a process of its own, then fedsim
    ray_result, fedsim_result = tmp_path / "ray.npy", tmp_path / "fedsim.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    engine = subprocess.run(
        [sys.executable, str(APPS / "flower_engine.py"), str(app), str(nodes), *run_config, f"result-path='{ray_result}'"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    code = fedsim("--app", str(app), "--num-supernodes", str(nodes), *[a for c in run_config for a in ("--run-config", c)],
                  "--run-config", f"result-path='{fedsim_result}'", "--output", str(tmp_path / "out"))  # fmt: skip

    # Assert
    assert engine.returncode == 0, engine.stderr[-3000:]
    sampled = [int(n) for n in re.findall(r"configure_train: Sampled (\d+) nodes", engine.stderr)]
    assert sampled and min(sampled) == nodes, f"Flower's engine sampled {sampled} nodes a round, of {nodes}"
    assert code == 0
    np.testing.assert_allclose(np.load(fedsim_result), np.load(ray_result), rtol=1e-12)
    np.testing.assert_allclose(np.load(ray_result), expected, rtol=1e-12)
    deadline = time.monotonic() + 30  # Ray's processes end with the engine's (allow for their exit)
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, "Ray processes left behind"
