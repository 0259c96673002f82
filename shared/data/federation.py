"""A dataset cut into client partitions, each client's data materialized only when asked for.

`load_federation(cfg)` builds a simulation's federation (one partition per virtual client, by
`partition-id`), `load_local(path, cfg)` a deployed client's own file; both give `ClientData`.
Nothing is cached here: whoever builds a federation passes it on. `shared_source` saves a
federation's arrays once for other processes, which build the same federation on them, memory-mapped.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import TEXT_MODELS, RunConfig
from shared.data import partition as partitioners
from shared.data.errors import DataError
from shared.data.readers import (
    Splits,
    check_values,
    read_csv,
    read_idx_dir,
    read_jsonl,
    read_leaf_json,
    read_npz,
    read_text,
)
from shared.data.shared_arrays import ArraySet, open_arrays, save_arrays
from shared.data.synthetic import synthetic_device
from shared.data.text import ByteTokenizer, CharVocab, FileTokenizer, WordTokenizer
from shared.data.textsets import _present_fields, next_char_chunks, read_reviews, read_roles

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TOKENIZER_FILE = "tokenizer.json"  # a text dataset's tokenizer, in the run directory beside the model
# Default `max-len` of each text dataset: words kept of a review; Shakespeare's window, as in LEAF.
TEXT_MAX_LEN = {"imdb": 256, "shakespeare": 80}
IMDB_CLASSES = 2  # the classifier's classes where no data is read (a deployment): negative, positive
CHUNKS_PER_WINDOW = 4  # a Shakespeare example is a chunk of 4 windows' length (see _shakespeare_federation)
DATASETS_DOC = "docs/simulation.md#datasets"  # how to get or convert each public dataset (none is downloaded)
# What `data-path` names, for each dataset read from it (an error about a missing file quotes it).
DATA_FORMATS = {
    "mnist": "an NPZ with x_train, y_train, x_test, y_test (28x28 images) or a directory of MNIST's 4 IDX files",
    "npz": "an NPZ with x_train, y_train (x_test, y_test optional) or x, y; or a directory of 4 IDX files",
    "fashion-mnist": "a directory of Fashion-MNIST's 4 IDX files (raw or .gz)",
    "csv": "a CSV file with a header row and a 'label' column",
    "femnist": "an NPZ with x, y, writer, is_test (LEAF FEMNIST)",
    "imdb": "JSON lines with text and label, optionally movie and split (plain or gzipped)",
}

Vocabulary = WordTokenizer | CharVocab | ByteTokenizer | FileTokenizer
UnfittedTokenizer = ByteTokenizer | FileTokenizer  # built without any client's text
TestSet = tuple[np.ndarray, np.ndarray]  # features, labels


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know of the data: flattened input size (for text: `max-len`, the
    longest context the model sees) and class count, and for text the vocabulary size (0 = not text)."""

    input_dim: int
    num_classes: int
    vocab_size: int = 0


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
    """One client's local data; the test part is empty where a central test set is used.

    x is float32 features or int64 token ids; y is int64 class labels (N,), or next-token
    labels per position (N, T) with -100 where nothing is scored (Shakespeare).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


class Federation:
    """Clients' data as lazy views: `client_fn(k)` materializes client k only when asked for.

    The central test set too is made on first use (`central_test`), so a process that only
    trains clients, as a fedsim worker, never holds it. `source` holds the arrays the federation
    is built from, to share with other processes; None where no file was read (synthetic data).
    """

    def __init__(
        self,
        spec: DataSpec,
        num_clients: int,
        client_fn: Callable[[int], ClientData],
        central_test: Callable[[], TestSet] | None,
        vocabulary: Vocabulary | None = None,
        classes: tuple[str, ...] | None = None,
        source: ArraySet | None = None,
    ) -> None:
        self.spec = spec
        self.num_clients = num_clients
        self.vocabulary = vocabulary
        self.classes = classes  # class names by label id, where the file wrote its labels as text
        self.source = source
        self._client_fn = client_fn
        self._central_test = central_test

    @functools.cached_property
    def central_test(self) -> TestSet | None:
        """The central test set, or None where each client holds out its own."""
        return None if self._central_test is None else self._central_test()

    def client(self, partition_id: int) -> ClientData:
        """Client `partition_id`'s data."""
        if not 0 <= partition_id < self.num_clients:
            raise DataError(f"partition id {partition_id} out of range 0..{self.num_clients - 1}")
        return self._client_fn(partition_id)


