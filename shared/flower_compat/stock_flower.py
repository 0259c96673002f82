"""Stock Flower's own runners: the entry `flwr run` uses for a Ray simulation (`backend = "ray"`,
simulations/ray_engine.py; unlike the public `run_simulation()`, it passes a run config to the
apps), and what Flower's legacy SecAgg+ workflow needs to run on a given Grid (the baseline of
benchmarks/secagg_overhead.py).

Imports Flower's simulation package, which is slow to import: imported by those two only, when they run.
"""

from __future__ import annotations

from shared.flower_compat import flower_symbols

with flower_symbols("stock_flower"):
    from flwr.simulation.run_simulation import _run_simulation as run_simulation_with_context
    from flwr.supercore.telemetry import EventType

    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters, parameters_to_arrayrecord
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

__all__ = [
    "EventType",
    "GridClientProxy",
    "MAIN_CONFIGS_RECORD",
    "MAIN_PARAMS_RECORD",
    "WorkflowKey",
    "arrayrecord_to_parameters",
    "parameters_to_arrayrecord",
    "run_simulation_with_context",
]
