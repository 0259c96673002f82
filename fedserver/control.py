"""The SuperLink's Control API, as `flwr` (the CLI) speaks it: register and unregister nodes,
start, stop and list runs, list nodes.

Calls go through Flower's own protobuf-over-HTTPS client in this process rather than through
`flwr` subprocesses (about 2 s of start-up each: registering 100 node keys would take minutes).
Flower's client classes come from shared/flower_compat.py; the requests are the same
`flwr supernode register`, `flwr supernode unregister`, `flwr run`, `flwr stop`, `flwr ls` and `flwr supernode ls` send.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedserver.state import DaemonError
from shared.flower_compat.control import (
    ApiErrorCode,
    CliClientHttpInterceptor,
    ControlHttpClient,
    Fab,
    FlowerError,
    ListNodesRequest,
    ListRunsRequest,
    NodeStatus,
    RegisterNodeRequest,
    RuntimeVersionHttpInterceptor,
    StartRunRequest,
    Status,
    StopRunRequest,
    UnregisterNodeRequest,
    build_fab_from_disk,
    fab_to_proto,
    public_key_to_bytes,
    user_config_to_proto,
)

PUBLIC_KEY_IN_USE = ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE
ACTIVE_STATUSES = (Status.PENDING, Status.STARTING, Status.RUNNING)


class ControlError(DaemonError):
    """The Control API refused or could not be reached; the message is one line."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code  # Flower's error code, where the SuperLink gave one


@dataclass(frozen=True)
class RunInfo:
    run_id: int
    status: str  # "pending", "starting", "running", "finished:completed", "finished:failed", ...
    details: str
    running_at: str
    finished_at: str

    @property
    def active(self) -> bool:
        return self.status.split(":")[0] in ACTIVE_STATUSES


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    name: str
    status: str  # "registered", "online", "offline", "unregistered"
    last_activated_at: str
    public_key: bytes = b""  # as `load_public_key` gives it
    online_until: float = 0.0  # Unix time: its last heartbeat plus its heartbeat interval
    heartbeat_interval: float = 0.0  # seconds

    @property
    def last_seen(self) -> float | None:
        """Unix time of its last heartbeat, as the SuperLink counts it; None if it never sent one."""
        return self.online_until - self.heartbeat_interval if self.online_until else None

    @property
    def registered(self) -> bool:
        return self.status != NodeStatus.UNREGISTERED


class ControlClient:
    """A connection to one SuperLink's Control API over TLS."""

    def __init__(self, address: str, ca_file: Path) -> None:
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=Path(ca_file).read_bytes(),
            interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_node(self, public_key_file: Path) -> bool:
        """Register a node's public key (name: the file's stem); False if it was registered already."""
        request = RegisterNodeRequest(public_key=load_public_key(public_key_file), name=public_key_file.stem)
        try:
            self._call(self._client.RegisterNode, request)
        except ControlError as err:
            if err.code == PUBLIC_KEY_IN_USE:
                return False
            raise
        return True

    def unregister_node(self, node_id: int) -> None:
        """Revoke a node: from now on the SuperLink refuses its key and sends it no message."""
        self._call(self._client.UnregisterNode, UnregisterNodeRequest(node_id=node_id))

    def start_run(self, app_dir: Path) -> int:
        """Build the app's FAB and start a run of it with the app's own config (as `flwr run APP`)."""
        fab_bytes = build_fab_from_disk(app_dir)
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto({}))
        response = self._call(self._client.StartRun, request)
        if not response.HasField("run_id"):
            raise ControlError(f"the SuperLink at {self.address} did not start the run")
        return int(response.run_id)

    def stop_run(self, run_id: int) -> None:
        self._call(self._client.StopRun, StopRunRequest(run_id=run_id))

    def list_runs(self) -> list[RunInfo]:
        response = self._call(self._client.ListRuns, ListRunsRequest())
        return sorted((_run_info(run) for run in response.run_dict.values()), key=lambda r: r.running_at or "~")

    def list_nodes(self) -> list[NodeInfo]:
        response = self._call(self._client.ListNodes, ListNodesRequest())
        return [
            NodeInfo(int(n.node_id), n.name, n.status, n.last_activated_at, bytes(n.public_key),
                     n.online_until, n.heartbeat_interval)  # fmt: skip
            for n in response.nodes_info
        ]

    def _call(self, method, request):  # type: ignore[no-untyped-def]
        try:
            return method(request)
        except httpx.HTTPStatusError as err:
            raise _control_error(err) from None
        except httpx.HTTPError as err:
            raise ControlError(f"cannot reach the SuperLink at {self.address}: {err}") from None


def load_public_key(path: Path) -> bytes:
    """A node's OpenSSH EC public key, as Flower's register command sends it."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise ControlError(f"cannot read node public key {path}: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ControlError(f"node public key {path} is not an EC key")
    return public_key_to_bytes(key)


def _control_error(err: httpx.HTTPStatusError) -> ControlError:
    flower = FlowerError.from_json(err.response.text)
    if flower is None:
        return ControlError(f"the SuperLink refused: HTTP {err.response.status_code}")
    return ControlError(f"the SuperLink refused: [code: {flower.code}] {flower.message}", flower.code)


def _run_info(run) -> RunInfo:  # type: ignore[no-untyped-def]
    status = run.status.status
    if run.status.sub_status:
        status += f":{run.status.sub_status}"
    return RunInfo(int(run.run_id), status, run.status.details, run.running_at, run.finished_at)
