"""A Flower app directory and its run config, read as `flwr run` reads them (simulations/apps.py,
fedclient/policy.py's tests, the warm worker's FAB check), and the app manifest Flowerbed writes
(the daemon's staged app, the Ray engine's app directory): Flower's public API has no reader or
writer of pyproject.toml's `[tool.flwr.app]`, of `--run-config` strings or of a FAB's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tomli_w
from click import ClickException  # what Flower's config parser raises; click is a dependency of Flower's CLI

from shared.flower_compat import flower_symbols

with flower_symbols("app_config"):
    # The checks on an app's pyproject.toml, the run config merge, `--run-config` parsing, and a
    # FAB's pyproject.toml read without installing the FAB.
    from flwr.common.config import (
        flatten_dict,
        get_fab_config,
        get_fused_config_from_dir,
        parse_config_args,
        validate_fields_in_config,
    )

    # The number of SuperNodes a local simulation has when none is configured.
    from flwr.supercore.constant import DEFAULT_SIMULATION_CONFIG

    # Flower's loader of a `module:attribute` reference (it puts the app's directory on sys.path).
    from flwr.supercore.object_ref import load_app

__all__ = [
    "DEFAULT_SIMULATION_CONFIG",
    "app_manifest",
    "flatten_dict",
    "get_fab_config",
    "get_fused_config_from_dir",
    "load_app",
    "parse_run_config",
    "validate_fields_in_config",
]


def parse_run_config(overrides: list[str]) -> dict[str, Any]:
    """The `--run-config` strings of `flwr run` as the flat dict Flower's `parse_config_args` makes.

    Each string holds space-separated `key=value` pairs, the values read as TOML; a single
    string ending in `.toml` is a file of overrides. Raises ValueError for what Flower refuses: it raises click's
    ClickException for a value that is not TOML, which is turned into a ValueError here.
    """
    try:
        return parse_config_args(overrides)
    except ClickException as err:
        raise ValueError(err.message) from err


PUBLISHER = "flowerbed"  # [tool.flwr.app]'s publisher of every app Flowerbed writes


def app_manifest(name: str, version: str, components: Mapping[str, str], run_config: Mapping[str, Any]) -> str:
    """A Flower app's pyproject.toml: the fields Flower requires of an app (`validate_fields_in_config`),
    its `components` (`serverapp`, `clientapp`: `module:attribute`) and `run_config` as its
    `[tool.flwr.app.config]`, every key of it."""
    app = {"publisher": PUBLISHER, "components": dict(components), "config": dict(run_config)}
    return tomli_w.dumps({
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": version, "dependencies": []},
        "tool": {"flwr": {"app": app}},
    })  # fmt: skip
