"""A device's side of Flower's Fleet API, spoken with Flower's own SuperNode code (benchmarks/fleet.py).

`fleet_session(address, ca, key)` connects one node as `flower-supernode` does: Flower's
`http_request_response` (TLS, the node-authentication interceptor signing every request with
the node's key, heartbeats, activation and deactivation), and yields a `FleetSession` whose
`pull()` and `push()` are the two halves of the SuperNode's loop (`start_client_internal`): a
task's objects pulled and the message inflated and confirmed, a reply announced and its objects
pushed. No ClientApp process, no node state: many devices fit in one process.

Relies on `flwr.supernode.fleet_http_connection.http_request_response` (its yielded tuple:
node id, receive, send, get_run, get_fab, pull_object, push_object, confirm), the inflatable-object
helpers the SuperNode uses, `get_fused_config_from_fab`, and the message id being the reply's
object id (`set_message_id`). Importing it costs what Flower's SuperNode code costs (seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import Message

from shared.flower_compat import flower_symbols
from shared.flower_compat.messages import set_message_id

with flower_symbols("fleet"):
    # The SuperNode's connection: TLS, node authentication, heartbeats, (de)activation, and the
    # callbacks its loop calls.
    from flwr.supernode import fleet_http_connection
    from flwr.supernode.fleet_http_connection import http_request_response

    # How the SuperNode's loop moves a message's objects and fuses a run's config with its FAB's.
    from flwr.common.config import get_fused_config_from_fab
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        iterate_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_utils import (
        inflate_object_from_contents,
        pull_objects,
        push_object_contents_from_iterable,
    )


class FleetConnectionError(ConnectionError):
    """A node that could not connect, where Flower's SuperNode would end its process."""


def _fail_connection(code: int, message: str, *_: Any, **__: Any) -> None:
    raise FleetConnectionError(f"exit code {int(code)}: {message}")


# `http_request_response` ends the process when a node cannot connect (`flwr_exit`: SystemExit,
# then a forced `os._exit` from another thread). Many emulated devices share a process: here the
# one device's connection fails instead.
fleet_http_connection.flwr_exit = _fail_connection


def load_node_key(path: Path) -> tuple[Any, Any]:
    """(private, public) EC key of a node key file (OpenSSH, as `fedserver init` and `fedclient keygen` write)."""
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    return private, private.public_key()


@dataclass
class FleetSession:
    """One connected node: what the SuperNode's loop does with the callbacks Flower yields."""

    node_id: int
    _calls: tuple[Any, ...]
    _run_configs: dict[int, dict[str, Any]] = field(default_factory=dict)

    def pull(self) -> Message | None:
        """The next task for this node, whole (its objects pulled, confirmed received); None if none."""
        _, receive, _, _, _, pull_object, _, confirm = self._calls
        received = receive()
        if received is None:
            return None
        proto_message, tree = received
        run_id, message_id = proto_message.metadata.run_id, proto_message.metadata.message_id
        ids = [node.object_id for node in iterate_object_tree(tree)]
        contents = pull_objects(ids, pull_object_fn=partial(pull_object, run_id))
        message = inflate_object_from_contents(message_id, contents)
        set_message_id(message, message_id)
        confirm(run_id, message_id)
        return message

    def push(self, reply: Message, runtime: float = 0.0) -> None:
        """Send `reply` (a `Message(content, reply_to=task)`): announced, then the objects the SuperLink asks for."""
        _, _, send, _, _, _, push_object, _ = self._calls
        set_message_id(reply, reply.object_id)
        with no_object_id_recompute():
            tree = get_object_tree(reply)
            objects = get_all_nested_objects(reply)
            wanted, session_id = send(reply, tree, runtime)
            contents = ((object_id, objects[object_id].deflate()) for object_id in objects if object_id in wanted)
            push = partial(push_object, reply.metadata.run_id, session_id)
            push_object_contents_from_iterable(contents, push)

    def run_config(self, run_id: int) -> dict[str, Any]:
        """The run's config as a SuperNode gives it to its ClientApp: the run and its FAB fetched
        from the SuperLink once per run, the FAB's config fused with the run's overrides."""
        if run_id not in self._run_configs:
            _, _, _, get_run, get_fab, _, _, _ = self._calls
            run = get_run(run_id)
            fab = get_fab(run.fab_hash, run_id)
            self._run_configs[run_id] = dict(get_fused_config_from_fab(fab.content, run))
        return self._run_configs[run_id]


@contextlib.contextmanager
def fleet_session(address: str, ca: Path, key: tuple[Any, Any], max_wait: float = 60.0) -> Iterator[FleetSession]:
    """One node connected to the SuperLink at `address` over TLS (trusting `ca`), authenticated
    with `key` (`load_node_key`), as `flower-supernode` connects; deactivated on leaving.

    A request that keeps failing is retried for up to `max_wait` seconds. A refused connection
    raises FleetConnectionError, where it would end a SuperNode.
    """
    with http_request_response(address, insecure=False, root_certificates=str(ca), authentication_keys=key,
                 max_wait_time=max_wait) as calls:  # fmt: skip
        yield FleetSession(calls[0], tuple(calls))