def _with_test(
    xy_fn: Callable[[int], tuple[np.ndarray, np.ndarray]], has_central_test: bool, cfg: RunConfig
) -> Callable[[int], ClientData]:
    """Client data from (x, y): no local test part with a central test set, else `test-fraction` held out."""

    def client_fn(k: int) -> ClientData:
        x, y = xy_fn(k)
        if has_central_test:
            return ClientData(x, y, x[:0], y[:0])
        return holdout_split(x, y, cfg.test_fraction, np.random.default_rng([cfg.effective_data_seed, k]))

    return client_fn


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
        scaled = flat.astype(np.float32)
        scaled /= 255.0  # in place: one array a client, not two
        return scaled
    return flat.astype(np.float32, copy=False)


def data_spec(
    cfg: RunConfig, tokenizer: UnfittedTokenizer | None = None, federation: Federation | None = None
) -> DataSpec:
    """The model's input size and class count: config keys first, then the dataset's. Writes nothing.

    A text dataset's spec comes from its tokenizer: `tokenizer` (the one a device was sent), else
    the config's. Where the spec needs the data, it is `federation`'s (else the dataset is read).
    """
    if cfg.dataset in TEXT_MODELS:
        return _text_spec(cfg, tokenizer, federation)
    known = KNOWN_SPECS.get(cfg.dataset)
    if known is None and (cfg.input_dim == 0 or cfg.num_classes == 0):
        known = (federation or load_federation(cfg)).spec
    input_dim = cfg.input_dim or known.input_dim
    num_classes = cfg.num_classes or known.num_classes
    return DataSpec(input_dim, num_classes)


def local_spec(cfg: RunConfig, data: ClientData, tokenizer: UnfittedTokenizer | None = None) -> DataSpec:
    """A deployed device's model spec, from the config and its own data: never from a file the run
    config names. Config keys first, then the dataset's known shape, then the device's own data
    (features of its file, classes up to its largest label: a run whose devices may not all hold
    every class sets `num-classes`)."""
    if cfg.dataset in TEXT_MODELS:
        tokenizer = tokenizer or (ByteTokenizer() if cfg.tokenizer == "bytes" else None)
        if tokenizer is None:  # never fitted here: that reads every client's text
            raise DataError(f"a device's text model needs tokenizer 'bytes' or a shipped 'file', not '{cfg.tokenizer}'")
        return _text_spec(cfg, tokenizer, None)
    known = KNOWN_SPECS.get(cfg.dataset)
    input_dim = cfg.input_dim or (known.input_dim if known else int(np.prod(data.x_train.shape[1:])))
    num_classes = cfg.num_classes or (known.num_classes if known else int(data.y_train.max()) + 1)
    return DataSpec(input_dim, num_classes)


def _text_spec(cfg: RunConfig, tokenizer: UnfittedTokenizer | None, federation: Federation | None) -> DataSpec:
    """Fitted: the federation's spec (its data read). Else known from the tokenizer alone."""
    tokenizer = tokenizer or text_tokenizer(cfg)
    if tokenizer is None:
        return (federation or load_federation(cfg)).spec
    max_len = cfg.max_len or TEXT_MAX_LEN[cfg.dataset]
    classes = IMDB_CLASSES if cfg.dataset == "imdb" else len(tokenizer)
    return DataSpec(max_len, classes, len(tokenizer))


def save_run_tokenizer(cfg: RunConfig, federation: Federation | None = None) -> None:
    """Save the run's tokenizer as `tokenizer.json` in `run-dir`, atomically: the fitted one
    (`federation`'s, else the dataset is read) or the `file` one; nothing for `bytes`, non-text
    datasets or a run without `run-dir`."""
    if not cfg.run_dir or cfg.dataset not in TEXT_MODELS or cfg.tokenizer == "bytes":
        return
    vocabulary = text_tokenizer(cfg) or (federation or load_federation(cfg)).vocabulary
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocabulary.save(run_dir / TOKENIZER_FILE)


