"""What the SuperLink reports and is told, as plain values: a run's and a node's status as its
Control API gives them (`fedserver status`, the dashboard) and the `--database` name of its
in-memory state (the daemon).

This module imports no Flower: `fedserver status` and the dashboard start without it (importing
Flower costs about half a second). The canary test checks each value against Flower's constants.
"""

from __future__ import annotations

from typing import Final

# A run that ended in failure: Status.FINISHED and SubStatus.FAILED, joined by ":" as `flwr ls`
# joins them (`fedserver.control.RunInfo.status`).
RUN_FAILED: Final = "finished:failed"
# A node whose heartbeats are current: NodeStatus.ONLINE.
NODE_ONLINE: Final = "online"
# `flower-superlink --database` for Flower's in-memory state: FLWR_IN_MEMORY_DB_NAME.
IN_MEMORY_DATABASE: Final = ":flwr-in-memory:"
