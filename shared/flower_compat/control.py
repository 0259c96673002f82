"""The SuperLink's Control API, as the `flwr` CLI speaks it (fedserver/control.py): register node keys,
start, stop and list runs, list nodes. Flower offers it only through its CLI, whose output is for people.

Imports Flower's CLI packages, which are slow to import: only the daemon and its tests import this module.
"""

from __future__ import annotations

from shared.flower_compat import flower_symbols

with flower_symbols("control"):
    # The HTTP client, its interceptors (the CLI's identity, the runtime version check) and errors.
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.error import FlowerError
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    # The requests, and how a FAB, a run config and a node's public key go into them.
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import (
        ListNodesRequest,
        ListRunsRequest,
        RegisterNodeRequest,
        StartRunRequest,
        StopRunRequest,
        UnregisterNodeRequest,
    )
    from flwr.supercore.fab import Fab
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    # What the answers say: a run's status ("finished:<sub-status>" once done), a node's status,
    # and the error codes (a node key that is registered already).
    from flwr.common.constant import Status
    from flwr.supercore.constant import NodeStatus
    from flwr.supercore.error import ApiErrorCode

__all__ = [
    "ApiErrorCode",
    "CliClientHttpInterceptor",
    "ControlHttpClient",
    "Fab",
    "FlowerError",
    "ListNodesRequest",
    "ListRunsRequest",
    "NodeStatus",
    "RegisterNodeRequest",
    "RuntimeVersionHttpInterceptor",
    "StartRunRequest",
    "Status",
    "StopRunRequest",
    "UnregisterNodeRequest",
    "build_fab_from_disk",
    "fab_to_proto",
    "public_key_to_bytes",
    "user_config_to_proto",
]
