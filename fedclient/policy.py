"""The device owner's policy: what a server may ask of this device, checked before any task runs.

Read from TOML (`--policy FILE`) and flags, and handed to the ClientApp as node config entries
`policy-KEY`, which a server cannot set; fedclient/guard.py enforces it, in a deployment or a
simulation alike (a node without those entries has no policy). Imports neither Flower nor
PyTorch: `fedclient start`'s supervisor reads it.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from shared.config import MODELS
from shared.errors import FedclientError

NODE_CONFIG_PREFIX = "policy-"
# What `max-model-parameters` defaults to: 20 M parameters (80 MB of float32 weights, about four
# times that while training with Adam) fits a small board, and is over three times the largest
# model of the presets (the FEMNIST CNN, 6.6 M).
DEFAULT_MAX_MODEL_PARAMETERS = 20_000_000


class PolicyError(FedclientError, ValueError):
    """A policy file or flag that cannot be used; the message is one line."""


def _key(default: Any, meaning: str) -> Any:
    return field(default=default, metadata={"meaning": meaning})


@dataclass(frozen=True)
class DevicePolicy:
    """What this device allows. The defaults change nothing for a run today's devices take part in,
    except that a model over `max-model-parameters` is refused."""

    require_secure_aggregation: bool = _key(
        False, "train only in secure-aggregation rounds: a plaintext training task is refused"
    )
    min_secure_group: int = _key(
        0,
        "smallest secure-aggregation group (this device and its neighbours) it takes part in, and the "
        "smallest threshold: a strict majority of this number; 0 = the protocol's own checks only",
    )
    max_local_epochs: int = _key(0, "most local epochs a task may ask for; 0 = no limit")
    max_train_seconds: float = _key(
        0.0,
        "training stops at this many seconds and the device replies with what it trained so far "
        "(its example count says how much); 0 = no limit",
    )
    allowed_models: str = _key("", "comma-separated models it trains (e.g. \"mlp,cnn\"); \"\" = any")
    max_model_parameters: int = _key(
        DEFAULT_MAX_MODEL_PARAMETERS,
        "largest model, in parameters, checked from the run config before anything is built",
    )
    dp_clipping_norm: float = _key(
        0.0,
        "local privacy floor: the device clips its update (new weights - received) to this L2 norm, "
        "whatever the server asks; 0 = no clipping",
    )
    dp_noise_multiplier: float = _key(
        0.0,
        "local privacy floor: Gaussian noise of standard deviation this x dp-clipping-norm is added to "
        "the clipped update; needs dp-clipping-norm",
    )

    def __post_init__(self) -> None:
        _check(self)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.allowed_models.split(",") if m.strip())

    def to_node_config(self) -> dict[str, bool | int | float | str]:
        """The policy as node config entries (`policy-KEY`), every key written."""
        return {NODE_CONFIG_PREFIX + policy_key(f.name): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DevicePolicy | None:
        """The policy a node config carries, or None where it carries none (a simulated node)."""
        entries = {k[len(NODE_CONFIG_PREFIX):]: v for k, v in node_config.items() if k.startswith(NODE_CONFIG_PREFIX)}
        return from_mapping(entries, "node config") if entries else None

    def describe_short(self) -> list[str]:
        """`KEY = VALUE` for each key that differs from the default, or that none does."""
        changed = [f for f in fields(self) if getattr(self, f.name) != f.default]
        return [self._line(f.name) for f in changed] or ["the defaults"]

    def describe(self) -> list[str]:
        """One line a key, as `fedclient policy` and `fedclient start` print them."""
        return [f"{self._line(f.name)}  # {f.metadata['meaning']}" for f in fields(self)]

    def _line(self, name: str) -> str:
        """`KEY = VALUE`, as TOML writes it."""
        return tomli_w.dumps({policy_key(name): getattr(self, name)}).rstrip("\n")


def policy_key(name: str) -> str:
    return name.replace("_", "-")


POLICY_KEYS = tuple(policy_key(f.name) for f in fields(DevicePolicy))


def from_mapping(mapping: Mapping[str, Any], source: str) -> DevicePolicy:
    """A policy from hyphenated keys; an unknown key or a wrong type is a PolicyError naming `source`."""
    kinds = {policy_key(f.name): (f.name, type(f.default)) for f in fields(DevicePolicy)}
    values: dict[str, Any] = {}
    for key, value in mapping.items():
        if key not in kinds:
            raise PolicyError(f"{source}: unknown policy key '{key}'; allowed: {', '.join(POLICY_KEYS)}")
        name, kind = kinds[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:
            raise PolicyError(f"{source}: policy key '{key}' must be {kind.__name__}, got {value!r}")
        values[name] = value
    try:
        return DevicePolicy(**values)
    except PolicyError as err:
        raise PolicyError(f"{source}: {err}") from None


def read_policy(path: Path | None, overrides: Mapping[str, Any] | None = None) -> DevicePolicy:
    """The policy of file `path` (None: the defaults), then `overrides` (flags set on the command line)."""
    mapping: dict[str, Any] = {}
    if path is not None:
        try:
            mapping = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise PolicyError(f"cannot read policy file {path}: {err.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise PolicyError(f"policy file {path} is not valid TOML: {err}") from None
    mapping.update(overrides or {})
    return from_mapping(mapping, f"policy file {path}" if path is not None else "policy")


def _check(policy: DevicePolicy) -> None:
    for name in ("min_secure_group", "max_local_epochs", "max_model_parameters"):
        if getattr(policy, name) < 0:
            raise PolicyError(f"'{policy_key(name)}' must be >= 0, got {getattr(policy, name)}")
    for name in ("max_train_seconds", "dp_clipping_norm", "dp_noise_multiplier"):
        value = getattr(policy, name)
        if not (math.isfinite(value) and value >= 0):
            raise PolicyError(f"'{policy_key(name)}' must be a finite number >= 0, got {value}")
    if policy.dp_noise_multiplier > 0 and policy.dp_clipping_norm == 0:
        raise PolicyError("'dp-noise-multiplier' needs 'dp-clipping-norm' (the noise is scaled by it)")
    unknown = [m for m in policy.models if m not in MODELS]
    if unknown:
        raise PolicyError(f"'allowed-models' names {', '.join(unknown)}; models are {', '.join(MODELS)}")