def text_tokenizer(cfg: RunConfig) -> UnfittedTokenizer | None:
    """The config's tokenizer where nothing is fitted: bytes, or the file at `tokenizer-path` (its
    SHA-256 checked against `tokenizer-sha256` where pinned); None for `fitted`."""
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer != "file":
        return None
    tokenizer = FileTokenizer.load(cfg.tokenizer_path)
    check_pinned(tokenizer, cfg)
    return tokenizer


def check_pinned(tokenizer: FileTokenizer, cfg: RunConfig) -> None:
    """A tokenizer that is not the one the run pinned (`tokenizer-sha256`) is refused."""
    if cfg.tokenizer_sha256 and tokenizer.sha256 != cfg.tokenizer_sha256:
        raise DataError(
            f"tokenizer checksum mismatch: SHA-256 {tokenizer.sha256}, the run pins {cfg.tokenizer_sha256} "
            "(the tokenizer file changed since the run was configured)"
        )


def load_federation(cfg: RunConfig, source: ArraySet | None = None) -> Federation:
    """The dataset named in `cfg`, cut into client partitions: built on `source` (the arrays
    `open_source` maps) where given, else read from its file. Not cached: the caller passes it on."""
    if source is not None and source.meta.get(SOURCE_KEY, list(_source_key(cfg))) != list(_source_key(cfg)):
        raise DataError("the shared arrays were read for other data than this run's")
    federation = FEDERATIONS[cfg.dataset](cfg, source)
    _check_enough_clients(cfg, federation.num_clients)
    return federation


# ---------------------------------------------------------------- sources: what a federation is built from

# Names in a source: the natural keys (writer, movie) of the training examples; a tokenizer's
# words and a vocabulary's characters (meta); the config a shared source was read for (meta).
NATURAL_KEYS, WORDS, CHARS, SOURCE_KEY = "keys", "words", "chars", "source"
_SPLIT_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
# The config fields that any dataset's reading (not its partitioning) depends on, with the data seed.
_SOURCE_FIELDS = (
    "dataset", "data_path", "max_len", "vocab_size", "test_fraction", "min_role_chars",
    "tokenizer", "tokenizer_path", "tokenizer_sha256",
)  # fmt: skip


def _source_key(cfg: RunConfig) -> tuple:
    return (*(getattr(cfg, name) for name in _SOURCE_FIELDS), cfg.effective_data_seed)


def _splits_source(splits: Splits, keys: np.ndarray | None = None, **meta: object) -> ArraySet:
    """A source holding `splits` (its class names too) and the natural keys, if any."""
    named = {name: getattr(splits, name) for name in _SPLIT_ARRAYS} | {NATURAL_KEYS: keys}
    arrays = {name: array for name, array in named.items() if array is not None}
    classes = list(splits.classes) if splits.classes is not None else None
    return ArraySet(arrays, {"classes": classes, **meta})


def _splits(source: ArraySet) -> Splits:
    classes = source.meta["classes"]
    return Splits(
        *(source.arrays.get(name) for name in _SPLIT_ARRAYS), classes=tuple(classes) if classes is not None else None
    )


@contextmanager
def shared_source(federation: Federation, cfg: RunConfig) -> Iterator[str | None]:
    """A temporary directory holding the arrays `federation` (of `cfg`) is built from, for other
    processes to `open_source`; None where it read no file (synthetic data). Removed when the
    block ends, however it ends."""
    if federation.source is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="flowerbed-data-", ignore_cleanup_errors=True) as directory:
        source = federation.source
        save_arrays(ArraySet(source.arrays, {**source.meta, SOURCE_KEY: list(_source_key(cfg))}), Path(directory))
        yield directory


def open_source(directory: str) -> ArraySet:
    """The arrays `shared_source` saved in `directory`, memory-mapped read-only: `load_federation`'s
    `source`, one copy in the page cache whatever the number of processes."""
    return open_arrays(Path(directory))


