"""The SuperNode's Runtime API as Flower's `flwr-clientapp` and SuperExec speak it, for the warm worker
(fedclient/worker.py), which runs every task of its SuperNode in one process.

Flower offers no public entry for this: `flwr-clientapp` is a process per task that installs
each run's FAB and replies with the exception's text; the worker must run the installed code,
refuse a foreign FAB and reply with codes only, so it takes the steps itself, with these names:
- the HTTP client, its interceptors (runtime version, task token, SuperExec's signature over a
  request for a task with the secret the SuperNode was started with) and its retry policy;
- the task's input (context, run, FAB, message objects) and output (`push_message`,
  `push_task_output`), with the object-tree helpers and serde `flwr-clientapp` uses;
- Flower's ClientApp loading (`get_load_client_app_fn`) and FAB install.
Imports Flower's SuperNode runtime and CLI, which are slow to import: the worker and its tests only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from shared.flower_compat import flower_symbols
from shared.flower_compat.messages import set_message_id
from shared.flower_compat.runs import set_task_identity

with flower_symbols("runtime"):
    # The client and how it proves itself.
    from flwr.supercore.auth import load_superexec_auth_secret
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS as SUPEREXEC_AUTH_METHODS

    # A task: acquired, its input pulled, its heartbeat, its output pushed, its final status.
    from flwr.common.constant import SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        SendTaskHeartbeatRequest,
    )
    from flwr.supercore.constant import TaskType
    from flwr.supercore.fab import Fab
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.run import Run
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    # Which ClientApp runs: Flower's loader, and where it installs a FAB.
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_dir

__all__ = [
    "AcquireTaskRequest",
    "Fab",
    "Interceptor",
    "Run",
    "RuntimeHttpClient",
    "RuntimeVersionHttpInterceptor",
    "SubStatus",
    "TaskType",
    "acquire_client_app_task",
    "install_fab_client_app",
    "load_client_app",
    "pull_task_input",
    "push_message",
    "push_task_output",
    "runtime_client",
    "superexec_interceptors",
    "task_heartbeat",
    "task_interceptors",
]

Interceptor = RuntimeVersionHttpInterceptor | RuntimeTokenHttpInterceptor | SuperExecAuthHttpInterceptor


def runtime_client(address: str, certificate: bytes, interceptors: Sequence[Interceptor], retry: bool) -> RuntimeHttpClient:
    """A TLS client of the Runtime API at `address` that trusts `certificate` alone; with `retry`,
    Flower's retry policy for a failed request, as `flwr-clientapp` has."""
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=certificate,
        interceptors=list(interceptors),  # type: ignore[arg-type]
        retry_invoker=make_simple_http_retry_invoker() if retry else None,
    )


def superexec_interceptors(secret_file: Path | None) -> list[Interceptor]:
    """What SuperExec's requests for a task carry: its component name and, given the SuperNode's
    `--superexec-auth-secret-file`, a signature with that secret."""
    interceptors: list[Interceptor] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    secret = load_superexec_auth_secret(str(secret_file)) if secret_file is not None else None
    if secret is not None:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=SUPEREXEC_AUTH_METHODS))
    return interceptors


def task_interceptors(token: str) -> list[Interceptor]:
    """What `flwr-clientapp`'s requests for one task carry: its component name and the task's token."""
    return [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)]


def acquire_client_app_task(superexec: RuntimeHttpClient) -> str:
    """One request for a ClientApp task: its token, or "" when the SuperNode has none."""
    response = superexec.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return str(response.token) if response.HasField("task") else ""


def pull_task_input(client: RuntimeHttpClient, object_retry: tuple[float, float]) -> tuple[Message, Context, Run, Fab]:
    """Flower's `run_clientapp.pull_task_input`, retrying an unavailable object after `object_retry`
    (first delay, cap) s rather than Flower's 1 s, 2 s, ...: the SuperNode hands out a task as soon as
    it has stored the message, before it has pulled the message's objects from the SuperLink.

    Sets this process's task identity from the task, as Flower does.
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    set_task_identity(task_id=res.task_id, run_id=res.run.run_id, node_id=res.context.node_id)
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=object_retry[0],
        backoff_cap=object_retry[1],
    )
    set_message_id(message, tree.object_id)  # as Flower does: not part of the content
    return message, context, run, fab


def task_heartbeat(client: RuntimeHttpClient) -> HeartbeatSender:
    """A task's heartbeats (not started). Unlike Flower's, a refused heartbeat never signals this
    long-lived process (Flower's raises SIGINT, ending a `flwr-clientapp`)."""
    request = SendTaskHeartbeatRequest()

    def send() -> bool:
        try:
            client.SendTaskHeartbeat(request)
        except Exception:  # pylint: disable=broad-exception-caught
            return False
        return True

    return HeartbeatSender(send)


def load_client_app(reference: str) -> ClientApp:
    """The ClientApp `reference` (`module:attribute`) names, imported from this process's packages."""
    load: Callable[[str, str, str], ClientApp] = get_load_client_app_fn(
        default_app_ref=reference, app_path=None, multi_app=False
    )
    return load("", "", "")


def install_fab_client_app(run: Run, fab: Fab) -> tuple[ClientApp, Path]:
    """The ClientApp `fab` names, installed as `flwr-clientapp` installs it, and its project directory."""
    install_from_fab(fab.content, skip_prompt=True)
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(run.fab_id, run.fab_version, fab.hash_str), get_project_dir(run.fab_id, run.fab_version, fab.hash_str)
