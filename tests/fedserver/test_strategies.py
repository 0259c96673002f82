"""Each server optimizer starts from Flower's own defaults; an explicit setting wins."""

import inspect

import pytest
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedserver.strategies import build_strategy
from shared.config import ConfigError, RunConfig

# strategy name -> (Flower's class, its learning-rate argument)
SERVER_OPTIMIZERS = {
    "fedadam": (FedAdam, "eta"),
    "fedyogi": (FedYogi, "eta"),
    "fedadagrad": (FedAdagrad, "eta"),
    "fedavgm": (FedAvgM, "server_learning_rate"),
}


def flower_default(cls: type, argument: str) -> float:
    return inspect.signature(cls.__init__).parameters[argument].default


@pytest.mark.parametrize("strategy", SERVER_OPTIMIZERS)
def test_the_default_config_gives_flowers_own_learning_rate(tiny_config, strategy):
    cls, argument = SERVER_OPTIMIZERS[strategy]

    built = build_strategy(tiny_config(strategy=strategy), federated_evaluation=False)

    assert getattr(built, argument) == flower_default(cls, argument)


def test_the_default_config_gives_fedavgms_own_momentum(tiny_config):
    built = build_strategy(tiny_config(strategy="fedavgm"), federated_evaluation=False)

    assert built.server_momentum == flower_default(FedAvgM, "server_momentum")


@pytest.mark.parametrize("strategy", SERVER_OPTIMIZERS)
def test_an_explicit_server_lr_wins(tiny_config, strategy):
    _, argument = SERVER_OPTIMIZERS[strategy]

    built = build_strategy(tiny_config(strategy=strategy, server_lr=0.37), federated_evaluation=False)

    assert getattr(built, argument) == 0.37


def test_an_explicit_server_momentum_wins(tiny_config):
    built = build_strategy(tiny_config(strategy="fedavgm", server_momentum=0.9), federated_evaluation=False)

    assert built.server_momentum == 0.9


def test_the_documented_flower_defaults_are_flowers():
    meaning = {f.name: f.metadata["meaning"] for f in RunConfig.__dataclass_fields__.values()}["server_lr"]

    for strategy, (cls, argument) in SERVER_OPTIMIZERS.items():
        assert f"{strategy} {flower_default(cls, argument):g}" in meaning


@pytest.mark.parametrize(("key", "value"), [("server_lr", -0.1), ("server_momentum", 1.0), ("server_momentum", -0.5)])
def test_an_impossible_server_setting_is_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace("_", "-")):
        RunConfig(**{key: value})
