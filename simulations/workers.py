"""Parallel clients: a round's messages served by a pool of worker processes.

`WorkerPool` is a `RoundRunner` for the in-process Grid. Each worker is a process started with
the `spawn` method (as on macOS and Windows), which builds its ClientApp once from a picklable
factory and keeps it, with its data views and model, warm across rounds. Per message it gets:
- the message in Flower's wire format (`shared.flower_compat.message_to_bytes`), its
  ArrayRecords left empty: every ArrayRecord of a batch (the global weights, one object shared
  by all of a round's messages) is written once into a shared-memory block, which each worker
  reads once a batch, so every message of the batch it serves carries the same record object
  (the ClientApp then decodes the weights once a batch, not once a client);
- the node's Context (node config, state, run config): it comes back with the reply, so
  `Context.state` persists whichever worker serves the node.

Results do not depend on the number of workers: a client's training depends only on its
message, its Context and its seed, and replies are returned in the order of the messages, so
the strategy aggregates them in the same order as in one process. The largest clients (by
`size`) are handed out first, each worker taking the next message when it replies, so a round
does not end waiting on one straggler.

A worker that dies turns the messages it held (the one it was serving, and the next one
queued behind it) into error replies (the round's quorum decides) and is replaced. Workers ignore Ctrl-C (the terminal sends it to every process of the
group); the pool stops them all when it is closed, and a worker whose parent is gone exits at
its next read. Each worker builds its data views through the normal loaders (the federation's
`load_federation`) on first use, from the dataset's arrays the engine read and shared
(memory-mapped): nothing of the dataset is pickled to it, nor read again from its file.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from shared.flower_compat import (
    ErrorCode,
    context_from_bytes,
    context_to_bytes,
    message_from_bytes,
    message_to_bytes,
)
from simulations.grid import call_client, error_reply

AUTO = "auto"
AUTO_MIN_CLIENTS = 4  # `auto` trains in process below this many clients a round: start-up would not pay
PREFETCH_BYTES = 16 << 10  # a busy worker is sent its next message ahead when it is this small at most
STOP_GRACE = 5.0  # seconds a worker gets to exit on SIGTERM before SIGKILL

AppFactory = Callable[[], ClientApp]  # picklable (a module-level function): builds a worker's ClientApp


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(setting: str, clients_per_round: int) -> int:
    """Worker processes for config key `workers`: a count, or `auto`.

    `auto`: one per core, at most one per client of a round; 1 (in process) on one core or
    with fewer than AUTO_MIN_CLIENTS clients a round.
    """
    if setting != AUTO:
        return int(setting)
    if clients_per_round < AUTO_MIN_CLIENTS:
        return 1
    return max(1, min(available_cores(), clients_per_round))


@dataclass(frozen=True)
class _SharedArray:
    name: str
    dtype: str
    shape: tuple[int, ...]
    stype: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Task:
    """One message for a worker: `shared` maps a content key to its record's place in `block`."""

    index: int  # position of the message in its batch
    message: bytes
    context: bytes
    block: str
    shared: dict[str, tuple[int, tuple[_SharedArray, ...]]]  # key -> (record number, its arrays)


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    tasks: deque[_Task] = field(default_factory=deque)  # sent, not yet answered: the first is being served


