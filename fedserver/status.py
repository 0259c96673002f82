"""`fedserver status` and the dashboard's `/api/status`: one document, built by `build_status` from
a run's model (`fedserver.dashboard.model.RunModel`).

`fedserver status` builds that model from the run directory (events.jsonl, or metrics.jsonl where a
run has none, and nodes.json from `fedserver.node_ledger`), which stays readable when the daemon
does not run, and adds the SuperLink's runs and nodes from its Control API (what `flwr ls` and
`flwr supernode ls` show) while it runs; the daemon and fedsim keep the same model live.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedserver.checkpoints import STATE_FILE, read_metrics
from fedserver.dashboard.model import RunModel, run_summary
from fedserver.events import EVENTS_FILE, EventFollower
from fedserver.node_ledger import NodeLedger
from fedserver.state import DaemonInfo, StateDir
from shared.config import ConfigError, RunConfig
from shared.flower_compat.superlink import RUN_FAILED

if TYPE_CHECKING:
    from fedserver.control import ControlClient

ROW_KEYS = ("at", "replies")  # a model's round keys that are not metrics.jsonl's


@dataclass
class Status:
    """One snapshot; `to_json()` is what `fedserver status --json` prints and `/api/status` serves."""

    state_dir: str | None
    running: bool
    pid: int | None = None
    address: str | None = None
    run_id: int | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)  # the SuperLink's: node_id, name, status
    connected_nodes: int = 0
    rounds_completed: int = 0
    last_metrics: dict[str, Any] | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)  # nodes.json: each node's replies and errors
    last_run: dict[str, Any] | None = None  # without a daemon: its run as it last saw it (daemon.json)
    error: str | None = None  # why runs/nodes are missing though the daemon runs, or why the run failed
    kind: str = "deployment"  # or "simulation"
    state: str = "running"  # the run's: "running", a SuperLink status ("finished:completed", ...), "finished"
    run: dict[str, Any] | None = None  # what runs (dataset, model, strategy, clients, secure aggregation, dp)
    rounds: int | None = None  # the rounds the run is configured for
    elapsed_seconds: float = 0.0  # the committed rounds' own time, summed
    seconds_per_round: float | None = None  # the last round's
    secure_aggregation: dict[str, Any] | None = None  # with secure aggregation: threshold, neighbours, last sum
    privacy: dict[str, Any] | None = None  # under DP: the mechanism, epsilon spent, the target, delta

    @property
    def failed(self) -> bool:
        """Whether the daemon's own run ended in failure (`fedserver status` then exits 1)."""
        return any(run["run_id"] == self.run_id and run["status"] == RUN_FAILED for run in self.runs)

    def document(self) -> dict[str, Any]:
        """The JSON object, field by field (build_status makes each nested value afresh: no deep copy)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.document())


def build_status(model: RunModel, *, devices: list[dict[str, Any]] | None = None,
                 names: Mapping[int, str] | None = None) -> Status:  # fmt: skip
    """The status document of `model`; `devices` the ledger's entries where read from nodes.json
    (default: the model's), `names` node names where the operator mapped them (default: the SuperLink's)."""
    completed, elapsed, last = model.progress()
    nodes = model.nodes(names)
    daemon = model.daemon
    status = Status(
        state_dir=daemon.get("state_dir"), running=bool(daemon.get("running", True)), pid=daemon.get("pid"),
        address=daemon.get("address"), run_id=daemon.get("run_id"), runs=list(daemon.get("runs", [])),
        error=daemon.get("error"), last_run=daemon.get("last_run"), kind=model.kind, state=model.state, run=model.run,
    )  # fmt: skip
    status.nodes = [{"node_id": n["node_id"], "name": n["name"], "status": n["status"]} for n in nodes if n["status"]]
    status.connected_nodes = model.connected()
    status.rounds_completed = completed
    status.last_metrics = {k: v for k, v in last.items() if k not in ROW_KEYS} if last else None
    status.devices = devices if devices is not None else [_ledger_entry(n) for n in nodes if n["replies"]]
    status.rounds = (model.run or {}).get("rounds") or daemon.get("rounds")
    status.elapsed_seconds = round(elapsed, 3)
    status.seconds_per_round = last.get("seconds") if last else None
    status.secure_aggregation = _secure_aggregation(model.run, last)
    status.privacy = _privacy(model.run, last)
    return status


def _ledger_entry(node: dict[str, Any]) -> dict[str, Any]:
    keys = ("node_id", "accepted", "rounds_refused", "rounds_failed", "last_code", "last_round",
            "last_refused_round", "last_failed_round", "last_message")  # fmt: skip
    return {key: node[key] for key in keys}


def _secure_aggregation(run: dict[str, Any] | None, last: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run or not run.get("secure_aggregation"):
        return None
    last_sum = last["replies"]["accepted"] if last else None
    return {"threshold": run["secagg_threshold"], "neighbours": run["secagg_neighbours"], "last_round_accepted": last_sum}


def _privacy(run: dict[str, Any] | None, last: dict[str, Any] | None) -> dict[str, Any] | None:
    if not run or run.get("dp", "none") == "none":
        return None
    last = last or {}
    return {"dp": run["dp"], "epsilon": last.get("epsilon"), "target_epsilon": run.get("dp_target_epsilon") or None,
            "delta": run.get("dp_delta"), "stopped": last.get("stopped")}  # fmt: skip


def collect(state_dir: Path) -> Status:
    """Everything `fedserver status` shows for the daemon of `state_dir`."""
    state = StateDir(state_dir)
    pid = state.read_pid()
    info = DaemonInfo.read(state.info)
    model = model_from_run_dir(state.run_dir)
    model.daemon.update(state_dir=str(state.root), running=pid is not None, pid=pid)
    model.state = (info.run_status if info is not None else "") or ("running" if pid is not None else "stopped")
    if info is not None:
        model.daemon.update(address=info.address, run_id=info.run_id, rounds=info.rounds)
    if pid is not None and info is not None:
        from fedserver.control import ControlClient  # Flower's Control client: only to ask a running daemon

        try:
            with ControlClient(info.control_address, Path(info.ca)) as control:
                refresh_live(model, control, info)
        except OSError as err:
            model.daemon["error"] = str(err)
    elif info is not None and info.run_status:
        model.daemon["last_run"] = {"run_id": info.run_id, "status": info.run_status, "details": info.run_details,
                                    "rounds": info.rounds}  # fmt: skip
    return build_status(model, devices=NodeLedger.read(state.run_dir).entries())


def model_from_run_dir(run_dir: Path) -> RunModel:
    """A deployment's model as its run directory has it: each round of events.jsonl (metrics.jsonl's
    where there is none), the config of its committed state."""
    model = RunModel("deployment", _committed_run(run_dir))
    _, records = EventFollower(run_dir / EVENTS_FILE).poll()
    records = records or read_metrics(run_dir)
    written = os.stat(run_dir).st_mtime if records else None  # when a round was last told, at the latest
    for record in records:
        model.add(record, at=written)
    return model


def _committed_run(run_dir: Path) -> dict[str, Any] | None:
    try:
        return run_summary(RunConfig.from_mapping(json.loads((run_dir / STATE_FILE).read_text())["config"]))
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
        return None


def refresh_live(model: RunModel, control: ControlClient, info: DaemonInfo) -> None:
    """The SuperLink's runs and nodes into `model` (`error` set where it cannot be asked)."""
    from fedserver.control import ControlError

    try:
        runs, nodes = control.list_runs(), control.list_nodes()
    except ControlError as err:
        model.daemon["error"] = str(err)
        return
    completed, _, _ = model.progress()
    listed, error = [], None
    for run in runs:
        ours = run.run_id == info.run_id
        current = min(completed + 1, info.rounds) if ours and run.active else (completed if ours else None)
        listed.append(
            {"run_id": run.run_id, "status": run.status, "current_round": current, "rounds": info.rounds if ours else None,
             "details": run.details}
        )  # fmt: skip
        if ours:
            model.state = run.status
        if ours and run.status == RUN_FAILED:
            error = f"run {run.run_id} failed: {run.details or 'no reason given; see superlink.log'}"
    model.daemon.update(runs=listed, error=error)
    model.set_superlink_nodes(nodes)


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
    why = f" ({run['details']})" if run["details"] and run["status"] == RUN_FAILED else ""
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