# ---------------------------------------------------------------- each dataset's federation


def _array_federation(
    read: Callable[[RunConfig], tuple[Splits, np.ndarray | None]],
) -> Callable[[RunConfig, ArraySet | None], Federation]:
    """A federation over a file of feature arrays, partitioned by `partition`."""

    def build(cfg: RunConfig, source: ArraySet | None) -> Federation:
        source = source or _splits_source(*read(cfg))
        splits = _splits(source)
        parts = _partition(cfg, splits.y_train, source.arrays.get(NATURAL_KEYS))
        x_train, y_train, x_test, y_test = splits.x_train, splits.y_train, splits.x_test, splits.y_test
        test = None if x_test is None else lambda: (as_features(x_test), y_test.astype(np.int64))
        spec = DataSpec(
            int(np.prod(x_train.shape[1:])),
            int(max(y_train.max(), -1 if y_test is None else y_test.max())) + 1,
        )

        def xy(k: int) -> tuple[np.ndarray, np.ndarray]:
            return as_features(x_train[parts[k]]), y_train[parts[k]].astype(np.int64)

        return Federation(
            spec, len(parts), _with_test(xy, test is not None, cfg), test, classes=splits.classes, source=source
        )

    return build


def _synthetic_federation(cfg: RunConfig, source: ArraySet | None = None) -> Federation:
    """Generated per device: nothing is read, so nothing is shared (`source` is unused)."""
    if cfg.partition not in ("auto", "natural"):
        raise DataError(
            "dataset 'synthetic' is split by device (partition 'natural'); "
            "for IID data set synthetic-iid = true"
        )

    def xy(k: int) -> tuple[np.ndarray, np.ndarray]:
        return synthetic_device(
            k,
            alpha=cfg.synthetic_alpha,
            beta=cfg.synthetic_beta,
            iid=cfg.synthetic_iid,
            seed=cfg.effective_data_seed,
            max_samples=cfg.synthetic_max_samples or None,
        )

    return Federation(KNOWN_SPECS["synthetic"], cfg.num_clients, _with_test(xy, False, cfg), None)


def _imdb_federation(cfg: RunConfig, source: ArraySet | None) -> Federation:
    """Reviews as word ids, partitioned by `partition` (natural = by movie); the test split is central."""
    max_len = cfg.max_len or TEXT_MAX_LEN["imdb"]
    source = source or _read_imdb(cfg)
    splits, tokenizer = _splits(source), text_tokenizer(cfg) or WordTokenizer(source.meta[WORDS])
    parts = _partition(cfg, splits.y_train, source.arrays.get(NATURAL_KEYS))
    spec = DataSpec(max_len, int(max(splits.y_train.max(), splits.y_test.max())) + 1, len(tokenizer))

    def xy(k: int) -> tuple[np.ndarray, np.ndarray]:
        return splits.x_train[parts[k]], splits.y_train[parts[k]]

    test = lambda: (splits.x_test, splits.y_test)  # noqa: E731
    return Federation(spec, len(parts), _with_test(xy, True, cfg), test, tokenizer, source=source)


def _read_imdb(cfg: RunConfig) -> ArraySet:
    reviews = read_reviews(
        _existing(cfg.data_path, cfg),
        max_len=cfg.max_len or TEXT_MAX_LEN["imdb"],
        vocab_size=cfg.vocab_size,
        test_fraction=cfg.test_fraction,
        seed=cfg.effective_data_seed,
        tokenizer=text_tokenizer(cfg),
    )
    fitted = {WORDS: reviews.tokenizer.words} if isinstance(reviews.tokenizer, WordTokenizer) else {}
    return _splits_source(reviews.splits, reviews.movies, **fitted)