class WorkerPool:
    """`workers` processes serving batches of messages with the ClientApp `app_factory` builds.

    `size(context)` ranks a node's message for scheduling (larger first); None keeps message order.
    Use as a context manager, or call `close`.
    """

    def __init__(self, app_factory: AppFactory, workers: int, size: Callable[[Context], int] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._factory = app_factory
        self._size = size
        self._spawn = multiprocessing.get_context("spawn")
        self._workers = [self._start() for _ in range(workers)]

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def __call__(self, messages: list[Message], contexts: list[Context]) -> list[Message]:
        """The replies to `messages`, in their order, each node's Context.state updated."""
        if not self._workers:
            raise RuntimeError("the worker pool is closed")
        order = sorted(range(len(messages)), key=self._rank(contexts))
        replies: dict[int, Message] = {}
        with _shared_records(messages) as (block, shared):
            todo = deque(self._task(i, messages[i], contexts[i], block, shared) for i in order)
            while len(replies) < len(messages):
                self._hand_out(todo)
                for worker in self._ready():
                    replies.update(self._collect(worker, messages, contexts))
        return [replies[i] for i in range(len(messages))]

    def close(self) -> None:
        """Stop every worker now: they keep nothing that outlives the pool (an interrupted round's
        messages are simply not answered). A second Ctrl-C meanwhile does not cut the stop short."""
        workers, self._workers = self._workers, []
        with _ctrl_c_ignored():
            for worker in workers:
                worker.process.terminate()
            for worker in workers:
                worker.process.join(STOP_GRACE)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
                worker.conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> _Worker:
        parent, child = self._spawn.Pipe()
        process = self._spawn.Process(target=_serve, args=(child, self._factory), daemon=True, name="fedsim-worker")
        process.start()
        child.close()
        return _Worker(process, parent)

    def _rank(self, contexts: list[Context]) -> Callable[[int], tuple[int, int]]:
        size = self._size
        return lambda i: (-size(contexts[i]) if size is not None else 0, i)

    def _task(
        self, index: int, message: Message, context: Context, block: str, shared: dict[int, tuple[int, tuple]]
    ) -> _Task:
        """The message to send: its ArrayRecords left empty, their place in `block` given instead."""
        content = message.content.items() if message.has_content() else []
        records = {key: shared[id(record)] for key, record in content if id(record) in shared}
        light = RecordDict({k: ArrayRecord() if k in records else v for k, v in content}) if records else None
        return _Task(index, message_to_bytes(message, light), context_to_bytes(context), block, records)

    def _hand_out(self, todo: deque[_Task]) -> None:
        """Keep every worker busy: a message to serve, and the next one queued when it is small.

        Queuing one ahead spares a worker waiting on this process between messages; only small
        ones, so a send never blocks on a pipe the worker is writing its reply into.
        """
        for worker in self._workers:
            if not worker.tasks and not worker.process.is_alive():  # died between rounds
                worker = self._replace(worker)
            while todo and (not worker.tasks or (len(worker.tasks) == 1 and _small(todo[0]))):
                worker.tasks.append(todo.popleft())
                try:
                    worker.conn.send(worker.tasks[-1])
                except OSError:  # it died: `_ready` reports it
                    break

    def _ready(self) -> list[_Worker]:
        busy = [w for w in self._workers if w.tasks]
        handles = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
        return [w for w in busy if w.conn in handles or w.process.sentinel in handles]

    def _collect(self, worker: _Worker, messages: list[Message], contexts: list[Context]) -> dict[int, Message]:
        """The reply to `worker`'s first message; a worker that died gives an error reply to each
        message it held, and is replaced."""
        try:
            reply, context = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker)
            reason = f"the worker process serving this node died (exit code {worker.process.exitcode})"
            return {t.index: error_reply(messages[t.index], ErrorCode.CLIENT_APP_CRASHED, reason) for t in worker.tasks}
        task = worker.tasks.popleft()
        contexts[task.index].state = context_from_bytes(context).state
        return {task.index: message_from_bytes(reply)}

    def _replace(self, worker: _Worker) -> _Worker:
        worker.conn.close()
        worker.process.join()
        new = self._workers[self._workers.index(worker)] = self._start()
        return new


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """Ignore SIGINT inside the block (in the main thread, the only one that can set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _small(task: _Task) -> bool:
    return len(task.message) + len(task.context) <= PREFETCH_BYTES


@contextmanager
def _shared_records(messages: list[Message]) -> Iterator[tuple[str, dict[int, tuple[int, tuple[_SharedArray, ...]]]]]:
    """Every distinct ArrayRecord of `messages`, written once into one shared-memory block.

    Yields the block's name and, by id() of each record, its number and its arrays' places.
    The block is unlinked when the batch is done.
    """
    records: dict[int, ArrayRecord] = {}
    for message in messages:
        if message.has_content():
            for record in message.content.array_records.values():
                records.setdefault(id(record), record)
    places: dict[int, tuple[int, tuple[_SharedArray, ...]]] = {}
    offset = 0
    for number, (key, record) in enumerate(records.items()):
        arrays = []
        for name, array in record.items():
            arrays.append(_SharedArray(name, array.dtype, tuple(array.shape), array.stype, offset, len(array.data)))
            offset += len(array.data)
        places[key] = (number, tuple(arrays))
    block = SharedMemory(create=True, size=max(offset, 1))
    try:
        for key, record in records.items():
            for place, array in zip(places[key][1], record.values(), strict=True):
                block.buf[place.offset : place.offset + place.size] = array.data
        yield block.name, places
    finally:
        block.close()
        block.unlink()


class _Records:
    """A worker's ArrayRecords of the current batch, read from shared memory once each."""

    def __init__(self) -> None:
        self._block = ""
        self._records: dict[int, ArrayRecord] = {}

    def get(self, block: str, number: int, arrays: tuple[_SharedArray, ...]) -> ArrayRecord:
        if block != self._block:
            self._block, self._records = block, {}
        if number not in self._records:
            self._records[number] = _read_record(block, arrays)
        return self._records[number]


def _read_record(block: str, arrays: tuple[_SharedArray, ...]) -> ArrayRecord:
    memory = SharedMemory(name=block, create=False)
    try:
        return ArrayRecord(
            {
                a.name: Array(a.dtype, a.shape, a.stype, bytes(memory.buf[a.offset : a.offset + a.size]))
                for a in arrays
            }
        )
    finally:
        memory.close()


def _serve(conn: Connection, app_factory: AppFactory) -> None:
    """A worker's loop: build the ClientApp, then reply to each task until the pool stops it or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the pool stops us
    try:
        client_app: ClientApp | None = app_factory()
        failure = ""
    except Exception as err:  # noqa: BLE001 - every message gets the reason as its error reply
        client_app, failure = None, f"the ClientApp could not be loaded: {type(err).__name__}: {err}"
    records = _Records()
    while True:
        try:
            task: _Task = conn.recv()
        except (EOFError, OSError):  # the pool is gone
            return
        conn.send(_reply(client_app, failure, records, task))


def _reply(client_app: ClientApp | None, failure: str, records: _Records, task: _Task) -> tuple[bytes, bytes]:
    message, context = message_from_bytes(task.message), context_from_bytes(task.context)
    for key, (number, arrays) in task.shared.items():
        message.content[key] = records.get(task.block, number, arrays)
    if client_app is None:
        reply = error_reply(message, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, failure)
    else:
        reply = call_client(client_app, message, context)
    return message_to_bytes(reply), context_to_bytes(context)
