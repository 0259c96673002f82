"""A federation's source, read once and shared, gives another process the very same federation; nothing is cached."""

import gzip
import json
import mmap
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.config import RunConfig
from shared.data import DataError
from shared.data import federation as federation_module
from shared.data.federation import Federation, load_federation, open_source, shared_source

PLAY = """ACT I. SCENE I.

ALPHA.
abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc xyz

BETA.
defdefdefdefdefdefdefdefdef QQ def def
"""


def npz_file(tmp_path: Path) -> tuple[Path, RunConfig]:
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (60, 3, 3), dtype=np.uint8), rng.integers(0, 3, 60)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:9], y_test=y[:9])
    return tmp_path / "d.npz", RunConfig(dataset="npz", data_path=str(tmp_path / "d.npz"), num_clients=4,
                                         clients_per_round=2, partition="dirichlet")  # fmt: skip


def csv_file(tmp_path: Path) -> tuple[Path, RunConfig]:
    path = tmp_path / "iris.csv"
    path.write_text("width,label\n" + "".join(f"{i / 10},{('setosa', 'virginica')[i % 2]}\n" for i in range(20)))
    return path, RunConfig(dataset="csv", data_path=str(path), num_clients=3, clients_per_round=2)


def femnist_file(tmp_path: Path) -> tuple[Path, RunConfig]:
    rng = np.random.default_rng(2)
    n = 40
    writer = np.asarray([f"w{i % 5}" for i in range(n)])
    path = tmp_path / "femnist.npz"
    np.savez(path, x=rng.random((n, 784), np.float32), y=rng.integers(0, 62, n), writer=writer,
             is_test=np.arange(n) % 4 == 0)  # fmt: skip
    return path, RunConfig(dataset="femnist", data_path=str(path), num_clients=5, clients_per_round=2)


def imdb_file(tmp_path: Path) -> tuple[Path, RunConfig]:
    path = tmp_path / "imdb.jsonl.gz"
    words = ["great", "film", "awful", "plot", "zyzzyva"]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(24):
            text = " ".join(words[(i + j) % 5] for j in range(i % 4 + 2))
            f.write(json.dumps({"text": text, "label": i % 2, "movie": f"tt{i % 3}"}) + "\n")
    return path, RunConfig(dataset="imdb", model="transformer-classifier", data_path=str(path), max_len=5,
                           num_clients=3, clients_per_round=2)  # fmt: skip


def shakespeare_dir(tmp_path: Path) -> tuple[Path, RunConfig]:
    path = tmp_path / "plays"
    path.mkdir()
    (path / "testing_gut.txt").write_text(PLAY)
    return path, RunConfig(dataset="shakespeare", model="char-lm", data_path=str(path), max_len=4,
                           min_role_chars=20, num_clients=2, clients_per_round=1)  # fmt: skip


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def assert_same_federation(one: Federation, other: Federation) -> None:
    assert (one.spec, one.num_clients, one.classes) == (other.spec, other.num_clients, other.classes)
    assert type(one.vocabulary) is type(other.vocabulary)
    if one.vocabulary is not None:
        assert len(one.vocabulary) == len(other.vocabulary)
    assert (one.central_test is None) == (other.central_test is None)
    for a, b in zip(one.central_test or (), other.central_test or ()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    for k in range(one.num_clients):
        for a, b in zip(vars(one.client(k)).values(), vars(other.client(k)).values()):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [npz_file, csv_file, femnist_file, imdb_file, shakespeare_dir])
def test_a_shared_source_builds_the_same_federation_without_its_file(tmp_path, make):
    path, cfg = make(tmp_path)
    read = load_federation(cfg)

    with shared_source(read, cfg) as directory:
        remove(path)  # from here on, only the shared arrays hold the data
        rebuilt = load_federation(cfg, open_source(directory))
        assert_same_federation(read, rebuilt)

    assert not Path(directory).exists()


def _mapped(array: np.ndarray) -> bool:
    """Whether `array` is a view of a memory-mapped file."""
    while array.base is not None and not isinstance(array.base, mmap.mmap):
        array = array.base
    return isinstance(array.base, mmap.mmap)


def test_a_federation_built_on_a_shared_source_holds_the_mapped_arrays(tmp_path):
    path, cfg = npz_file(tmp_path)

    with shared_source(load_federation(cfg), cfg) as directory:
        remove(path)
        mapped = load_federation(cfg, open_source(directory))

        assert _mapped(mapped.source.arrays["x_train"])


def test_nothing_is_cached_each_load_reads_the_file(tmp_path, monkeypatch):
    path, cfg = npz_file(tmp_path)
    first = load_federation(cfg)
    remove(path)

    with pytest.raises(DataError, match="does not exist"):
        load_federation(cfg)  # the same config again: read again, not taken from a cache
    assert not any(isinstance(value, dict) and first in value.values() for value in vars(federation_module).values())


def test_a_source_shared_for_other_data_is_refused(tmp_path):
    _, cfg = npz_file(tmp_path)

    with shared_source(load_federation(cfg), cfg) as directory:
        with pytest.raises(DataError, match="read for other data"):
            load_federation(cfg.replace(data_seed=cfg.effective_data_seed + 1), open_source(directory))


def test_the_shared_directory_is_removed_when_the_block_fails(tmp_path):
    _, cfg = npz_file(tmp_path)

    with pytest.raises(KeyboardInterrupt), shared_source(load_federation(cfg), cfg) as directory:
        assert any(Path(directory).iterdir())
        raise KeyboardInterrupt

    assert not Path(directory).exists()


def test_synthetic_data_has_nothing_to_share():
    cfg = RunConfig(num_clients=4, clients_per_round=2, synthetic_max_samples=100)

    with shared_source(load_federation(cfg), cfg) as directory:
        assert directory is None
