"""Parallel clients: a round's messages served by a pool of worker processes.

`WorkerPool` is a `RoundRunner` for the in-process Grid: N workers are this process and N - 1
spawned processes, each keeping its ClientApp warm; weights travel through shared memory, and
results do not depend on the number of workers. Each process gets its share of the cores
(`thread_share`), set in a worker's environment before it imports the app. How it works, and
why: docs/architecture.md (fedsim's workers).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from shared.flower_compat.messages import (
    ErrorCode,
    context_from_bytes,
    context_to_bytes,
    message_from_bytes,
    message_to_bytes,
)
from simulations.grid import RoundRunner, error_reply, serve_batch

AUTO = "auto"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by PyTorch's and numpy's math libraries at start
GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/kfd")  # on Linux, where NVIDIA's or AMD's (ROCm) driver is loaded
AUTO_MIN_CLIENTS = 4  # `auto` trains in process below this many clients a round: start-up would not pay
# `auto` trains in process when the whole run trains fewer examples than this: about 10 s of the
# MNIST 2NN on one core, against a few seconds for workers to start (importing PyTorch and Flower).
AUTO_MIN_EXAMPLES = 150_000
PREFETCH_BYTES = 16 << 10  # a busy worker is sent its next message ahead when it is this small at most
STOP_GRACE = 5.0  # seconds a worker gets to exit on SIGTERM before SIGKILL

AppFactory = Callable[[], ClientApp]  # picklable (a module-level function): builds a worker's ClientApp
BatchFactory = Callable[[], RoundRunner | None]  # picklable: builds a worker's batch runner (the vectorized path)


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> int:
    """CUDA devices this process may use (0 without CUDA).

    PyTorch counts them through NVML where it can, without initialising CUDA here. PyTorch is
    imported only where there may be a GPU: on Linux without a GPU driver the answer is 0
    without it (an app's workers may need no PyTorch at all, and importing it takes seconds
    and about 200 MB).
    """
    if sys.platform.startswith("linux") and not any(os.path.exists(path) for path in GPU_DRIVERS):
        return 0
    import torch  # noqa: PLC0415 - seconds to import; only where GPUs matter

    return torch.cuda.device_count()


def worker_count(setting: str, clients_per_round: int, gpus: int = 0, run_examples: int | None = None) -> int:
    """Worker processes for config key `workers`: a count, or `auto`.

    `auto`: one per core, or one per GPU where the clients train on `gpus` CUDA devices, at
    most one per client of a round; 1 (in process) on one core, with fewer than
    AUTO_MIN_CLIENTS clients a round, or where the whole run trains fewer than
    AUTO_MIN_EXAMPLES examples (`run_examples`, where known).
    """
    if setting != AUTO:
        return int(setting)
    too_small = run_examples is not None and run_examples < AUTO_MIN_EXAMPLES
    if clients_per_round < AUTO_MIN_CLIENTS or too_small:
        return 1
    return max(1, min(gpus or available_cores(), clients_per_round))


def thread_share(processes: int) -> int:
    """Intra-op threads for each of `processes` processes training at once: its share of the cores."""
    return max(1, available_cores() // max(1, processes))


@contextmanager
def process_threads(threads: int) -> Iterator[None]:
    """This process's math libraries on `threads` threads inside the block: the environment that
    libraries loaded later read (THREAD_VARIABLES), and PyTorch's count where it is loaded; both
    put back afterwards."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    _set_torch_threads(threads)
    try:
        with _thread_environment(threads):
            yield
    finally:
        if before is not None:
            _set_torch_threads(before)


@contextmanager
def _thread_environment(threads: int) -> Iterator[None]:
    """THREAD_VARIABLES set to `threads` inside the block (0: left as they are), put back after:
    what a process started inside the block inherits."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    if threads:
        os.environ.update({name: str(threads) for name in THREAD_VARIABLES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_torch_threads(threads: int) -> None:
    """PyTorch's intra-op threads, where this process has loaded PyTorch (never imported for it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def worker_gpu(index: int, gpus: int, visible: str | None) -> str | None:
    """Worker `index`'s CUDA_VISIBLE_DEVICES: the (index mod gpus)-th of this process's `gpus`
    devices, named as `visible` (this process's own CUDA_VISIBLE_DEVICES, if set) names them;
    None without GPUs."""
    if gpus < 1:
        return None
    devices = [d.strip() for d in visible.split(",")][:gpus] if visible else [str(i) for i in range(gpus)]
    return devices[index % len(devices)]


def limit_gpu_memory(fraction: float) -> None:
    """Cap this process's PyTorch allocations on its current CUDA device at `fraction` of the
    device's memory (`torch.cuda.set_per_process_memory_fraction`); 0, or no CUDA: nothing."""
    if fraction <= 0:
        return
    import torch  # noqa: PLC0415 - as in visible_gpus

    if torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device())