def _shakespeare_federation(cfg: RunConfig, source: ArraySet | None) -> Federation:
    """A client per (play, role), its text split by time; evaluated on every client's test windows.

    Examples are chunks of CHUNKS_PER_WINDOW windows' length: for training, every character
    after the first is a target; for testing, exactly LEAF's `max-len`-char windows -> next
    char are scored (`next_char_chunks`), which `char-lm` predicts from the window alone. There
    is no central test set: federated evaluation over all clients, weighted by their windows,
    is the accuracy over all test windows.
    """
    if cfg.partition not in ("auto", "natural"):
        raise DataError("dataset 'shakespeare' is split by (play, role) (partition 'natural')")
    window = cfg.max_len or TEXT_MAX_LEN["shakespeare"]
    source = source or _read_roles(cfg)
    train, test = _pieces(source, "train"), _pieces(source, "test")
    vocab = text_tokenizer(cfg) or CharVocab(source.meta[CHARS])
    length = CHUNKS_PER_WINDOW * window

    def client_fn(k: int) -> ClientData:
        return ClientData(
            *next_char_chunks(train[k], length, context=0),
            *next_char_chunks(test[k], length, context=window - 1),
        )

    spec = DataSpec(window, len(vocab), len(vocab))
    return Federation(spec, len(train), client_fn, None, vocab, source=source)


def _read_roles(cfg: RunConfig) -> ArraySet:
    """Every role's train and test character ids, each joined into one array with the roles' ends."""
    roles = read_roles(
        cfg.data_path or None,
        min_chars=cfg.min_role_chars,
        window=cfg.max_len or TEXT_MAX_LEN["shakespeare"],
        test_fraction=cfg.test_fraction,
        vocab=text_tokenizer(cfg),
    )
    arrays = {}
    for name, pieces in (("train", roles.train), ("test", roles.test)):
        arrays[name] = np.concatenate(pieces)
        arrays[f"{name}_ends"] = np.cumsum([len(piece) for piece in pieces])
    return ArraySet(arrays, {CHARS: roles.vocab.chars} if isinstance(roles.vocab, CharVocab) else {})


def _pieces(source: ArraySet, name: str) -> list[np.ndarray]:
    """The per-role arrays `_read_roles` joined, as views."""
    return np.split(source.arrays[name], source.arrays[f"{name}_ends"][:-1])


def _existing(data_path: str, cfg: RunConfig) -> Path:
    """The dataset's file or directory; where it is missing, the error says what it should be."""
    wanted = f"dataset '{cfg.dataset}' reads {DATA_FORMATS[cfg.dataset]}; how to get it: {DATASETS_DOC}"
    if not data_path:
        raise DataError(f"config key 'data-path' is not set: {wanted}")
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"data-path {path} does not exist: {wanted}")
    return path


def _read_array_file(cfg: RunConfig) -> tuple[Splits, None]:
    """MNIST-like data: an IDX directory or an NPZ."""
    path = _existing(cfg.data_path, cfg)
    return (read_idx_dir(path) if path.is_dir() else read_npz(path)), None


def _read_fashion_mnist(cfg: RunConfig) -> tuple[Splits, None]:
    return read_idx_dir(_existing(cfg.data_path or str(FASHION_MNIST_DIR), cfg)), None


def _read_csv_file(cfg: RunConfig) -> tuple[Splits, None]:
    return read_csv(_existing(cfg.data_path, cfg)), None


def _read_femnist(cfg: RunConfig) -> tuple[Splits, np.ndarray]:
    """The LEAF FEMNIST subset as an NPZ (`x`, `y`, `writer`, `is_test`), split by writer."""
    path = _existing(cfg.data_path, cfg)
    try:
        with np.load(path) as f:
            x, y, writer, is_test = f["x"], f["y"], f["writer"], f["is_test"].astype(bool)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path} is not a FEMNIST NPZ with x, y, writer, is_test: {err}") from None
    check_values(path, "FEMNIST", x, y)
    train = ~is_test
    return Splits(x[train], y[train], x[is_test], y[is_test]), writer[train]


# dataset -> how its federation is built
FEDERATIONS: dict[str, Callable[[RunConfig, ArraySet | None], Federation]] = {
    "synthetic": _synthetic_federation,
    "mnist": _array_federation(_read_array_file),
    "npz": _array_federation(_read_array_file),
    "fashion-mnist": _array_federation(_read_fashion_mnist),
    "csv": _array_federation(_read_csv_file),
    "femnist": _array_federation(_read_femnist),
    "imdb": _imdb_federation,
    "shakespeare": _shakespeare_federation,
}


