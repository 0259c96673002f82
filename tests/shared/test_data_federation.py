"""A federation's data is drawn with the data seed, and a missing dataset says where to get it."""

import gzip
import json

import numpy as np
import pytest

from shared.config import RunConfig
from shared.data import DataError
from shared.data import partition as partitioners
from shared.data.federation import ClientData, load_federation, load_local
from shared.data.synthetic import synthetic_device, synthetic_sizes

SYNTHETIC = {"num_clients": 6, "clients_per_round": 2, "synthetic_max_samples": 200}


def every_client(cfg: RunConfig) -> list[ClientData]:
    federation = load_federation(cfg)
    return [federation.client(k) for k in range(federation.num_clients)]


def assert_same_data(a: list[ClientData], b: list[ClientData]) -> None:
    assert len(a) == len(b)
    for one, other in zip(a, b):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(one, name), getattr(other, name))


def mnist_like(path, n=120, with_test=False):
    rng = np.random.default_rng(42)
    x, y = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), rng.integers(0, 3, n)
    arrays = {"x_train": x, "y_train": y}
    if with_test:
        arrays |= {"x_test": x[:10], "y_test": y[:10]}
    np.savez(path, **arrays)
    return str(path)


def npz_config(path: str, **changes) -> RunConfig:
    return RunConfig(dataset="npz", data_path=path, num_clients=4, clients_per_round=2, **changes)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_the_training_seed_leaves_a_fixed_data_seeds_data_alone(tmp_path, partition):
    path = mnist_like(tmp_path / "d.npz")

    first = every_client(npz_config(path, partition=partition, seed=1, data_seed=5))
    second = every_client(npz_config(path, partition=partition, seed=2, data_seed=5))

    assert_same_data(first, second)


def test_synthetic_devices_follow_the_data_seed_not_the_seed():
    first = every_client(RunConfig(**SYNTHETIC, seed=1, data_seed=3))
    second = every_client(RunConfig(**SYNTHETIC, seed=2, data_seed=3))
    other_data = every_client(RunConfig(**SYNTHETIC, seed=1, data_seed=4))

    assert_same_data(first, second)
    assert not np.array_equal(first[0].x_train[:5], other_data[0].x_train[:5])


def test_by_default_the_data_is_drawn_with_the_seed_as_it_always_was(tmp_path):
    # Prepare
    cfg = RunConfig(**SYNTHETIC, seed=1)
    path = mnist_like(tmp_path / "d.npz", with_test=True)  # a test split: no local holdout

    # Execute
    client = load_federation(cfg).client(2)
    parts = [load_federation(npz_config(path, partition="shards", seed=9)).client(k) for k in range(4)]

    # Assert: the numbers this federation had before `data-seed` existed
    assert (client.x_train.shape, client.x_test.shape) == ((43, 60), (11, 60))
    assert client.x_test[0, 0] == np.float32(0.159933403134346)
    device_x, _ = synthetic_device(2, alpha=1.0, beta=1.0, seed=1, max_samples=200)
    held = np.concatenate([client.x_train, client.x_test])
    np.testing.assert_array_equal(np.sort(held[:, 0]), np.sort(device_x[:, 0]))
    assert_same_data(every_client(cfg), every_client(cfg.replace(seed=7, data_seed=1)))
    # the partition is the partitioner's draw from a generator seeded with `seed`
    with np.load(path) as f:
        x, y = f["x_train"].reshape(120, -1) / np.float32(255), f["y_train"]
    for part, indices in zip(parts, partitioners.shards(y, 4, 2, np.random.default_rng(9))):
        np.testing.assert_array_equal(part.x_train, x[indices])


def test_the_papers_sizes_give_one_device_most_samples_with_seed_1():
    sizes = synthetic_sizes(30, seed=1)

    assert sizes.max() / sizes.sum() == pytest.approx(0.81, abs=0.005)


def test_a_deployed_clients_own_file_is_split_with_the_data_seed(tmp_path):
    path = mnist_like(tmp_path / "own.npz")

    first = load_local(path, RunConfig(seed=1, data_seed=8))
    second = load_local(path, RunConfig(seed=2, data_seed=8))
    by_seed = load_local(path, RunConfig(seed=8))

    assert_same_data([first, by_seed], [second, first])


@pytest.mark.parametrize(
    ("dataset", "model", "reads"),
    [
        ("mnist", "2nn", "an NPZ with x_train, y_train, x_test, y_test"),
        ("femnist", "mlp", "an NPZ with x, y, writer, is_test"),
        ("csv", "mlp", "a CSV file with a header row and a 'label' column"),
        ("imdb", "transformer-classifier", "JSON lines with text and label"),
    ],
)
def test_missing_data_says_what_it_should_be_and_where_to_get_it(tmp_path, dataset, model, reads):
    missing = tmp_path / "nowhere" / "data.file"

    with pytest.raises(DataError) as err:
        load_federation(RunConfig(dataset=dataset, model=model, data_path=str(missing)))

    message = str(err.value)
    assert message.startswith(f"data-path {missing} does not exist: dataset '{dataset}' reads {reads}")
    assert message.endswith("how to get it: docs/simulation.md#datasets") and "\n" not in message


def test_unset_data_path_says_so_and_where_to_get_the_data():
    unset = r"^config key 'data-path' is not set: dataset 'mnist' reads an NPZ.*#datasets$"
    with pytest.raises(DataError, match=unset):
        load_federation(RunConfig(dataset="mnist", model="2nn"))