@dataclass(frozen=True)
class _Device:
    """Where a worker trains: its one GPU (a CUDA_VISIBLE_DEVICES entry; None: no GPU), its VRAM cap,
    its CPU threads (0: the libraries' own)."""

    gpu: str | None
    memory_fraction: float
    threads: int = 0

    def use(self) -> None:
        """Take the worker's threads (PyTorch's count too, where unpickling the app factory loaded it),
        make the GPU its only device and cap its memory (before CUDA is initialised)."""
        if self.threads:
            os.environ.update({name: str(self.threads) for name in THREAD_VARIABLES})
            _set_torch_threads(self.threads)
        if self.gpu is not None:
            os.environ[CUDA_VISIBLE_DEVICES] = self.gpu
            limit_gpu_memory(self.memory_fraction)


@contextmanager
def client_workers(
    app_factory: AppFactory,
    workers: int,
    size: Callable[[Context], int] | None = None,
    *,
    gpus: int = 0,
    gpu_memory_fraction: float = 0.0,
    batch_factory: BatchFactory | None = None,
) -> Iterator[WorkerPool | None]:
    """`workers` workers: this process and `workers - 1` worker processes (a WorkerPool serving
    a share here), stopped with every worker at the end; for one worker, None: the clients train
    in this process. This process's VRAM is capped where the clients use `gpus`; each process
    trains on its `thread_share` of the cores."""
    if gpus:
        limit_gpu_memory(gpu_memory_fraction)
    with process_threads(thread_share(workers)):
        if workers == 1:
            yield None
            return
        with WorkerPool(
            app_factory,
            workers - 1,
            size,
            gpus=gpus,
            gpu_memory_fraction=gpu_memory_fraction,
            batch_factory=batch_factory,
            serve_here=True,
            threads=thread_share(workers),
        ) as pool:
            yield pool


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


_Job = tuple[int, ...]  # positions in a batch served at once: one message, or a worker's share (batch runner)
_Wire = tuple[_Task, ...]  # a job as sent to a worker process
_Places = dict[str, tuple["_SharedArray", ...]]  # a message's ArrayRecords left out of its bytes: key -> arrays


@dataclass(frozen=True)
class _Answer:
    """A job's replies: each one's bytes (ArrayRecords left empty), its node's Context and where in
    `block` its ArrayRecords are; `block` is "" where no reply has any."""

    block: str
    replies: tuple[tuple[bytes, bytes, _Places], ...]


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    jobs: deque[_Wire] = field(default_factory=deque)  # sent, not yet answered: the first is being served


class _Clients:
    """A process's ClientApp (and batch runner) as its factories build them, or, where they
    fail, the reason, which every message it is given gets as its error reply."""

    def __init__(
        self, app_factory: AppFactory, batch_factory: BatchFactory | None, device: _Device | None = None
    ) -> None:
        try:
            if device is not None:
                device.use()
            self._app: ClientApp | None = app_factory()
            self._batch_runner = batch_factory() if batch_factory is not None else None
            self._failure = ""
        except Exception as err:  # noqa: BLE001 - every message gets the reason as its error reply
            self._app, self._batch_runner = None, None
            self._failure = f"the ClientApp could not be loaded: {type(err).__name__}: {err}"

    def replies(self, messages: list[Message], contexts: list[Context]) -> list[Message]:
        if self._app is None:
            return [error_reply(m, ErrorCode.LOAD_CLIENT_APP_EXCEPTION, self._failure) for m in messages]
        return serve_batch(self._app, self._batch_runner, messages, contexts)