def _partition(cfg: RunConfig, labels: np.ndarray, keys: np.ndarray | None) -> list[np.ndarray]:
    method = cfg.partition
    if method == "auto":
        method = "natural" if keys is not None else "iid"
    if method == "natural" and keys is None:
        raise DataError(f"dataset '{cfg.dataset}' has no natural partition; use iid, dirichlet or shards")
    try:
        parts = _split(cfg, method, labels, keys)
    except ValueError as err:  # a partitioner refusing an impossible split (e.g. an empty client)
        raise DataError(f"dataset '{cfg.dataset}': {err}") from None
    return parts


def _split(cfg: RunConfig, method: str, labels: np.ndarray, keys: np.ndarray | None) -> list[np.ndarray]:
    return SPLITS[method](cfg, labels, keys, np.random.default_rng(cfg.effective_data_seed))


# partition -> the clients' sample indices, from (cfg, labels, natural keys, rng)
SPLITS: dict[str, Callable[[RunConfig, np.ndarray, np.ndarray | None, np.random.Generator], list[np.ndarray]]] = {
    "natural": lambda cfg, labels, keys, rng: partitioners.natural(keys, min_size=cfg.min_client_size)[0],
    "iid": lambda cfg, labels, keys, rng: partitioners.iid(len(labels), cfg.num_clients, rng),
    "dirichlet": lambda cfg, labels, keys, rng: partitioners.dirichlet(
        labels, cfg.num_clients, cfg.dirichlet_alpha, rng
    ),
    "shards": lambda cfg, labels, keys, rng: partitioners.shards(labels, cfg.num_clients, cfg.shards_per_client, rng),
}


def _check_enough_clients(cfg: RunConfig, num_clients: int) -> None:
    """A natural split fixes the number of clients (RunConfig checks the others)."""
    if num_clients < cfg.clients_per_round:
        raise DataError(
            f"the natural split of '{cfg.dataset}' has {num_clients} clients, fewer than "
            f"clients-per-round ({cfg.clients_per_round})"
        )


def load_local(path: str | Path, cfg: RunConfig, tokenizer: UnfittedTokenizer | None = None) -> ClientData:
    """A deployed client's own data file (NPZ, CSV, IDX directory, LEAF JSON; for text, JSON lines
    or plain text), whole. Text is encoded with `tokenizer` (the one the run shipped), else the config's."""
    path = _local_path(path)
    if cfg.dataset in TEXT_MODELS:
        return _local_text(path, cfg, tokenizer or text_tokenizer(cfg))
    splits = _local_splits(path)
    x, y = as_features(splits.x_train), splits.y_train.astype(np.int64)
    if splits.x_test is None:
        return holdout_split(x, y, cfg.test_fraction, np.random.default_rng(cfg.effective_data_seed))
    return ClientData(x, y, as_features(splits.x_test), splits.y_test.astype(np.int64))


# What a device's data may be; `check_local` knows the format by the name (text by _TEXT_SUFFIXES).
LOCAL_FORMATS = "an .npz, a .csv, LEAF .json, a directory (MNIST's 4 IDX files or LEAF *.json), or text: .jsonl, .txt"
_TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


def check_local(path: str | Path) -> str:
    """What a device's data holds, in a few words ("1,797 examples, 64 features, labels 0..9"; "text:
    300 records, labels 0..1"), read once by a device that does not know its run's dataset yet.

    DataError, one line, where no run could train on it: an empty file, an unknown suffix, a file
    that is not what its name says, NaN or infinite values, labels that are not integer class ids,
    no examples. What it cannot know is left to `load_local`: whether the run's model fits the data.
    """
    path = _local_path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: empty file")
    if path.name.endswith(_TEXT_SUFFIXES):
        return _text_summary(path)
    if not (path.is_dir() or path.suffix in (".npz", ".csv", ".json")):
        raise DataError(f"{path}: unknown data format; a device's data is {LOCAL_FORMATS}")
    return _splits_summary(_local_splits(path))


