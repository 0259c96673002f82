import dataclasses
from pathlib import Path

import pytest

from shared.config import ConfigError, RunConfig, load_config, parse_override


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nstrategy = "fedadam"\nlr = 1\n')

    cfg = load_config(path, ["rounds=9", "strategy=fedprox"])

    assert cfg.rounds == 9
    assert cfg.strategy == "fedprox"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.batch_size == RunConfig().batch_size


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'round'.*Did you mean 'rounds'"):
        load_config(None, ["round=5"])


def test_wrong_type_names_key_and_type():
    with pytest.raises(ConfigError, match=r"'rounds' must be int, got str"):
        RunConfig.from_mapping({"rounds": "ten"})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="'rounds' must be int, got bool"):
        RunConfig.from_mapping({"rounds": True})


def test_unknown_choice_lists_allowed():
    with pytest.raises(ConfigError, match=r"'strategy' is 'fedfoo'; allowed: fedavg, fedprox"):
        RunConfig.from_mapping({"strategy": "fedfoo"})


def test_more_clients_per_round_than_clients():
    with pytest.raises(ConfigError, match="'clients-per-round' \\(11\\) is more than 'num-clients' \\(10\\)"):
        RunConfig.from_mapping({"num-clients": 10, "clients-per-round": 11})
    # A natural split takes its number of clients from the data (checked when it is loaded).
    assert RunConfig.from_mapping({"num-clients": 10, "clients-per-round": 11, "partition": "natural"})


def test_missing_and_malformed_file_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_config(bad)


def test_override_needs_key_and_value():
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("dataset=mnist") == ("dataset", "mnist")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_override("lr")


def test_toml_and_mapping_round_trip():
    import tomllib

    cfg = RunConfig.from_mapping({"dataset": "mnist", "data-path": 'C:\\x "y"', "stop-at-target": True})

    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert RunConfig.from_mapping(tomllib.loads(cfg.to_toml())) == cfg


def test_frozen():
    with pytest.raises(Exception):
        RunConfig().rounds = 3


def test_every_key_has_a_section_and_a_meaning():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata["section"].title and f.metadata["meaning"].strip(), f.name


def test_relative_paths_in_a_file_resolve_against_its_folder_and_are_stored_absolute(tmp_path, monkeypatch):
    # Prepare: the config in one folder, the working directory another
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text('dataset = "mnist"\ndata-path = "../data/mnist.npz"\nrun-dir = "out"\n')
    monkeypatch.chdir(tmp_path)

    # Execute
    cfg = load_config(folder / "run.toml")
    monkeypatch.chdir("/")
    reread = load_config(_written(tmp_path / "elsewhere", cfg))

    # Assert
    assert cfg.data_path == str(tmp_path / "data" / "mnist.npz")
    assert cfg.run_dir == str(folder / "out")
    assert (reread.data_path, reread.run_dir) == (cfg.data_path, cfg.run_dir)


def _written(folder: Path, cfg: RunConfig) -> Path:
    folder.mkdir()
    (folder / "config.toml").write_text(cfg.to_toml())
    return folder / "config.toml"


def test_relative_path_in_an_override_resolves_against_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.toml").write_text('data-path = "in-file.npz"\n')
    monkeypatch.chdir(tmp_path)

    cfg = load_config(tmp_path / "conf" / "run.toml", ["data-path=data/mnist.npz", 'run-dir="runs/a"'])

    assert cfg.data_path == str(tmp_path / "data" / "mnist.npz")
    assert cfg.run_dir == str(tmp_path / "runs" / "a")


def test_empty_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "run.toml"
    path.write_text('data-path = "~/d.npz"\nrun-dir = ""\n')

    assert load_config(path).data_path == str(tmp_path / "d.npz")
    assert load_config(path).run_dir == ""
    assert load_config(None, ["data-path=/srv/data/x.npz"]).data_path == "/srv/data/x.npz"


def test_a_path_of_the_wrong_type_is_a_config_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("data-path = 3\n")

    with pytest.raises(ConfigError, match="'data-path' must be str, got int"):
        load_config(path)


def test_data_seed_is_the_seed_unless_set():
    assert RunConfig(seed=7).effective_data_seed == 7
    assert RunConfig(seed=7, data_seed=0).effective_data_seed == 0
    assert RunConfig.from_mapping({"seed": 3, "data-seed": 11}).effective_data_seed == 11
    with pytest.raises(ConfigError, match="'data-seed' must be >= 0, or -1 for the same as 'seed', got -2"):
        RunConfig(data_seed=-2)


def test_the_default_evaluation_cohort_is_bounded_by_the_round_not_the_federation():
    assert RunConfig(num_clients=10_000, clients_per_round=100).eval_cohort(10_000) == 100
    assert RunConfig(num_clients=10_000, clients_per_round=10).eval_cohort(10_000) == 100  # at least 100
    assert RunConfig(num_clients=10_000, clients_per_round=500).eval_cohort(10_000) == 500
    assert RunConfig(num_clients=30, clients_per_round=10).eval_cohort(30) == 30  # small federations: all
    assert RunConfig(num_clients=10_000, clients_per_round=100).eval_cohort(40) == 40  # only those connected


def test_eval_clients_asks_for_a_number_or_every_client():
    assert RunConfig(num_clients=10_000, eval_clients=7).eval_cohort(10_000) == 7
    assert RunConfig(num_clients=10_000, eval_clients=-1).eval_cohort(10_000) == 10_000
    assert RunConfig(num_clients=30, eval_clients=50).eval_cohort(30) == 30
    with pytest.raises(ConfigError, match="'eval-clients' must be >= 0, or -1 for every client, got -2"):
        RunConfig(eval_clients=-2)


def test_eval_every_evaluates_its_multiples_and_the_last_round():
    cfg = RunConfig(rounds=7, eval_every=3)

    assert [r for r in range(1, 8) if cfg.evaluates(r)] == [3, 6, 7]
    assert all(RunConfig(rounds=4).evaluates(r) for r in range(1, 5))
    with pytest.raises(ConfigError, match="'eval-every' must be >= 1, got 0"):
        RunConfig(eval_every=0)


def test_every_config_key_is_classified_and_every_path_is_device_owned():
    from shared.config import DEVICE_OWNED, KEY_ROLES, PATH_KEYS, RECIPE, SERVER_ONLY

    keys = set(RunConfig().to_mapping())

    assert set(KEY_ROLES) == keys  # a new key must be classified before it can be used
    assert set(KEY_ROLES.values()) == {RECIPE, SERVER_ONLY, DEVICE_OWNED}
    assert PATH_KEYS and all(KEY_ROLES[key] == DEVICE_OWNED for key in PATH_KEYS)


def test_a_device_takes_the_servers_recipe_but_none_of_its_device_owned_keys(tmp_path):
    from shared.config import device_config

    server = {"dataset": "csv", "data-path": "/etc/shadow", "run-dir": str(tmp_path), "lr": 0.5, "tokenizer-path": ""}

    cfg, ignored = device_config(server)

    assert (cfg.data_path, cfg.run_dir, cfg.lr, cfg.dataset) == ("", "", 0.5, "csv")
    assert ignored == ["data-path", "run-dir"]  # the empty tokenizer-path asks for nothing
