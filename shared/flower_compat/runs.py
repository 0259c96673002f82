"""Runs and task identities: what an in-process Grid (simulations/grid.py) hands out as a SuperLink would.

`Grid.set_run`/`Grid.run` take and give Flower's `Run`, and `Message(content, dst, type)` stamps
its run and source node from `TaskIdentity`, which only Flower's task runners set.
"""

from __future__ import annotations

from typing import Any

from shared.flower_compat import flower_symbols

with flower_symbols("runs"):
    from flwr.supercore.constant import NOOP_FEDERATION_ID  # the federation of a run outside any
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

__all__ = ["NOOP_FEDERATION_ID", "Run", "TaskIdentity", "set_task_identity", "new_run"]


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Set the identity this process runs as: messages created from now on carry its run and node.

    Relies on `Message(content, dst_node_id, message_type)` taking `run_id` and `src_node_id`
    from `TaskIdentity`'s class-level properties, which Flower sets from the task it runs.
    """
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def new_run(
    run_id: int,
    *,
    override_config: dict[str, Any] | None = None,
    primary_task_id: int | None = None,
    federation_id: str | None = None,
) -> Run:
    """A Run as the SuperLink would hand it to a Grid, with the given fields set.

    Relies on `Run.create_empty(run_id)` and on `Run` being a mutable dataclass with the fields
    `override_config`, `primary_task_id` and `federation_id`.
    """
    run = Run.create_empty(run_id)
    if override_config is not None:
        run.override_config = dict(override_config)
    if primary_task_id is not None:
        run.primary_task_id = primary_task_id
    if federation_id is not None:
        run.federation_id = federation_id
    return run
