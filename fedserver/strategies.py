"""The strategy named in the run config, built from Flower's `flwr.serverapp.strategy`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from shared.config import ConfigError, RunConfig


def _server_lr(cfg: RunConfig) -> dict[str, float]:
    # 0 keeps each server optimizer's own default learning rate.
    return {"eta": cfg.server_lr} if cfg.server_lr > 0 else {}


def _fedavgm(cfg: RunConfig) -> dict[str, Any]:
    lr = {"server_learning_rate": cfg.server_lr} if cfg.server_lr > 0 else {}
    return {"server_momentum": cfg.server_momentum, **lr}


# Strategy name -> (Flower class, its own keyword arguments from the config).
STRATEGIES: dict[str, tuple[type[Strategy], Callable[[RunConfig], dict[str, Any]]]] = {
    "fedavg": (FedAvg, lambda cfg: {}),
    "fedprox": (FedProx, lambda cfg: {"proximal_mu": cfg.proximal_mu}),
    "fedadam": (FedAdam, _server_lr),
    "fedyogi": (FedYogi, _server_lr),
    "fedadagrad": (FedAdagrad, _server_lr),
    "fedavgm": (FedAvgM, _fedavgm),
    "fedmedian": (FedMedian, lambda cfg: {}),
    "fedtrimmedavg": (FedTrimmedAvg, lambda cfg: {"beta": cfg.trim_beta}),
    "krum": (Krum, lambda cfg: {"num_malicious_nodes": cfg.num_malicious}),
    "multikrum": (
        MultiKrum,
        lambda cfg: {
            "num_malicious_nodes": cfg.num_malicious,
            "num_nodes_to_select": max(1, cfg.clients_per_round - cfg.num_malicious),
        },
    ),
    "bulyan": (Bulyan, lambda cfg: {"num_malicious_nodes": cfg.num_malicious}),
}


def build_strategy(cfg: RunConfig, *, federated_evaluation: bool) -> Strategy:
    """Flower's strategy for `cfg.strategy`, sampling exactly `clients-per-round` nodes a round."""
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{cfg.strategy}'; allowed: {', '.join(STRATEGIES)}")
    cls, own_kwargs = STRATEGIES[cfg.strategy]
    eval_clients = (cfg.eval_clients or cfg.num_clients) if federated_evaluation else 0
    return cls(
        # fraction * nodes may round down; the minimum makes the sample exactly clients-per-round.
        fraction_train=cfg.clients_per_round / cfg.num_clients,
        min_train_nodes=cfg.clients_per_round,
        fraction_evaluate=min(eval_clients, cfg.num_clients) / cfg.num_clients,
        min_evaluate_nodes=min(eval_clients, cfg.num_clients),
        min_available_nodes=cfg.num_clients,
        **own_kwargs(cfg),
    )
