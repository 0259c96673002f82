"""The presets in configs/ parse, and the ones on real data run (skipping when data is absent)."""

from pathlib import Path

import pytest

from shared.config import load_config
from simulations.engine import run_simulation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_is_a_valid_config(path):
    assert load_config(path).rounds >= 1


def test_preset_data_paths_name_shared_datasets_beside_the_checkout():
    # A relative data-path is relative to the preset's folder, so ../../shared/datasets from
    # configs/ is the ../shared/datasets that sits beside the repository.
    beside = (CONFIGS.parent.parent / "shared" / "datasets").resolve()

    folders = {Path(cfg.data_path).parent for cfg in map(load_config, CONFIGS.glob("*.toml")) if cfg.data_path}

    assert folders == {beside}


def real_data_config(name: str, data: Path, *overrides: str):
    return load_config(CONFIGS / name, [f'data-path="{data}"', *overrides])


def test_mnist_2nn_iid_learns_fast(tmp_path, dataset):
    cfg = real_data_config("mnist-2nn-iid.toml", dataset("mnist.npz"), "rounds=5")

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    assert result.summary["rounds"] == 5
    assert result.summary["final_accuracy"] > 0.85  # measured 0.896 after 5 rounds; chance is 0.1


def test_mnist_noniid_gives_each_client_two_labels(dataset):
    from shared.data.federation import load_federation

    cfg = real_data_config("mnist-2nn-noniid.toml", dataset("mnist.npz"))

    federation = load_federation(cfg)

    labels_per_client = [len(set(federation.client(k).y_train.tolist())) for k in range(federation.num_clients)]
    assert federation.num_clients == 100
    # A shard of 300 sorted examples can straddle two labels, so "most clients have two digits".
    assert sum(n <= 2 for n in labels_per_client) >= 80
    assert max(labels_per_client) <= 4


def test_femnist_splits_by_writer(tmp_path, dataset):
    cfg = real_data_config("femnist-mlp.toml", dataset("femnist_leaf_subset.npz"), "rounds=2")

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    written = load_config(tmp_path / "run" / "config.toml")
    assert written.num_clients == 105
    assert result.summary["rounds"] == 2


def test_mnist_cnn_iid_learns_in_one_short_round(tmp_path, dataset):
    # Two clients, one epoch each: a cheap round of the preset's model and data.
    short = ("rounds=1", "clients-per-round=2", "local-epochs=1")
    cfg = real_data_config("mnist-cnn-iid.toml", dataset("mnist.npz"), *short)

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    assert result.summary["rounds"] == 1 and "rounds_to_target" in result.summary
    assert result.summary["final_accuracy"] > 0.5  # measured 0.614; chance is 0.1


def test_imdb_by_movie_gives_each_movie_a_client(dataset):
    from shared.data.federation import load_federation

    cfg = real_data_config("imdb-by-movie.toml", dataset("imdb.jsonl.gz"))

    federation = load_federation(cfg)

    sizes = sorted(len(federation.client(k).y_train) for k in range(federation.num_clients))
    # 1,322 movies with 5 to 30 training reviews each, and one client pooling the smaller movies' 4,254
    assert federation.num_clients == 1323 and sum(sizes) == 20_000
    assert sizes[0] == 5 and sizes[-2] == 30 and sizes[-1] == 4254


def test_mnist_dp_noise_reaches_its_target_epsilon_in_its_rounds():
    # z is calibrated (docs/privacy.md#privacy-and-utility) so that the preset's rounds end at
    # ε just under dp-target-epsilon: no round is lost to the target, and no noise is wasted.
    pytest.importorskip("dp_accounting")
    from fedserver.privacy import PoissonAccountant

    cfg = load_config(CONFIGS / "mnist-dp.toml")
    accountant = PoissonAccountant.for_config(cfg)

    assert (cfg.dp, cfg.num_clients, cfg.clients_per_round, cfg.dp_delta) == ("central", 3000, 100, 1e-5)
    assert 0.98 * cfg.dp_target_epsilon < accountant.epsilon(cfg.rounds) <= cfg.dp_target_epsilon == 4


def test_mnist_dp_gives_3000_clients_20_examples_and_runs_privately(tmp_path, dataset):
    from shared.data.federation import load_federation

    cfg = real_data_config("mnist-dp.toml", dataset("mnist.npz"), "rounds=2", "local-epochs=1")

    federation = load_federation(cfg)
    result = run_simulation(cfg, tmp_path / "run", progress=False)

    assert {len(federation.client(k).y_train) for k in range(federation.num_clients)} == {20}
    assert result.summary["rounds"] == 2
    assert 0 < result.summary["epsilon"] < cfg.dp_target_epsilon  # two releases of the budget's rounds
