"""The app a daemon submits: this project's packages plus a pyproject.toml holding the run config.

`flwr run APP --run-config` accepts only keys listed in the app's `[tool.flwr.app.config]`,
and building a FAB from a source checkout walks every file under it (its `.venv` included:
seconds). So the daemon stages a small app directory instead: the packages the ServerApp and
ClientApp import, copied from wherever they are installed, and a pyproject.toml whose
config table *is* the resolved run config. The run is then started with no overrides.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import fedclient
import fedserver
import shared
from shared.config import RunConfig
from shared.files import atomic_write_text
from shared.flower_compat.app_config import app_manifest

PACKAGES = (fedserver, fedclient, shared)  # what fedserver.app and fedclient.app import
SERVER_APP = "fedserver.app:app"
CLIENT_APP = "fedclient.app:app"
FAB_NAME = "flowerbed"


def stage_app(directory: Path, cfg: RunConfig) -> Path:
    """(Re)write `directory` as a Flower app running `cfg`; returns it."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for package in PACKAGES:
        source = Path(package.__file__).parent
        shutil.copytree(source, directory / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    atomic_write_text(directory / "pyproject.toml", pyproject_text(cfg))
    return directory


def pyproject_text(cfg: RunConfig) -> str:
    """A minimal Flower app manifest whose run config is `cfg`, every key of it."""
    return app_manifest(FAB_NAME, _version(), {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}, cfg.to_mapping())


def _version() -> str:
    try:
        return metadata.version(FAB_NAME)
    except metadata.PackageNotFoundError:
        return "0.0.0"
