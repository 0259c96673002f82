"""The run configuration: one frozen, typed object read from TOML plus `key=value` overrides.

Keys are hyphenated, exactly as in Flower's run config (`[tool.flwr.app.config]`, `flwr run
--run-config`), so the same mapping configures fedsim, `flwr run .` and `fedserver start`.
Every value is a Flower config scalar (str, int, float, bool): Flower cannot carry lists or
nulls in a run config, so "no target" is `target-accuracy = 0.0`, "the data seed is the seed"
is `data-seed = -1`, and MLP hidden sizes are a comma-separated string.

Each field declares its default and meaning once, here: docs/config.md and pyproject's
`[tool.flwr.app.config]` are generated from them (`python -m shared.config_docs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from shared.errors import FlowerbedError

Scalar = str | int | float | bool

STRATEGIES = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
    "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
)  # fmt: skip
DATASETS = ("synthetic", "mnist", "fashion-mnist", "femnist", "npz", "csv", "imdb", "shakespeare")
MODELS = ("mlp", "2nn", "cnn", "transformer-classifier", "char-lm")
# Text datasets carry token ids, so each has its one model; every other dataset takes mlp or 2nn,
# and cnn where its features are a square image's pixels.
TEXT_MODELS: dict[str, str] = {"imdb": "transformer-classifier", "shakespeare": "char-lm"}
PARTITIONS = ("auto", "iid", "dirichlet", "shards", "natural")  # auto: natural where the data has a key, else iid
OPTIMIZERS = ("sgd", "adam")
# fitted: on the training split (fedsim, research); bytes and file need no client's text (deployments).
TOKENIZERS = ("fitted", "bytes", "file")
VECTORIZED = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda", "mps")
BACKENDS = ("fedsim", "ray")  # ray: Flower's own simulation engine (the `ray` extra), on one machine or a cluster
# Differential privacy (docs/privacy.md): `central` is DP-FedAvg (the server clips and adds the noise);
# `distributed` the same with the devices clipping and adding shares of the noise under SecAgg+.
DP_MODES = ("none", "central", "distributed", "local-sgd")
DP_NOT_AVAILABLE: tuple[str, ...] = ()  # in DP_MODES, refused with "not available yet"
# Their aggregate is not a sum of the updates, which central DP's noise is calibrated to.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")

# Keys whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": STRATEGIES,
    "dataset": DATASETS,
    "model": MODELS,
    "partition": PARTITIONS,
    "optimizer": OPTIMIZERS,
    "tokenizer": TOKENIZERS,
    "vectorized": VECTORIZED,
    "device": DEVICES,
    "backend": BACKENDS,
    "dp": DP_MODES,
}


COUNT_OR_AUTO = ("workers",)  # str keys holding `auto` or a count >= 1 (TOML may write the count as an int)


class ConfigError(FlowerbedError, ValueError):
    """A run configuration names an unknown key, has a wrong type or an impossible value."""


def config_key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class Section:
    """A group of config keys, as docs/config.md shows them; `option` declares one key of it."""

    title: str
    about: str

    def option(self, default: Scalar, meaning: str, *, path: bool = False) -> Any:
        """A RunConfig field with its default and meaning; `path`: resolved by `load_config`."""
        return field(default=default, metadata={"section": self, "meaning": meaning, "path": path})


DATA = Section("Data", "What the clients hold and how it is cut among them.")
MODEL = Section("Model", "The network every client trains.")
TEXT = Section(
    "Text models",
    "Tokenizer and transformer shape: `transformer-classifier` on `imdb`, `char-lm` on `shakespeare`.",
)
FEDERATION = Section("Federation", "How many clients, how many rounds, which strategy, which seeds.")
LOCAL = Section("Local training", "What a sampled client does with the global model each round.")
SERVER = Section("Server-side optimizers and robust aggregation", "Settings of the strategies that have them.")
EVALUATION = Section("Evaluation and stopping", "How the global model is scored and when a run stops early.")
EXECUTION = Section("Execution", "Where a run computes and writes, and how rounds cope with failing clients.")
SECAGG = Section(
    "Secure aggregation", "SecAgg+ (`shared/secagg`): the server learns only the sum of the clients' updates."
)
PRIVACY = Section(
    "Differential privacy",
    "Client-level DP ([privacy.md](privacy.md)): `central` clips each update, adds Gaussian noise to the sum "
    "and accounts ε over the rounds.",
)
SAME_AS_SEED = -1  # `data-seed` default: the data is drawn with the run's `seed`
EVERY_CLIENT = -1  # `eval-clients`: evaluate on every connected client
# `eval-clients = 0`: evaluate on `clients-per-round` clients, but at least this many (all where
# there are fewer). An evaluation's cost is then bounded by the round's size, not by the clients
# registered (10,000 in a cross-device federation), while a hundred clients' held-out data is
# enough that the score does not swing with which few clients happened to be drawn.
DEFAULT_EVAL_CLIENTS = 100


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a federation. Field `num_clients` is config key `num-clients`."""

    dataset: str = DATA.option(
        "synthetic",
        "What the clients hold: `synthetic` is generated (Synthetic(α, β), Li et al. 2020); `npz` and "
        "`csv` are your own files; the others are public datasets read from `data-path`.",
    )
    data_path: str = DATA.option(
        "",
        "The data file or directory. `\"\"`: none needed (`synthetic`), or the dataset's own place "
        "(`fashion-mnist`: /usr/share/datasets/fashion-mnist; `shakespeare`: the `shakespeare` package). "
        "Relative in a config file: to that file's folder; in a `key=value` override: to the working "
        "directory. Stored absolute.",
        path=True,
    )
    partition: str = DATA.option(
        "auto",
        "How the training data is cut among clients: `iid` uniformly, `dirichlet` with Dir(`dirichlet-alpha`) "
        "label skew, `shards` into label-sorted shards (FedAvg's pathological non-IID), `natural` one client "
        "per key of the data (FEMNIST writer, IMDB movie, Shakespeare role, synthetic device); `auto` = "
        "`natural` where the data has a key, else `iid`.",
    )
    dirichlet_alpha: float = DATA.option(
        0.5, "`dirichlet` partition: concentration (> 0); small values put each class on few clients."
    )
    shards_per_client: int = DATA.option(2, "`shards` partition: shards dealt to each client.")
    min_client_size: int = DATA.option(
        1, "`natural` partition: keys with fewer training examples are pooled into one client."
    )
    synthetic_alpha: float = DATA.option(
        1.0, "Synthetic(α, β): α, the standard deviation of how much the devices' models differ."
    )
    synthetic_beta: float = DATA.option(
        1.0, "Synthetic(α, β): β, the standard deviation of how much the devices' inputs differ."
    )
    synthetic_iid: bool = DATA.option(False, "Synthetic's IID variant: one model for all devices, inputs around 0.")
    synthetic_max_samples: int = DATA.option(
        0,
        "Cap on a synthetic device's samples (the lognormal(4, 2) sizes give a few devices tens of "
        "thousands); 0 = uncapped, exactly as the paper.",
    )
    test_fraction: float = DATA.option(
        0.2,
        "Held-out share, in [0, 1], where the dataset has no test split: each client's local test part "
        "(IMDB: the test reviews; Shakespeare: the last share of each role's text).",
    )
    model: str = MODEL.option(
        "mlp",
        "`mlp` (hidden sizes from `hidden`), `2nn` (the FedAvg paper's two hidden layers of 200), "
        "`cnn` (the FedAvg paper's MNIST CNN; LEAF's on `femnist`: for square one-channel images such "
        "as 28×28), `transformer-classifier` (for `imdb`), `char-lm` (for `shakespeare`).",
    )
    hidden: str = MODEL.option(
        "200,200", "`mlp`: hidden layer sizes, comma-separated; `\"\"` = multinomial logistic regression."
    )
    cnn_hidden: int = MODEL.option(
        0,
        "`cnn`: units of its fully connected ReLU layer; 0 = the paper's for the dataset: 2048 on "
        "`femnist` (LEAF), else 512 (McMahan et al. 2017).",
    )
    num_classes: int = MODEL.option(0, "Number of classes; 0 = from the dataset.")
    input_dim: int = MODEL.option(0, "Flattened input size; 0 = from the dataset.")
    max_len: int = TEXT.option(
        0,
        "Longest token sequence: words kept of an IMDB review, Shakespeare's context window in "
        "characters; 0 = the dataset's default (imdb 256, shakespeare 80 as in LEAF).",
    )
    vocab_size: int = TEXT.option(
        20000,
        "`imdb`, `tokenizer = \"fitted\"`: most words the tokenizer keeps, ids 0 (padding) and 1 (unknown) "
        "included; >= 3.",
    )
    tokenizer: str = TEXT.option(
        "fitted",
        "`fitted`: a vocabulary fitted on the training split (fedsim only: research, it reads every "
        "client's text); `bytes`: UTF-8 bytes, nothing fitted; `file`: the `tokenizers` JSON at "
        "`tokenizer-path`, fitted on public text and shipped to devices with the run.",
    )
    tokenizer_path: str = TEXT.option(
        "", "`tokenizer = \"file\"`: the server's `tokenizers` JSON file.", path=True
    )
    tokenizer_sha256: str = TEXT.option(
        "",
        "The SHA-256 of `tokenizer-path`, pinned when the config is loaded (\"\" = computed then); "
        "a device refuses a shipped tokenizer that differs.",
    )
    min_role_chars: int = TEXT.option(1000, "`shakespeare`: roles speaking fewer characters are dropped.")
    d_model: int = TEXT.option(64, "Transformer width; a multiple of `num-heads`.")
    num_heads: int = TEXT.option(4, "Attention heads per layer.")
    num_layers: int = TEXT.option(2, "Transformer blocks.")
    ff_dim: int = TEXT.option(0, "Feed-forward width; 0 = 4 × `d-model`.")
    dropout: float = TEXT.option(0.1, "Dropout probability, in [0, 1).")
    compile: bool = TEXT.option(False, "`torch.compile` the model, on the server and on every client.")
    num_clients: int = FEDERATION.option(
        30,
        "Clients in the federation: fedsim's virtual clients; in a deployment, the nodes a round waits "
        "for (at most `node-wait-timeout`) before sampling. A `natural` partition takes it from the data.",
    )
    clients_per_round: int = FEDERATION.option(10, "Clients sampled for each training round; at most `num-clients`.")
    rounds: int = FEDERATION.option(40, "Training rounds.")
    strategy: str = FEDERATION.option("fedavg", "How updates are aggregated: Flower's strategy of that name.")
    seed: int = FEDERATION.option(
        0,
        "Seed of the training: model initialisation, client sampling, local shuffles, stragglers. "
        "The same `seed` and `data-seed` give bit-identical weights.",
    )
    data_seed: int = FEDERATION.option(
        SAME_AS_SEED,
        "Seed of the data: synthetic devices, partitions, per-client test splits. -1 = the same as "
        "`seed`; fix it to repeat a run over several training seeds on the same data.",
    )
    local_epochs: int = LOCAL.option(1, "Passes over its training data a client makes each round.")
    batch_size: int = LOCAL.option(10, "Local minibatch size.")
    lr: float = LOCAL.option(0.05, "Local learning rate (> 0).")
    optimizer: str = LOCAL.option("sgd", "Local optimizer.")
    proximal_mu: float = LOCAL.option(
        0.0, "μ of FedProx's proximal term (μ/2)·‖w − w_global‖² added to the local loss; 0.0 = none."
    )
    device: str = LOCAL.option(
        "auto", "Where training and evaluation run: `auto` = CUDA, then MPS, then CPU. A node's own `--device` wins."
    )
    stragglers: float = LOCAL.option(
        0.0,
        "Share, in [0, 1], of each round's sampled clients that do uniform 1..`local-epochs` epochs "
        "(Li et al. 2020): `fedprox` keeps their partial work, every other strategy drops them.",
    )
    server_lr: float = SERVER.option(
        0.0,
        "Server learning rate of `fedadam`, `fedyogi`, `fedadagrad` (η) and `fedavgm`; 0.0 = the "
        "strategy's Flower default (fedadam 0.1, fedyogi 0.01, fedadagrad 0.1, fedavgm 1.0).",
    )
    server_momentum: float = SERVER.option(
        0.0, "`fedavgm`: server momentum, in [0, 1); 0.0 = Flower's default (0.0: no momentum)."
    )
    trim_beta: float = SERVER.option(0.2, "`fedtrimmedavg`: share cut off each end before averaging.")
    num_malicious: int = SERVER.option(
        0,
        "`krum`, `multikrum`, `bulyan`: malicious clients to tolerate (`multikrum` averages "
        "`clients-per-round` minus this many).",
    )
    target_accuracy: float = EVALUATION.option(
        0.0, "Accuracy, in [0, 1], whose first round is reported as `rounds_to_target`; 0.0 = no target."
    )
    stop_at_target: bool = EVALUATION.option(False, "End the run at the round that reaches `target-accuracy`.")
    eval_batch_size: int = EVALUATION.option(1000, "Batch size of evaluation.")
    eval_clients: int = EVALUATION.option(
        0,
        "Federated evaluation (datasets without a central test set): clients sampled for each evaluation; "
        "0 = `clients-per-round`, at least 100, at most `num-clients`; -1 = every client.",
    )
    eval_every: int = EVALUATION.option(
        1,
        "Rounds between evaluations; the last round is always evaluated. Rounds in between have no accuracy, "
        "so `target-accuracy` is checked on evaluated rounds only. Training is the same whatever this is.",
    )
    backend: str = EXECUTION.option(
        "fedsim",
        "What runs the clients of a fedsim run: `fedsim` its own grid (in process or in `workers`); `ray` "
        "Flower's Ray simulation engine, on this machine or the Ray cluster `RAY_ADDRESS` names (needs the "
        "`ray` extra). Same ServerApp, ClientApp and outputs.",
    )
    ray_cpus_per_client: float = EXECUTION.option(
        1.0, "`backend = \"ray\"`: CPUs Ray reserves for each running ClientApp (> 0; fractions allowed)."
    )
    ray_gpus_per_client: float = EXECUTION.option(
        0.0, "`backend = \"ray\"`: GPUs Ray reserves for each running ClientApp (>= 0; 0.25 = four per GPU)."
    )
    vectorized: str = EXECUTION.option(
        "auto", "fedsim: train a round's clients together with `torch.func`; `auto` = only on CUDA."
    )
    workers: str = EXECUTION.option(
        "auto",
        "fedsim: processes training a round's clients in parallel, each keeping its ClientApp warm: this "
        "process and N - 1 worker processes (on CUDA, worker i on GPU i mod the GPUs' number); `1` = in this "
        "process only; `auto` = one per core (one per GPU "
        "on CUDA), at most `clients-per-round`, and in this process on one core, below 4 clients a round or "
        "where the whole run trains fewer than 150,000 examples. The same seed gives bit-identical weights "
        "whatever the number.",
    )
    gpu_memory_fraction: float = EXECUTION.option(
        0.0,
        "fedsim on CUDA: the share of a GPU's memory each worker (fedsim's own process among them) "
        "may allocate, so that many workers cannot run a card out of memory; 0.0 = no cap. Ignored without CUDA.",
    )
    torch_threads: int = EXECUTION.option(
        1,
        "Simulations: torch threads of a client; 1 measured fastest for small models on 2 cores; 0 = torch's "
        "default. A deployed device uses its own: PyTorch's default, every core (docs/deploy.md).",
    )
    run_dir: str = EXECUTION.option(
        "",
        "Where the ServerApp writes metrics, checkpoints and the model; `\"\"` = nowhere. fedsim sets it "
        "from `--output`, `fedserver start` to its state directory. Relative: as `data-path`.",
        path=True,
    )
    keep_checkpoints: int = EXECUTION.option(
        3, "Rounds whose checkpoints `run-dir` keeps, the last always among them; 0 = every round's."
    )
    round_timeout: float = EXECUTION.option(
        600.0,
        "Seconds a round waits for the replies of its sampled clients; those that have not replied by "
        "then count as dropped. Raise it where local training takes longer (big models, slow devices).",
    )
    node_wait_timeout: float = EXECUTION.option(
        120.0,
        "Deployment: seconds a round waits, while fewer than `num-clients` nodes are connected, for "
        "the others to connect; then it samples from those connected.",
    )
    min_replies: float = EXECUTION.option(
        1.0, "Quorum of valid replies a round needs: >= 1 a count, < 1 a share of the clients sampled."
    )
    round_retries: int = EXECUTION.option(2, "A round below quorum is retried this often with fresh clients.")
    over_select: float = EXECUTION.option(
        0.0,
        "Share of `clients-per-round` sampled beyond it (0.3: 130 for 100) from the connected nodes; the round "
        "closes once `clients-per-round` replies are in, later ones are discarded and logged. Not with `dp` "
        "`central` or `distributed` (docs/deploy.md).",
    )
    reply_deadline: float = EXECUTION.option(
        0.0,
        "Seconds a training round (a secure round: each stage before unmasking) waits for replies; then it "
        "closes with those in if the quorum holds, else the attempt fails. 0.0 = `round-timeout`.",
    )
    max_update_norm: float = EXECUTION.option(
        0.0,
        "L2 bound on a reply's change to the global model (a reply beyond it is refused), and on the "
        "aggregate's step; 0.0 = no bound.",
    )
    max_client_examples: int = EXECUTION.option(
        1_000_000,
        "Largest `num-examples` a reply may claim (FedAvg and its kin weight each update by this count, "
        "which the client reports itself); a reply claiming more, or less than 1, is refused.",
    )
    max_reply_bytes: int = EXECUTION.option(
        0,
        "Deployment: bytes a reply may bring to the ServerApp; one with more is refused before it is "
        "inflated (pulled no further, deleted from the SuperLink). 0 = 2 x the model's serialized weights "
        "+ 1 MiB (docs/deploy.md). fedsim's replies are not bounded by it.",
    )
    secure_aggregation: bool = SECAGG.option(False, "Aggregate with SecAgg+.")
    secagg_threshold: int = SECAGG.option(
        5, "t: shares needed to reconstruct a secret; a round needs at least t surviving clients."
    )
    secagg_neighbours: int = SECAGG.option(8, "k: each client's neighbours in the masking graph (even).")
    secagg_clipping_range: float = SECAGG.option(8.0, "Updates are clipped to ± this before quantization.")
    secagg_quantization_range: int = SECAGG.option(
        1 << 24, "Quantization levels; the per-element error is at most clipping range / (levels − 1)."
    )
    dp: str = PRIVACY.option(
        "none",
        "`none`; `central`: DP-FedAvg (McMahan et al. 2018): clients Poisson-sampled with probability "
        "`clients-per-round` / `num-clients`, each update clipped to `dp-clipping-norm`, Gaussian noise of "
        "std `dp-noise-multiplier` × `dp-clipping-norm` added to the sum, divided by `clients-per-round`. "
        "`local-sgd`: DP-SGD on each device (Opacus), per-example gradients clipped to `dp-clipping-norm` "
        "with noise `dp-noise-multiplier`, each client's epsilon accounted by the server; `distributed` "
        "(with `secure-aggregation`): sampled as `central`, each device clips its update to `dp-clipping-norm` and "
        "adds its share of the noise before masking, the secure sum divided by `clients-per-round`.",
    )
    dp_clipping_norm: float = PRIVACY.option(
        0.0, "C: the L2 bound on each client's update (> 0 where `dp` is not `none`)."
    )
    dp_noise_multiplier: float = PRIVACY.option(
        0.0, "z (>= 0): the noise's standard deviation over C; 0 = clipping only, ε infinite."
    )
    dp_delta: float = PRIVACY.option(1e-5, "δ at which ε is reported, in (0, 1).")
    dp_target_epsilon: float = PRIVACY.option(
        0.0,
        "The run stops before a round whose release would take ε past this (the rounds done stay "
        "committed); 0.0 = no target.",
    )

    def __post_init__(self) -> None:
        _check_values(self)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> RunConfig:
        """Build from hyphenated keys; unknown keys (other than `ignore`) and wrong types raise."""
        known = {config_key(f.name): f for f in fields(cls)}
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
        return {config_key(f.name): getattr(self, f.name) for f in fields(self)}

    def to_toml(self) -> str:
        """The resolved configuration as TOML text (what `fedsim` writes to config.toml)."""
        return tomli_w.dumps(self.to_mapping())

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())

    def eval_cohort(self, connected: int) -> int:
        """Clients a federated evaluation samples among `connected` ones (`eval-clients`)."""
        if self.eval_clients == EVERY_CLIENT:
            return connected
        wanted = self.eval_clients or max(self.clients_per_round, DEFAULT_EVAL_CLIENTS)
        return min(wanted, connected)

    def evaluates(self, server_round: int) -> bool:
        """Whether `server_round` is evaluated: every `eval-every`-th round, and the last."""
        return server_round % self.eval_every == 0 or server_round == self.rounds

    @property
    def effective_data_seed(self) -> int:
        """The seed every data draw uses: `data-seed`, or `seed` where that is -1."""
        return self.seed if self.data_seed == SAME_AS_SEED else self.data_seed