def _splits_summary(splits: Splits) -> str:
    labels = np.concatenate([splits.y_train, *([] if splits.y_test is None else [splits.y_test])])
    test = f" ({len(splits.y_test):,} of them test)" if splits.y_test is not None else ""
    features = int(np.prod(splits.x_train.shape[1:]))
    described = f"{len(labels):,} examples{test}, {features:,} feature{'s' * (features != 1)}"
    return f"{described}, labels {int(labels.min())}..{int(labels.max())}"


def _local_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    return path


def _local_splits(path: Path) -> Splits:
    """A device's feature file: an IDX directory, LEAF JSON (file or directory), a CSV of integer
    class ids, else an NPZ; its features and labels numbers, and at least one example."""
    if path.is_dir() and not any(path.glob("*.json")):
        splits = read_idx_dir(path)
    elif path.is_dir() or path.suffix == ".json":
        splits = _leaf_splits(path)
    elif path.suffix == ".csv":
        splits = read_csv(path)
        if splits.classes is not None:  # a map made from one device's file would differ between devices
            raise DataError(
                f"{path}: text class labels (e.g. {splits.classes[0]!r}) are mapped to ids in fedsim "
                "only; a deployed device's file needs the integer class ids (fedsim's labels.json lists them)"
            )
    else:
        splits = read_npz(path)
    if len(splits.y_train) == 0:
        raise DataError(f"data path {path} holds no examples")
    for name, array in (("features", splits.x_train), ("labels", splits.y_train)):
        if array.dtype.kind not in "biuf":  # LEAF Shakespeare's text samples
            example = str(array.flat[0])
            raise DataError(f"{path}: the {name} are text (e.g. {example!r}); a device's text is .jsonl or .txt")
    return splits


def _leaf_splits(path: Path) -> Splits:
    """Every user's samples of LEAF JSON (a file or a directory), joined."""
    users = read_leaf_json(path).values()
    none = [np.zeros(0, np.float32)]
    return Splits(np.concatenate([x for x, _ in users] or none), np.concatenate([y for _, y in users] or none))


def _text_summary(path: Path) -> str:
    """JSON lines whose records have a `label` (IMDB) are read as labelled records, others as text."""
    if path.name.endswith((".jsonl", ".jsonl.gz")) and "label" in _present_fields(path, ("label",)):
        records = read_jsonl(path)
        return f"text: {len(records.texts):,} records, labels {records.labels.min()}..{records.labels.max()}"
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: no text")
    return f"text: {len(text):,} characters"


def _local_text(path: Path, cfg: RunConfig, tokenizer: UnfittedTokenizer | None) -> ClientData:
    """IMDB: JSON lines with `text` and `label`, `test-fraction` held out. Shakespeare (the
    character LM): plain text, or `.jsonl` with `text`, its last `test-fraction` held out."""
    if tokenizer is None:
        raise DataError(
            f"dataset '{cfg.dataset}' with tokenizer 'fitted' runs in fedsim only: that vocabulary is "
            "fitted on every client's text; a deployment sets tokenizer = \"bytes\" or \"file\""
        )
    max_len = cfg.max_len or TEXT_MAX_LEN[cfg.dataset]
    if cfg.dataset == "imdb":
        records = read_jsonl(path)
        bad = records.labels[(records.labels < 0) | (records.labels >= IMDB_CLASSES)]
        if len(bad):
            raise DataError(f"{path}: label {bad[0]} out of range: the classifier's labels are 0..{IMDB_CLASSES - 1}")
        x = tokenizer.encode_batch(records.texts, max_len)
        return holdout_split(x, records.labels, cfg.test_fraction, np.random.default_rng(cfg.effective_data_seed))
    ids = tokenizer.encode(read_text(path))
    cut = len(ids) - int(round(len(ids) * cfg.test_fraction))
    length = CHUNKS_PER_WINDOW * max_len
    data = ClientData(
        *next_char_chunks(ids[:cut], length, context=0),
        *next_char_chunks(ids[cut:], length, context=max_len - 1),
    )
    if len(data.y_train) == 0:
        raise DataError(f"data path {path} holds too little text to train on ({len(ids)} tokens)")
    return data