class WorkerPool:
    """`workers` processes serving batches of messages with the ClientApp `app_factory` builds;
    with `serve_here`, this process too (worker 0), with a ClientApp of its own.

    `size(context)` ranks a node's message for scheduling (larger first); None keeps message order.
    With `gpus` CUDA devices, each worker gets one (see `worker_gpu`), its PyTorch allocations
    capped at `gpu_memory_fraction` of it (0: no cap). With a `batch_factory`, each worker builds
    a batch runner too, and a batch is dealt out whole: worker w of W gets the w-th, (w+W)-th, ...
    messages of the size order at once, which its batch runner serves (its ClientApp where the
    runner declines). Use as a context manager, or call `close`.

    Serving here, this process takes the first job of a batch (the largest message, or its
    share), and another each time it has served one while jobs remain; the worker processes are
    handed theirs first, so they train meanwhile.
    """

    def __init__(
        self,
        app_factory: AppFactory,
        workers: int,
        size: Callable[[Context], int] | None = None,
        *,
        gpus: int = 0,
        gpu_memory_fraction: float = 0.0,
        batch_factory: BatchFactory | None = None,
        serve_here: bool = False,
        threads: int = 0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._factory = app_factory
        self._batch_factory = batch_factory
        self._size = size
        self._gpus = gpus
        self._memory_fraction = gpu_memory_fraction
        self._threads = threads
        self._spawn = multiprocessing.get_context("spawn")
        self._first = int(serve_here)  # worker 0 is this process where it serves
        self._workers = [self._start(index) for index in range(self._first, self._first + workers)]
        self._here = _Clients(app_factory, batch_factory) if serve_here else None

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

            @functools.cache
            def wire(job: _Job) -> _Wire:
                return tuple(self._task(i, messages[i], contexts[i], block, shared) for i in job)

            todo = self._jobs(order)
            while len(replies) < len(messages):
                here = todo.popleft() if todo and self._here is not None else ()
                self._hand_out(todo, wire)
                replies.update(self._serve_here(here, messages, contexts))
                for worker in self._ready(block=not here):
                    replies.update(self._collect(worker, messages, contexts))
        return [replies[i] for i in range(len(messages))]

    def _serve_here(self, job: _Job, messages: list[Message], contexts: list[Context]) -> dict[int, Message]:
        """This process's replies to `job` (none to an empty one)."""
        if not job or self._here is None:
            return {}
        served = self._here.replies([messages[i] for i in job], [contexts[i] for i in job])
        return dict(zip(job, served, strict=True))

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

    def _start(self, index: int) -> _Worker:
        parent, child = self._spawn.Pipe()
        gpu = worker_gpu(index, self._gpus, os.environ.get(CUDA_VISIBLE_DEVICES))
        device = _Device(gpu, self._memory_fraction, self._threads)
        process = self._spawn.Process(
            target=_serve,
            args=(child, self._factory, device, self._batch_factory),
            daemon=True,
            name=f"fedsim-worker-{index}",
        )
        with _thread_environment(self._threads):  # read as the worker starts, before it imports the app
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
        light = message_to_bytes(message, _light(message, records))
        return _Task(index, light, context_to_bytes(context), block, records)

    def _jobs(self, order: list[int]) -> deque[_Job]:
        """One job per message; with a batch runner, one per worker, dealt out in turn."""
        if self._batch_factory is None:
            return deque((i,) for i in order)
        workers = self._first + len(self._workers)
        return deque(tuple(order[w::workers]) for w in range(min(workers, len(order))))

    def _hand_out(self, todo: deque[_Job], wire: Callable[[_Job], _Wire]) -> None:
        """Keep every worker busy: a job to serve, and the next one queued when it is small.

        Queuing one ahead spares a worker waiting on this process between messages; only small
        ones, so a send never blocks on a pipe the worker is writing its reply into. A batch's
        shares are never queued: each is for a worker of its own.
        """
        for worker in self._workers:
            if not worker.jobs and not worker.process.is_alive():  # died between rounds
                worker = self._replace(worker)
            while todo and (not worker.jobs or (len(worker.jobs) == 1 and self._prefetch(wire(todo[0])))):
                worker.jobs.append(wire(todo.popleft()))
                try:
                    worker.conn.send(worker.jobs[-1])
                except OSError:  # it died: `_ready` reports it
                    break

    def _prefetch(self, job: _Wire) -> bool:
        return self._batch_factory is None and sum(len(t.message) + len(t.context) for t in job) <= PREFETCH_BYTES

    def _ready(self, block: bool = True) -> list[_Worker]:
        """The worker processes with an answer (or dead); without `block`, those ready now."""
        busy = [w for w in self._workers if w.jobs]
        handles = wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=None if block else 0)
        return [w for w in busy if w.conn in handles or w.process.sentinel in handles]

    def _collect(self, worker: _Worker, messages: list[Message], contexts: list[Context]) -> dict[int, Message]:
        """The replies to `worker`'s first job; a worker that died gives an error reply to each
        message it held, and is replaced."""
        try:
            answer: _Answer = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker)
            reason = f"the worker process serving this node died (exit code {worker.process.exitcode})"
            held = [task.index for job in worker.jobs for task in job]
            return {i: error_reply(messages[i], ErrorCode.CLIENT_APP_CRASHED, reason) for i in held}
        replies = {}
        with _opened(answer.block, unlink=True) as block:
            for task, (reply, context, places) in zip(worker.jobs.popleft(), answer.replies, strict=True):
                contexts[task.index].state = context_from_bytes(context).state
                replies[task.index] = _with_records(message_from_bytes(reply), block, places)
        return replies

    def _replace(self, worker: _Worker) -> _Worker:
        worker.conn.close()
        worker.process.join()
        index = self._workers.index(worker)
        new = self._workers[index] = self._start(self._first + index)  # the same GPU as the worker it replaces
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
    block, places = _pack(list(records.values()))
    try:
        yield block.name, {key: (number, arrays) for number, (key, arrays) in enumerate(zip(records, places))}
    finally:
        block.close()
        block.unlink()


