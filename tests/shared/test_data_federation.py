"""A federation's data is drawn with the data seed, and a missing dataset says where to get it."""

import gzip
import json

import numpy as np
import pytest

from shared.config import RunConfig
from shared.data import DataError
from shared.data import partition as partitioners
from shared.data.federation import ClientData, check_local, load_federation, load_local
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


# ---------------------------------------------------------------- a device checks its own data


def write_leaf(path, users):
    path.write_text(json.dumps({"users": list(users), "user_data": users}))
    return path


@pytest.mark.parametrize(
    ("name", "write", "summary"),
    [
        ("own.npz", lambda p: mnist_like(p, n=30, with_test=True),
         "40 examples (10 of them test), 16 features, labels 0..2"),
        ("own.csv", lambda p: p.write_text("a,b,label\n1,2,0\n3,4,9\n"), "2 examples, 2 features, labels 0..9"),
        ("own.json", lambda p: write_leaf(p, {"u": {"x": [[1.0], [2.0]], "y": [4, 5]}}),
         "2 examples, 1 feature, labels 4..5"),
        ("own.jsonl", lambda p: p.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'),
         "text: 2 records, labels 0..1"),
        ("lines.jsonl", lambda p: p.write_text('{"text": "to be"}\n'), "text: 5 characters"),
        ("own.txt", lambda p: p.write_text("or not to be"), "text: 12 characters"),
    ],
)  # fmt: skip
def test_a_devices_data_is_summarised_without_knowing_the_run(tmp_path, name, write, summary):
    path = tmp_path / name
    write(path)

    assert check_local(path) == summary


@pytest.mark.parametrize(
    ("name", "write", "problem"),
    [
        ("x.npz", lambda p: p.write_text("a text file"), "x.npz: not an npz (zip) archive"),
        ("x.bin", lambda p: p.write_text("1,2"), "x.bin: unknown data format; a device's data is an .npz, a .csv"),
        ("x.npz", lambda p: p.write_text(""), "x.npz: empty file"),
        ("x.csv", lambda p: p.write_text("a,label\n1,cat\n"), "x.csv: text class labels (e.g. 'cat')"),
        ("x.csv", lambda p: p.write_text("a,label\n1,0\n-Infinity,1\n"),
         "x.csv: line 3, column 'a': '-Infinity' is not a finite number"),
        ("x.csv", lambda p: p.write_text("a,label\n1,0\n2,1.5\n"), "x.csv: line 3: label '1.5' is not an integer"),
        ("x.npz", lambda p: np.savez(p, x=np.array([[0.0], [np.nan]]), y=[0, 1]),
         "x.npz: train example 1, feature 0: nan is not a finite number"),
        ("x.jsonl", lambda p: p.write_text('{"text": "a", "label": 1.5}\n'), "x.jsonl: line 1: label 1.5 is not"),
        ("x.json", lambda p: write_leaf(p, {"u": {"x": ["to be"], "y": ["o"]}}), "x.json: the features are text"),
        ("x.json", lambda p: write_leaf(p, {}), "data path {path} holds no examples"),
        ("x.txt", lambda p: p.write_text(" \n"), "x.txt: no text"),
    ],
)  # fmt: skip
def test_a_devices_data_that_no_run_could_train_on_is_refused_in_one_line(tmp_path, name, write, problem):
    # Prepare
    path = tmp_path / name
    write(path)

    # Execute
    with pytest.raises(DataError) as refused:
        check_local(path)

    # Assert: the file named, the problem (and where), one line
    message = str(refused.value)
    assert problem.format(path=path) in message and str(path) in message and "\n" not in message


def test_load_local_refuses_what_check_local_refuses(tmp_path):
    # Prepare: LEAF JSON without users (load_local once failed on it with a bare numpy ValueError)
    path = write_leaf(tmp_path / "none.json", {})

    # Execute / Assert
    with pytest.raises(DataError, match=f"^data path {path} holds no examples$"):
        load_local(path, RunConfig())


def test_a_simulation_on_a_csv_with_nan_is_refused_before_it_starts(tmp_path):
    # Prepare: a NaN on line 3 (before, the client holding it was dropped every round: "train_loss nan")
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,NaN,1\n5,6,0\n7,8,1\n")

    # Execute / Assert
    with pytest.raises(DataError, match=f"^{path}: line 3, column 'b': 'NaN' is not a finite number$"):
        load_federation(RunConfig(dataset="csv", model="mlp", data_path=str(path), num_clients=2, clients_per_round=2))


def test_fedsim_on_a_csv_with_nan_exits_2_with_one_line(tmp_path, capsys):
    from simulations import cli  # noqa: PLC0415 - the simulator, only for this end-to-end check

    # Prepare
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,inf,1\n5,6,0\n7,8,1\n")
    run = ["run", "--set", "dataset=csv", "--set", f'data-path="{path}"', "--set", "num-clients=2"]

    # Execute
    code = cli.main([*run, "--set", "clients-per-round=2", "--output", str(tmp_path / "out")])

    # Assert
    assert code == 2
    assert capsys.readouterr().err == f"fedsim: error: {path}: line 3, column 'b': 'inf' is not a finite number\n"


def test_a_femnist_file_with_an_infinite_pixel_is_refused_naming_it(tmp_path):
    path = tmp_path / "femnist.npz"
    x = np.zeros((4, 784), np.float32)
    x[2, 5] = np.inf
    np.savez(path, x=x, y=np.arange(4), writer=np.array(["a", "a", "b", "b"]), is_test=np.array([0, 1, 0, 1]))

    with pytest.raises(DataError, match="femnist.npz: FEMNIST example 2, feature 5: inf is not a finite number"):
        load_federation(RunConfig.from_mapping({"dataset": "femnist", "data-path": str(path), "num-clients": 2,
                                                "clients-per-round": 1}))  # fmt: skip
