"""The run configuration: one frozen, typed object read from TOML plus `key=value` overrides.

Keys are hyphenated, exactly as in Flower's run config (`[tool.flwr.app.config]`, `flwr run
--run-config`), so the same mapping configures fedsim, `flwr run .` and `fedserver start`.
Every value is a Flower config scalar (str, int, float, bool): Flower cannot carry lists or
nulls in a run config, so "no target" is `target-accuracy = 0.0` and MLP hidden sizes are a
comma-separated string.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from shared.errors import FlowerbedError

Scalar = str | int | float | bool

STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
)  # fmt: skip
DATASETS = ("synthetic", "mnist", "fashion-mnist", "femnist", "npz", "csv", "imdb", "shakespeare")
MODELS = ("mlp", "2nn", "transformer-classifier", "char-lm")
# Text datasets carry token ids, so each has its one model; every other dataset takes mlp or 2nn.
TEXT_MODELS: dict[str, str] = {"imdb": "transformer-classifier", "shakespeare": "char-lm"}
PARTITIONS = ("auto", "iid", "dirichlet", "shards", "natural")  # auto: natural where the data has a key, else iid
OPTIMIZERS = ("sgd", "adam")
VECTORIZED = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Keys whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": STRATEGIES,
    "dataset": DATASETS,
    "model": MODELS,
    "partition": PARTITIONS,
    "optimizer": OPTIMIZERS,
    "vectorized": VECTORIZED,
    "device": DEVICES,
}


class ConfigError(FlowerbedError, ValueError):
    """A run configuration names an unknown key, has a wrong type or an impossible value."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federation. Field `num_clients` is config key `num-clients`."""

    # Data
    dataset: str = "synthetic"
    data_path: str = ""
    partition: str = "auto"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    min_client_size: int = 1
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    synthetic_iid: bool = False
    synthetic_max_samples: int = 0  # 0 = uncapped, exactly as the paper
    test_fraction: float = 0.2  # per-client held-out share where the dataset has no test set
    # Model
    model: str = "mlp"
    hidden: str = "200,200"
    num_classes: int = 0  # 0 = from the dataset
    input_dim: int = 0  # 0 = from the dataset
    # Text: tokenizer and transformer shape (transformer-classifier on imdb, char-lm on shakespeare)
    max_len: int = 0  # 0 = the dataset's default: imdb 256 words, shakespeare 80 characters (LEAF)
    vocab_size: int = 20000  # imdb: most words the tokenizer keeps, ids 0 (padding) and 1 (unknown) included
    min_role_chars: int = 1000  # shakespeare: roles speaking fewer characters are dropped
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    ff_dim: int = 0  # 0 = 4 * d-model
    dropout: float = 0.1
    compile: bool = False  # torch.compile the model (both sides)
    # Federation
    num_clients: int = 30
    clients_per_round: int = 10
    rounds: int = 40
    strategy: str = "fedavg"
    seed: int = 0
    # Local training
    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.05
    optimizer: str = "sgd"
    proximal_mu: float = 0.0
    device: str = "auto"
    stragglers: float = 0.0
    # Server-side optimizers and robust aggregation
    server_lr: float = 0.1
    server_momentum: float = 0.9
    trim_beta: float = 0.2
    num_malicious: int = 0
    # Evaluation and stopping
    target_accuracy: float = 0.0  # 0.0 = no target
    stop_at_target: bool = False
    eval_batch_size: int = 1000
    eval_clients: int = 0  # federated evaluation: clients asked each round, 0 = all
    # Execution
    vectorized: str = "auto"
    torch_threads: int = 1  # 1 measured fastest for small models on 2 cores; 0 = torch's default
    run_dir: str = ""  # where the ServerApp writes metrics, checkpoints, model; "" = nowhere
    round_timeout: float = 3600.0  # seconds a round waits for replies
    min_replies: float = 1.0  # quorum of valid replies: >= 1 a count, < 1 a fraction of those sampled
    round_retries: int = 2  # a round below quorum is retried this often with fresh clients
    max_update_norm: float = 0.0  # L2 bound on a reply's change to the global model; 0.0 = no bound
    # Secure aggregation (SecAgg+, shared/secagg): the server learns only the sum of the updates
    secure_aggregation: bool = False
    secagg_threshold: int = 5  # t: shares needed to reconstruct a secret; rounds need >= t survivors
    secagg_neighbours: int = 8  # k: each client's neighbours in the masking graph (even)
    secagg_clipping_range: float = 8.0  # updates are clipped to +-this before quantization
    secagg_quantization_range: int = 1 << 24  # quantization levels; per-element error <= clip / (levels - 1)

    def __post_init__(self) -> None:
        _check_values(self)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> RunConfig:
        """Build from hyphenated keys; unknown keys (other than `ignore`) and wrong types raise."""
        known = {_key(f.name): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        ignored = set(ignore)
        for key, value in mapping.items():
            if key in ignored:
                continue
            if key not in known:
                raise ConfigError(_unknown_key_message(key, known))
            kwargs[known[key].name] = _coerce(key, value, type(getattr(cls, known[key].name)))
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Scalar]:
        """The hyphenated mapping, as Flower's run config carries it."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    def to_toml(self) -> str:
        """The resolved configuration as TOML text (what `fedsim` writes to config.toml)."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_mapping().items())

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())


