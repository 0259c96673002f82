"""A Flower app directory and its run config, read as `flwr run` reads them (simulations/apps.py,
fedclient/policy.py's tests, the warm worker's FAB check): Flower's public API has no reader of
pyproject.toml's `[tool.flwr.app]`, of `--run-config` strings or of a FAB's config.
"""

from __future__ import annotations

from typing import Any

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
