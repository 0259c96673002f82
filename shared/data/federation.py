"""A dataset cut into client partitions, each client's data materialized only when asked for.

`load_federation(cfg)` is what a simulation uses (one partition per virtual client, by
`partition-id`); `load_local(path, cfg)` is what a deployed client uses (its own file, whole).
Both give a `ClientData`, so the ClientApp trains on either the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import RunConfig
from shared.data import partition as partitioners
from shared.data.errors import DataError
from shared.data.readers import Splits, read_csv, read_idx_dir, read_leaf_json, read_npz
from shared.data.synthetic import synthetic_device

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know of the data: flattened input size and class count."""

    input_dim: int
    num_classes: int


# What each dataset's model looks like, known without reading the data (a deployed server
# may hold none of it). `npz` and `csv` learn it from the file, or from `input-dim`/`num-classes`.
KNOWN_SPECS = {
    "synthetic": DataSpec(60, 10),
    "mnist": DataSpec(784, 10),
    "fashion-mnist": DataSpec(784, 10),
    "femnist": DataSpec(784, 62),
}


@dataclass(frozen=True)
class ClientData:
    """One client's local data; the test part is empty where a central test set is used."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class Federation:
    """Clients' data as lazy views: indices into shared arrays, or a generator per client."""

    def __init__(
        self,
        spec: DataSpec,
        num_clients: int,
        client_fn: Callable[[int], tuple[np.ndarray, np.ndarray]],
        central_test: tuple[np.ndarray, np.ndarray] | None,
        test_fraction: float,
        seed: int,
    ) -> None:
        self.spec = spec
        self.num_clients = num_clients
        self.central_test = central_test
        self._client_fn = client_fn
        self._test_fraction = test_fraction
        self._seed = seed

    def client(self, partition_id: int) -> ClientData:
        """Client `partition_id`'s data, held out `test-fraction` when there is no central test."""
        if not 0 <= partition_id < self.num_clients:
            raise DataError(f"partition id {partition_id} out of range 0..{self.num_clients - 1}")
        x, y = self._client_fn(partition_id)
        if self.central_test is not None:
            return ClientData(x, y, x[:0], y[:0])
        return holdout_split(x, y, self._test_fraction, np.random.default_rng([self._seed, partition_id]))


def holdout_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> ClientData:
    """Shuffle and hold out `test_fraction` (at least one example when there are two or more)."""
    order = rng.permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    if test_fraction > 0 and len(y) >= 2:
        n_test = min(max(n_test, 1), len(y) - 1)
    train, test = order[: len(y) - n_test], order[len(y) - n_test :]
    return ClientData(x[train], y[train], x[test], y[test])


def as_features(x: np.ndarray) -> np.ndarray:
    """Flatten to (N, D) float32; 8-bit images are scaled to [0, 1]."""
    flat = x.reshape(len(x), -1)
    if flat.dtype == np.uint8:
        return flat.astype(np.float32) / 255.0
    return flat.astype(np.float32, copy=False)


def data_spec(cfg: RunConfig) -> DataSpec:
    """The model's input size and class count: config keys first, then the dataset's."""
    known = KNOWN_SPECS.get(cfg.dataset)
    if known is None and (cfg.input_dim == 0 or cfg.num_classes == 0):
        known = load_federation(cfg).spec
    input_dim = cfg.input_dim or known.input_dim
    num_classes = cfg.num_classes or known.num_classes
    return DataSpec(input_dim, num_classes)


@functools.lru_cache(maxsize=2)
def load_federation(cfg: RunConfig) -> Federation:
    """Read the dataset named in `cfg` and cut it into `num-clients` partitions (cached)."""
    if cfg.dataset == "synthetic":
        return _synthetic_federation(cfg)
    splits, keys = _read_splits(cfg)
    try:
        parts = _partition(cfg, splits.y_train, keys)
    except ValueError as err:  # a partitioner refusing an impossible split (e.g. an empty client)
        raise DataError(f"dataset '{cfg.dataset}': {err}") from None
    x_train, y_train = splits.x_train, splits.y_train
    test = None
    if splits.x_test is not None:
        test = (as_features(splits.x_test), splits.y_test.astype(np.int64))
    spec = DataSpec(
        int(np.prod(x_train.shape[1:])), int(max(y_train.max(), -1 if test is None else test[1].max())) + 1
    )

    def client_fn(k: int) -> tuple[np.ndarray, np.ndarray]:
        return as_features(x_train[parts[k]]), y_train[parts[k]].astype(np.int64)

    return Federation(spec, len(parts), client_fn, test, cfg.test_fraction, cfg.seed)


