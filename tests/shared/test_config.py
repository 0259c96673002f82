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