def _pack(records: list[ArrayRecord]) -> tuple[SharedMemory, list[tuple[_SharedArray, ...]]]:
    """`records` written one after another into a new shared-memory block; the block (the caller
    closes it, and unlinks it or has it unlinked), and each record's arrays' places in it."""
    places: list[tuple[_SharedArray, ...]] = []
    offset = 0
    for record in records:
        arrays = []
        for name, array in record.items():
            arrays.append(_SharedArray(name, array.dtype, tuple(array.shape), array.stype, offset, len(array.data)))
            offset += len(array.data)
        places.append(tuple(arrays))
    block = SharedMemory(create=True, size=max(offset, 1))
    try:
        for record, arrays in zip(records, places, strict=True):
            for place, array in zip(arrays, record.values(), strict=True):
                block.buf[place.offset : place.offset + place.size] = array.data
    except BaseException:
        block.close()
        block.unlink()
        raise
    return block, places


@contextmanager
def _opened(name: str, unlink: bool = False) -> Iterator[SharedMemory | None]:
    """The shared-memory block `name` ("": none), closed (and with `unlink`, removed) at the end."""
    if not name:
        yield None
        return
    memory = SharedMemory(name=name, create=False)
    try:
        yield memory
    finally:
        memory.close()
        if unlink:
            memory.unlink()


def _read_record(memory: SharedMemory, arrays: tuple[_SharedArray, ...]) -> ArrayRecord:
    return ArrayRecord(
        {a.name: Array(a.dtype, a.shape, a.stype, bytes(memory.buf[a.offset : a.offset + a.size])) for a in arrays}
    )


def _with_records(message: Message, block: SharedMemory | None, places: _Places) -> Message:
    """`message` with the ArrayRecords its sender left in `block` put back in."""
    for key, arrays in places.items():
        message.content[key] = _read_record(block, arrays)  # type: ignore[arg-type] - places imply a block
    return message


class _Records:
    """A worker's ArrayRecords of the current batch, read from shared memory once each."""

    def __init__(self) -> None:
        self._block = ""
        self._records: dict[int, ArrayRecord] = {}

    def get(self, block: str, number: int, arrays: tuple[_SharedArray, ...]) -> ArrayRecord:
        if block != self._block:
            self._block, self._records = block, {}
        if number not in self._records:
            with _opened(block) as memory:
                self._records[number] = _read_record(memory, arrays)  # type: ignore[arg-type]
        return self._records[number]


def _serve(conn: Connection, app_factory: AppFactory, device: _Device, batch_factory: BatchFactory | None) -> None:
    """A worker's loop: take its GPU, build the ClientApp (and batch runner), then reply to each
    job until the pool stops it or is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the pool stops us
    clients = _Clients(app_factory, batch_factory, device)
    records = _Records()
    while True:
        try:
            job: _Wire = conn.recv()
        except (EOFError, OSError):  # the pool is gone
            return
        messages = [_message(records, task) for task in job]
        contexts = [context_from_bytes(task.context) for task in job]
        conn.send(_answer(clients.replies(messages, contexts), contexts))


def _answer(replies: list[Message], contexts: list[Context]) -> _Answer:
    """`replies` to send back: their ArrayRecords in a new shared-memory block (the pool unlinks
    it), the rest in Flower's wire format, each with its node's Context."""
    keyed = [
        (i, key, record)
        for i, reply in enumerate(replies)
        if reply.has_content()
        for key, record in reply.content.array_records.items()
    ]
    name = ""  # no block: no reply has an ArrayRecord
    left_out: list[_Places] = [{} for _ in replies]
    if keyed:
        block, places = _pack([record for _, _, record in keyed])
        block.close()
        name = block.name
        for (i, key, _record), arrays in zip(keyed, places, strict=True):
            left_out[i][key] = arrays
    return _Answer(
        name,
        tuple(
            (message_to_bytes(reply, _light(reply, shared)), context_to_bytes(context), shared)
            for reply, context, shared in zip(replies, contexts, left_out, strict=True)
        ),
    )


def _light(message: Message, shared: Collection[str]) -> RecordDict | None:
    """`message`'s content with the ArrayRecords under the keys `shared` left empty (they travel
    through shared memory); None where there are none."""
    if not shared:
        return None
    return RecordDict({k: ArrayRecord() if k in shared else v for k, v in message.content.items()})


def _message(records: _Records, task: _Task) -> Message:
    """The task's message, its shared ArrayRecords read back in."""
    message = message_from_bytes(task.message)
    for key, (number, arrays) in task.shared.items():
        message.content[key] = records.get(task.block, number, arrays)
    return message