def _unknown_key_message(key: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'.{hint} Allowed keys: {', '.join(sorted(known))}"


def _coerce(key: str, value: Any, expected: type) -> Scalar:
    """Accept a value of the key's type; an int may stand for a float, or for a count-or-`auto` key's
    string, nothing else converts."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if key in COUNT_OR_AUTO and type(value) is int:
        return str(value)
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
    positive = (
        "num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "eval_every", "max_client_examples",
    )  # fmt: skip
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 1, got {getattr(cfg, name)}")
    if cfg.clients_per_round > cfg.num_clients and cfg.partition != "natural":  # natural: the data says
        raise ConfigError(
            f"config key 'clients-per-round' ({cfg.clients_per_round}) is more than "
            f"'num-clients' ({cfg.num_clients})"
        )
    for name in ("stragglers", "target_accuracy", "test_fraction", "gpu_memory_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"config key '{config_key(name)}' must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("lr", "dirichlet_alpha", "round_timeout", "ray_cpus_per_client"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"config key '{config_key(name)}' must be > 0, got {getattr(cfg, name)}")
    for name in ("node_wait_timeout", "keep_checkpoints", "cnn_hidden", "max_reply_bytes"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    for name in ("over_select", "reply_deadline"):
        if not 0 <= getattr(cfg, name) < float("inf"):
            raise ConfigError(f"config key '{config_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.min_replies <= 0 or cfg.round_retries < 0 or cfg.max_update_norm < 0:
        raise ConfigError("config keys 'min-replies' must be > 0, 'round-retries' and 'max-update-norm' >= 0")
    if not 0.0 <= cfg.server_momentum < 1.0:
        raise ConfigError(f"config key 'server-momentum' must be in [0, 1), got {cfg.server_momentum}")
    for name in ("proximal_mu", "ray_gpus_per_client", "server_lr"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.eval_clients < EVERY_CLIENT:
        raise ConfigError(f"config key 'eval-clients' must be >= 0, or -1 for every client, got {cfg.eval_clients}")
    if cfg.data_seed < SAME_AS_SEED:
        raise ConfigError(f"config key 'data-seed' must be >= 0, or -1 for the same as 'seed', got {cfg.data_seed}")
    try:
        cfg.hidden_sizes
    except ValueError:
        raise ConfigError(f"config key 'hidden' must be comma-separated ints, got '{cfg.hidden}'") from None
    for key in COUNT_OR_AUTO:
        value = getattr(cfg, key.replace("-", "_"))
        if value != "auto" and not (value.isascii() and value.isdigit() and int(value) >= 1):
            raise ConfigError(f"config key '{key}' must be 'auto' or an integer >= 1, got '{value}'")
    _check_text(cfg)
    _check_privacy(cfg)  # before SecAgg+'s own settings: DP refuses it whatever they are
    _check_local_sgd(cfg)
    _check_secure_aggregation(cfg)


def _check_privacy(cfg: RunConfig) -> None:
    """The `dp-*` keys: possible values, and a mode that this strategy and aggregation allow."""
    if not 0.0 < cfg.dp_delta < 1.0:
        raise ConfigError(f"config key 'dp-delta' must be in (0, 1), got {cfg.dp_delta}")
    for name in ("dp_noise_multiplier", "dp_target_epsilon", "dp_clipping_norm"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.dp == "none":
        return
    if cfg.dp in DP_NOT_AVAILABLE:
        raise ConfigError(f"config key 'dp' is '{cfg.dp}': not available yet (docs/privacy.md)")
    if cfg.dp_clipping_norm <= 0:
        raise ConfigError(f"config key 'dp-clipping-norm' must be > 0 with dp '{cfg.dp}', got {cfg.dp_clipping_norm}")
    if cfg.dp_target_epsilon > 0 and cfg.dp_noise_multiplier == 0:
        raise ConfigError(
            "config key 'dp-target-epsilon' needs 'dp-noise-multiplier' > 0 (without noise ε is infinite)"
        )
    if cfg.dp == "distributed" and not cfg.secure_aggregation:
        raise ConfigError(
            "dp 'distributed' needs secure-aggregation = true: the devices' noise shares protect only a sum"
        )
    if cfg.dp in ("central", "distributed") and cfg.strategy in ROBUST_STRATEGIES:
        raise ConfigError(
            f"dp '{cfg.dp}' with strategy '{cfg.strategy}': its aggregate is not a sum of the updates, "
            "which the noise is calibrated to; use fedavg, fedprox, fedadam, fedyogi, fedadagrad or fedavgm"
        )
    if cfg.dp in ("central", "distributed") and cfg.over_select > 0:
        raise ConfigError(
            f"over-select with dp '{cfg.dp}': its accountant assumes each node joins a round with probability "
            "clients-per-round / num-clients, which sampling more and dropping the late ones would not keep"
        )
    if cfg.dp == "central" and cfg.secure_aggregation:
        raise ConfigError(
            f"dp '{cfg.dp}' with secure-aggregation: the server clips each update, which SecAgg+ hides from it"
        )


def _check_local_sgd(cfg: RunConfig) -> None:
    """`dp = "local-sgd"`: what the devices' DP-SGD (Opacus, `shared.task`) cannot train privately."""
    if cfg.dp != "local-sgd":
        return
    if cfg.model == "transformer-classifier":
        # Its positional embedding reads positions, not examples: Opacus would clip wrong "examples".
        raise ConfigError("dp 'local-sgd' with model 'transformer-classifier': Opacus cannot give its "
                          "positional embedding per-example gradients; use mlp, 2nn, cnn or char-lm")  # fmt: skip
    if cfg.vectorized == "on":
        raise ConfigError("dp 'local-sgd' with vectorized 'on': a vectorized round runs no ClientApp, "
                          "where each example's gradient is clipped")  # fmt: skip
    if cfg.compile:
        raise ConfigError("dp 'local-sgd' with compile: Opacus's per-example gradient hooks need the eager model")
    if cfg.secure_aggregation:
        raise ConfigError("dp 'local-sgd' with secure-aggregation: the server accounts each client's ε "
                          "from its own num-examples, which SecAgg+ sums")  # fmt: skip
    if cfg.dp_target_epsilon > 0:
        # Each node's ε grows with its own n, which the server learns only from its reply.
        raise ConfigError("config key 'dp-target-epsilon' is not enforced with dp 'local-sgd'; leave it 0.0")


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
            "its model is shaped by 'max-len' and the vocabulary"
        )
    for name in ("d_model", "num_heads", "num_layers"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_len", "ff_dim", "min_role_chars"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"config key '{config_key(name)}' must be >= 0, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.num_heads:
        raise ConfigError(f"config key 'd-model' ({cfg.d_model}) must be a multiple of 'num-heads' ({cfg.num_heads})")
    if cfg.vocab_size < 3:
        raise ConfigError(f"config key 'vocab-size' must be >= 3 (ids 0 and 1 are reserved), got {cfg.vocab_size}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"config key 'dropout' must be in [0, 1), got {cfg.dropout}")


def toml_value(value: Scalar) -> str:
    """`value` as TOML writes it (the right-hand side of `key = value`)."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


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
    """Defaults, then the file's keys, then each `key=value` override, in that order.

    A relative path (`data-path`, `run-dir`) is made absolute: one from the file against the
    file's folder, one from an override against the working directory. So the config a run
    writes names its data wherever it is resumed from.
    """
    mapping: dict[str, Any] = {}
    if path is not None:
        mapping.update(_absolute_paths(read_toml(path), Path(path).parent))
    for text in overrides:
        key, value = parse_override(text)
        mapping.update(_absolute_paths({key: value}, Path.cwd()))
    return RunConfig.from_mapping(_pin_tokenizer(mapping))


def _pin_tokenizer(mapping: dict[str, Any]) -> dict[str, Any]:
    """`mapping` with `tokenizer-sha256` set from `tokenizer-path`'s file, for `tokenizer = "file"`."""
    path = mapping.get("tokenizer-path")
    if mapping.get("tokenizer") != "file":
        return mapping
    if not path:  # checked here, where files are read: a device takes the tokenizer from its messages
        raise ConfigError("config key 'tokenizer-path' is not set: tokenizer 'file' reads it")
    if mapping.get("tokenizer-sha256") or not isinstance(path, str):
        return mapping
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise ConfigError(f"cannot read tokenizer-path {path}: {err.strerror}") from None
    return {**mapping, "tokenizer-sha256": digest}


PATH_KEYS = frozenset(config_key(f.name) for f in fields(RunConfig) if f.metadata["path"])

# Who may set each key, for a deployed device (docs/security.md). A device follows the RECIPE a
# server sends (within its owner's policy); SERVER_ONLY keys are read by the server and fedsim
# alone (a device's ClientApp never uses them); a DEVICE_OWNED key is never taken from a server:
# every path is one, and a device uses its own value (its default, or what its owner named).
# Every key is classified here, and a test fails for a key that is not, so none slips through.
RECIPE, SERVER_ONLY, DEVICE_OWNED = "recipe", "server-only", "device-owned"
KEY_ROLES: dict[str, str] = {
    **dict.fromkeys(
        ("dataset", "model", "hidden", "cnn-hidden", "num-classes", "input-dim", "test-fraction", "max-len",
         "vocab-size", "tokenizer", "tokenizer-sha256", "d-model", "num-heads", "num-layers", "ff-dim",
         "dropout", "compile", "seed", "data-seed", "local-epochs", "batch-size", "lr", "optimizer",
         "proximal-mu", "device", "eval-batch-size", "secure-aggregation",
         "secagg-threshold", "secagg-neighbours", "secagg-clipping-range", "secagg-quantization-range",
         "dp", "dp-clipping-norm", "dp-noise-multiplier", "clients-per-round"),
        RECIPE,
    ),
    **dict.fromkeys(
        ("partition", "dirichlet-alpha", "shards-per-client", "min-client-size", "synthetic-alpha",
         "synthetic-beta", "synthetic-iid", "synthetic-max-samples", "min-role-chars", "num-clients",
         "rounds", "strategy", "stragglers", "server-lr", "server-momentum", "trim-beta", "torch-threads",
         "num-malicious", "target-accuracy", "stop-at-target", "eval-clients", "eval-every", "backend",
         "ray-cpus-per-client", "ray-gpus-per-client", "vectorized", "workers", "gpu-memory-fraction",
         "keep-checkpoints", "round-timeout", "node-wait-timeout", "min-replies", "round-retries", "over-select",
         "reply-deadline",
         "max-update-norm", "max-client-examples", "max-reply-bytes", "dp-delta", "dp-target-epsilon"),
        SERVER_ONLY,
    ),
    **dict.fromkeys(PATH_KEYS, DEVICE_OWNED),
}  # fmt: skip
DEVICE_OWNED_KEYS = frozenset(key for key, role in KEY_ROLES.items() if role == DEVICE_OWNED)


def device_config(server_config: Mapping[str, Any]) -> tuple[RunConfig, list[str]]:
    """The run config a deployed device uses: the server's keys less every device-owned one.

    Returns the config and the device-owned keys the server set (to be said once in the device's
    log): those keep the device's own values (their defaults), whatever the server sent.
    """
    ignored = sorted(key for key in server_config if key in DEVICE_OWNED_KEYS and server_config[key] != "")
    return RunConfig.from_mapping(server_config, ignore=DEVICE_OWNED_KEYS), ignored


def _absolute_paths(mapping: dict[str, Any], base: Path) -> dict[str, Any]:
    """`mapping` with its non-empty relative path values joined to `base` (`~` expanded)."""
    return {
        key: str((base / Path(value).expanduser()).resolve())
        if key in PATH_KEYS and isinstance(value, str) and value
        else value
        for key, value in mapping.items()
    }
