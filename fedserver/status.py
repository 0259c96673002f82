"""`fedserver status`: the daemon, its runs, its nodes, the devices that refused or failed a task,
and the last round's metrics.

Runs and nodes come from the SuperLink's Control API (what `flwr ls` and `flwr supernode ls`
show) while the daemon runs; the metrics and the devices' errors from the run directory's
metrics.jsonl and nodes.json (`fedserver.node_ledger`), which stay readable when it does not.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedserver.checkpoints import read_metrics
from fedserver.control import ControlClient, ControlError
from fedserver.node_ledger import NodeLedger
from fedserver.state import DaemonInfo, StateDir

FAILED = "finished:failed"


@dataclass
class Status:
    """One snapshot; `to_json()` is what `fedserver status --json` prints."""

    state_dir: str
    running: bool
    pid: int | None = None
    address: str | None = None
    run_id: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    connected_nodes: int = 0
    rounds_completed: int = 0
    last_metrics: dict[str, Any] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)  # nodes.json: each node's replies and errors
    last_run: dict[str, Any] | None = None  # without a daemon: its run as it last saw it (daemon.json)
    error: str | None = None  # why runs/nodes are missing though the daemon runs, or why the run failed

    @property
    def failed(self) -> bool:
        """Whether the daemon's own run ended in failure (`fedserver status` then exits 1)."""
        return any(run["run_id"] == self.run_id and run["status"] == FAILED for run in self.runs)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def collect(state_dir: Path) -> Status:
    """Everything `fedserver status` shows for the daemon of `state_dir`."""
    state = StateDir(state_dir)
    pid = state.read_pid()
    running = pid is not None
    info = DaemonInfo.read(state.info)
    rows = read_metrics(state.run_dir)
    status = Status(str(state.root), running, pid, rounds_completed=len(rows))
    status.last_metrics = rows[-1] if rows else None
    status.devices = NodeLedger.read(state.run_dir).entries()
    if info is not None:
        status.address, status.run_id = info.address, info.run_id
    if running and info is not None:
        _add_live(status, info, len(rows))
    elif info is not None and info.run_status:
        status.last_run = {"run_id": info.run_id, "status": info.run_status, "details": info.run_details,
                           "rounds": info.rounds}  # fmt: skip
    return status


def _add_live(status: Status, info: DaemonInfo, completed: int) -> None:
    try:
        with ControlClient(info.control_address, Path(info.ca)) as control:
            runs, nodes = control.list_runs(), control.list_nodes()
    except (ControlError, OSError) as err:
        status.error = str(err)
        return
    for run in runs:
        ours = run.run_id == info.run_id
        current = min(completed + 1, info.rounds) if ours and run.active else (completed if ours else None)
        status.runs.append(
            {"run_id": run.run_id, "status": run.status, "current_round": current, "rounds": info.rounds if ours else None,
             "details": run.details}
        )  # fmt: skip
        if ours and run.status == FAILED:
            status.error = f"run {run.run_id} failed: {run.details or 'no reason given; see superlink.log'}"
    status.nodes = [{"node_id": n.node_id, "name": n.name, "status": n.status} for n in nodes]
    status.connected_nodes = sum(n.status == "online" for n in nodes)


def render(status: Status) -> str:
    """The human-readable form."""
    if not status.running:
        lines = [f"fedserver: not running (state {status.state_dir})"]
    else:
        lines = [f"fedserver: running, pid {status.pid}, on {status.address} (state {status.state_dir})"]
    if status.error and not status.failed:
        lines.append(f"  cannot query the SuperLink: {status.error}")
    for run in status.runs:
        where = f", round {run['current_round']} of {run['rounds']}" if run["rounds"] else ""
        lines.append(f"  run {run['run_id']}: {run['status']}{where}")
    if status.failed:
        lines.append(f"  {status.error}")
    if status.last_run is not None:
        lines.append(f"  {_last_run_line(status.last_run, status.rounds_completed)}")
    if status.running and (not status.error or status.failed):
        named = ", ".join(f"{n['name'] or n['node_id']} {n['status']}" for n in status.nodes)
        lines.append(f"  nodes: {status.connected_nodes} connected of {len(status.nodes)} registered ({named})")
    lines += _device_lines(status)
    lines.append(f"  {_metrics_line(status)}")
    return "\n".join(lines)


def _last_run_line(run: dict[str, Any], completed: int) -> str:
    why = f" ({run['details']})" if run["details"] and run["status"] == FAILED else ""
    return f"run {run['run_id']} when the daemon stopped: {run['status']}{why}, {completed} of {run['rounds']} rounds done"


def _device_lines(status: Status) -> list[str]:
    """A heading and one line per node that ever refused or failed a task; none when no node did."""
    troubled = [device for device in status.devices if device["last_code"] is not None]
    if not troubled:
        return []
    names = {node["node_id"]: node["name"] for node in status.nodes if node["name"]}
    return ["  devices that refused or failed a task:", *(_device_line(device, names) for device in troubled)]


def _device_line(device: dict[str, Any], names: dict[int, str]) -> str:
    node = device["node_id"]
    named = f"node {node}" + (f" ({names[node]})" if node in names else "")
    return (
        f"    {named}: last error code {device['last_code']} ({device['last_message']}) in round "
        f"{device['last_round']}; rounds refused {device['rounds_refused']}, failed {device['rounds_failed']}"
    )


def _metrics_line(status: Status) -> str:
    row = status.last_metrics
    if row is None:
        return "no round completed yet"
    shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("round", "seconds") and isinstance(v, float))
    stopped = f"; the run stopped: {row['stopped']}" if row.get("stopped") else ""  # a DP run's budget
    return f"last round {row.get('round')}: {shown} ({row.get('seconds', 0):.1f} s){stopped}"