def _synthetic_federation(cfg: RunConfig) -> Federation:
    if cfg.partition not in ("auto", "natural"):
        raise DataError(
            "dataset 'synthetic' is split by device (partition 'natural'); "
            "for IID data set synthetic-iid = true"
        )

    def client_fn(k: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_device(
            k,
            alpha=cfg.synthetic_alpha,
            beta=cfg.synthetic_beta,
            iid=cfg.synthetic_iid,
            seed=cfg.seed,
            max_samples=cfg.synthetic_max_samples or None,
        )

    return Federation(KNOWN_SPECS["synthetic"], cfg.num_clients, client_fn, None, cfg.test_fraction, cfg.seed)


def _read_splits(cfg: RunConfig) -> tuple[Splits, np.ndarray | None]:
    """The dataset's arrays and, where it has one, its natural partition key per sample."""
    if cfg.dataset == "fashion-mnist":
        return read_idx_dir(_existing(cfg.data_path or str(FASHION_MNIST_DIR), cfg)), None
    path = _existing(cfg.data_path, cfg)
    if cfg.dataset == "femnist":
        return _read_femnist(path)
    if cfg.dataset == "csv":
        x, y = read_csv(path)
        return Splits(x, y, None, None), None
    return (read_idx_dir(path) if path.is_dir() else read_npz(path)), None


def _existing(data_path: str, cfg: RunConfig) -> Path:
    if not data_path:
        raise DataError(f"dataset '{cfg.dataset}' needs config key 'data-path'")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"data-path {path} does not exist (dataset '{cfg.dataset}')")
    return path


def _read_femnist(path: Path) -> tuple[Splits, np.ndarray]:
    """The LEAF FEMNIST subset as an NPZ (`x`, `y`, `writer`, `is_test`), split by writer."""
    try:
        with np.load(path) as f:
            x, y, writer, is_test = f["x"], f["y"], f["writer"], f["is_test"].astype(bool)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path} is not a FEMNIST NPZ with x, y, writer, is_test: {err}") from None
    train = ~is_test
    return Splits(x[train], y[train], x[is_test], y[is_test]), writer[train]


def _partition(cfg: RunConfig, labels: np.ndarray, keys: np.ndarray | None) -> list[np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    method = cfg.partition
    if method == "auto":
        method = "natural" if keys is not None else "iid"
    if method == "natural":
        if keys is None:
            raise DataError(
                f"dataset '{cfg.dataset}' has no natural partition; use iid, dirichlet or shards"
            )
        parts, _ = partitioners.natural(keys, min_size=cfg.min_client_size)
        if len(parts) < cfg.clients_per_round:
            raise DataError(
                f"the natural split of '{cfg.dataset}' has {len(parts)} clients, fewer than "
                f"clients-per-round ({cfg.clients_per_round})"
            )
        return parts
    if method == "iid":
        return partitioners.iid(len(labels), cfg.num_clients, rng)
    if method == "dirichlet":
        return partitioners.dirichlet(labels, cfg.num_clients, cfg.dirichlet_alpha, rng)
    return partitioners.shards(labels, cfg.num_clients, cfg.shards_per_client, rng)


def load_local(path: str | Path, cfg: RunConfig) -> ClientData:
    """A deployed client's own data file (NPZ, CSV, IDX directory or LEAF JSON), whole."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir() and not any(path.glob("*.json")):
        splits = read_idx_dir(path)
    elif path.is_dir() or path.suffix == ".json":
        users = read_leaf_json(path)
        x = np.concatenate([u[0] for u in users.values()])
        y = np.concatenate([u[1] for u in users.values()])
        splits = Splits(x, y, None, None)
    elif path.suffix == ".csv":
        splits = Splits(*read_csv(path), None, None)
    else:
        splits = read_npz(path)
    x, y = as_features(splits.x_train), splits.y_train.astype(np.int64)
    if len(y) == 0:
        raise DataError(f"data path {path} holds no examples")
    if splits.x_test is None:
        return holdout_split(x, y, cfg.test_fraction, np.random.default_rng(cfg.seed))
    return ClientData(x, y, as_features(splits.x_test), splits.y_test.astype(np.int64))