def _unknown_key_message(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Allowed keys: {', '.join(sorted(known))}"


def _coerce(key: str, value: Any, expected: type) -> Scalar:
    """Accept a value of the key's type; an int may stand for a float, nothing else converts."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not expected:
        raise ConfigError(
            f"config key '{key}' must be {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _check_values(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' is '{value}'; allowed: {', '.join(allowed)}")
    positive = ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"config key '{_key(name)}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.clients_per_round > cfg.num_clients and cfg.partition != "natural":  # natural: the data says
        raise ConfigError(
            f"config key 'clients-per-round' ({cfg.clients_per_round}) is more than "
            f"'num-clients' ({cfg.num_clients})"
        )
    for name in ("stragglers", "target_accuracy", "test_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"config key '{_key(name)}' must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("lr", "dirichlet_alpha", "round_timeout"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"config key '{_key(name)}' must be > 0, got {getattr(cfg, name)}")
    if cfg.min_replies <= 0 or cfg.round_retries < 0 or cfg.max_update_norm < 0:
        raise ConfigError("config keys 'min-replies' must be > 0, 'round-retries' and 'max-update-norm' >= 0")
    if cfg.proximal_mu < 0:
        raise ConfigError(f"config key 'proximal-mu' must be >= 0, got {cfg.proximal_mu}")
    try:
        cfg.hidden_sizes
    except ValueError:
        raise ConfigError(f"config key 'hidden' must be comma-separated ints, got '{cfg.hidden}'") from None
    _check_text(cfg)
    _check_secure_aggregation(cfg)


def _check_secure_aggregation(cfg: RunConfig) -> None:
    if not cfg.secure_aggregation:
        return
    from shared.secagg import SecAggSettings, check_run  # only where it is switched on

    try:
        check_run(SecAggSettings.from_mapping(cfg.to_mapping()), cfg.strategy, cfg.clients_per_round)
    except ValueError as err:
        raise ConfigError(f"secure-aggregation: {err}") from None


def _check_text(cfg: RunConfig) -> None:
    """The model fits the dataset, and the transformer's shape is possible."""
    wanted = TEXT_MODELS.get(cfg.dataset)
    if wanted is not None and cfg.model != wanted:
        raise ConfigError(f"dataset '{cfg.dataset}' needs model '{wanted}', got '{cfg.model}'")
    if wanted is None and cfg.model in TEXT_MODELS.values():
        texts = [d for d, m in TEXT_MODELS.items() if m == cfg.model]
        raise ConfigError(
            f"model '{cfg.model}' reads token ids: dataset must be {', '.join(texts)}, got '{cfg.dataset}'"
        )
    if wanted is not None and (cfg.input_dim or cfg.num_classes):
        raise ConfigError(
            f"config keys 'input-dim' and 'num-classes' do not apply to dataset '{cfg.dataset}': "
            "its model is shaped by 'max-len' and the fitted vocabulary"
        )
    for name in ("d_model", "num_heads", "num_layers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"config key '{_key(name)}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_len", "ff_dim", "min_role_chars"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key '{_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.num_heads:
        raise ConfigError(f"config key 'd-model' ({cfg.d_model}) must be a multiple of 'num-heads' ({cfg.num_heads})")
    if cfg.vocab_size < 3:
        raise ConfigError(f"config key 'vocab-size' must be >= 3 (ids 0 and 1 are reserved), got {cfg.vocab_size}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {cfg.dropout}")


def _toml_value(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def parse_override(text: str) -> tuple[str, Scalar]:
    """Parse one `--set key=value`; the value is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file; a missing or malformed file is a ConfigError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None


def load_config(path: Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Defaults, then the file's keys, then each `key=value` override, in that order."""
    mapping: dict[str, Any] = dict(read_toml(path)) if path is not None else {}
    for text in overrides:
        key, value = parse_override(text)
        mapping[key] = value
    return RunConfig.from_mapping(mapping)
