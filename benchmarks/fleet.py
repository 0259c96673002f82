#!/usr/bin/env python
"""A fleet of emulated devices against a real `fedserver start`: what one server holds.

    .venv/bin/python benchmarks/fleet.py --devices N --per-round K --rounds R [--secure] [--dropout F]
        [--over-select F] [--reply-deadline S] [--latency S] [--reconnect F] [--away S] [--linger S] [--poll S]
        [--processes P] [--db sqlite|memory] [--idle S] [--kill-after R] [--timeout S] [--pki-cache DIR] [--keep DIR]

The daemon runs as deployed (TLS, node authentication, every device its own enrolled key from
`fedserver init`, SQLite state) on 127.0.0.1 in a temporary directory. The devices are threads in
`--processes` processes, each speaking the Fleet API with Flower's own SuperNode connection code
(`shared.flower_compat.fleet`): it polls for tasks every `--poll` s (Flower's SuperNode: 3 s),
fetches the run and its FAB once, and answers each training task with a valid reply, a cheap
deterministic update of the received weights with `num-examples` and `train_loss` (with
`--secure`, through the device side of SecAgg+, `shared.secagg.secagg_mod`, enrolled), after
`--latency` s (uniform 0.5-1.5 x). `--dropout F`: each training task is dropped (never answered:
a device gone mid-round) with probability F; `--reconnect F`: after a reply a device leaves
(deactivates) `--linger` s later with probability F and comes back `--away` s later. (Flower 1.41's
SuperLink answers the ServerApp's pull of a reply whose node has left with "node unavailable",
the reply unused: a device that leaves before its reply is pulled loses it.)

Measured on the server alone (the daemon's process tree: fedserver, SuperLink, SuperExec,
ServerApp) from all devices connected to the last round committed, from /proc: CPU seconds per
device-round, peak RSS; for each round, its commit time beyond the slowest reply it counted
(the K-th training reply, and every reply of a later secure stage); replies lost (a reply among
a round's first K that the server's node ledger did not accept); and, before round 1 (which
waits for every device: one is held back for `--idle` s), the CPU that the devices' polling
alone costs it, per pull. `--kill-after R` SIGKILLs the daemon's whole tree once round R is
committed, as a machine crash would, and runs the same command again on its state directory: the
run resumes from its checkpoint, the devices reconnect, and `resume_s` is the time from the kill
to the next round's commit. The last line printed is one JSON object. Bounded: MAX_DEVICES,
`--timeout`; stops everything it started, on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tomli_w

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from deployment_latency import MemoryPeak, cpu_seconds  # noqa: E402

from fedclient.node import node_env  # noqa: E402
from fedserver.checkpoints import read_metrics  # noqa: E402
from fedserver.node_ledger import NODES_FILE  # noqa: E402
from fedserver.state import DaemonInfo, StateDir  # noqa: E402
from shared import messages as keys  # noqa: E402
from shared.node_config import CERTIFICATE, ENROLLMENT_CA, SIGNING_KEY  # noqa: E402
from shared.pki import init_pki  # noqa: E402
from shared.processes import descendants, free_port, spawn, stop_trees, wait_for_port  # noqa: E402

MAX_DEVICES = 5000
MAX_ROUNDS = 200
CONNECTS_AT_ONCE = 16  # per process: connection storms of hundreds of TLS handshakes time out
TEST_SIZE = 200  # the server's central test set (random MNIST-shaped images)
STOP_GRACE = 15.0
POLL_REPORT_S = 2.0  # how often a device process writes how many pulls its devices made


@dataclass(frozen=True)
class Behaviour:
    """How every emulated device behaves."""

    address: str
    ca: str
    clients_dir: str
    enrollment_ca: str
    poll: float  # s between pulls that found nothing
    latency: float  # mean s before a training reply
    dropout: float  # probability of never answering a training task
    reconnect: float  # probability of leaving after a reply
    away: float  # s a device that left stays away
    linger: float  # s a leaving device stays connected after its last reply
    seed: int


# ---------------------------------------------------------------------------------------- devices


def train_reply(message, context):  # noqa: ANN001, ANN201 - a ClientApp callable
    """The reply of a device that trained: the received weights moved by a small amount fixed by
    the node and round, 10-19 examples, a loss; what the ServerApp's screening accepts."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    node = context.node_id
    step = 1e-3 * ((node + (server_round(message) or 0)) % 7 - 3)
    arrays = ArrayRecord({name: Array(array.numpy() + np.asarray(step, dtype=array.numpy().dtype))
                          for name, array in message.content[keys.ARRAYS].items()})  # fmt: skip
    metrics = MetricRecord({keys.TRAIN_LOSS: 1.0 + step, keys.NUM_EXAMPLES: 10 + node % 10})
    return Message(RecordDict({keys.ARRAYS: arrays, keys.METRICS: metrics}), reply_to=message)


def evaluate_reply(message, context):  # noqa: ANN001, ANN201
    from flwr.app import Message, MetricRecord, RecordDict

    metrics = {keys.EVAL_LOSS: 1.0, keys.ACCURACY: 0.5, keys.NUM_EXAMPLES: 10 + context.node_id % 10}
    return Message(RecordDict({keys.METRICS: MetricRecord(metrics)}), reply_to=message)


def answer(message, context):  # noqa: ANN001, ANN201
    """The device's reply to any task: SecAgg+ stages through the real client mod, the rest plain."""
    from flwr.app import MessageType

    from shared.secagg import secagg_mod

    def plain(msg, ctx):  # noqa: ANN001, ANN202
        return train_reply(msg, ctx) if msg.metadata.message_type == MessageType.TRAIN else evaluate_reply(msg, ctx)

    return secagg_mod(message, context, plain)


def task_kind(message) -> str:  # noqa: ANN001
    """'train', 'evaluate', or the SecAgg+ stage; the stage of training is 'masked-input'."""
    from shared.secagg.client import stage_request
    from shared.secagg.protocol import STAGE

    request = stage_request(message)
    return str(request.get(STAGE)) if request is not None else str(message.metadata.message_type)


def server_round(message) -> int | None:  # noqa: ANN001
    """The round a training task (plain, or SecAgg+'s masked-input stage) belongs to; None for others."""
    config = message.content.get(keys.CONFIG) if message.has_content() else None
    value = config.get(keys.SERVER_ROUND) if config is not None else None
    return int(value) if isinstance(value, int) else None


def is_training(kind: str) -> bool:
    return kind in ("train", "masked-input")


class EventLog:
    """A device process's events, one JSON object a line, appended from every device thread."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.lock = threading.Lock()
        self.polls = 0  # pulls for a task, every device's

    def count_poll(self) -> None:
        with self.lock:
            self.polls += 1

    def write(self, **event: object) -> None:
        with self.lock:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def device(k: int, how: Behaviour, log: EventLog, stop: threading.Event, connects: threading.Semaphore) -> None:
    """Device `k` (PKI client-k): connect, answer tasks, sometimes drop or leave, until `stop`."""
    from shared.flower_compat.fleet import load_node_key

    rng = random.Random(f"{how.seed}-{k}")
    clients = Path(how.clients_dir)
    key = load_node_key(clients / f"client-{k}.key")
    node_config = {SIGNING_KEY: str(clients / f"client-{k}.key"), CERTIFICATE: str(clients / f"client-{k}.crt"),
                   ENROLLMENT_CA: how.enrollment_ca}  # fmt: skip
    contexts: dict = {}  # run id -> the device's Context for it (SecAgg+ keeps its state there)
    while not stop.is_set():
        if connected_life(k, key, how, rng, log, stop, connects, contexts, node_config):
            stop.wait(how.away)


def connected_life(k, key, how, rng, log, stop, connects, contexts, node_config) -> bool:  # noqa: ANN001, PLR0913
    """One connection of device `k`, from activation to deactivation; True if it chose to leave or failed."""
    from shared.flower_compat.fleet import fleet_session

    connects.acquire()
    holding = True
    try:
        with fleet_session(how.address, Path(how.ca), key) as session:
            connects.release()
            holding = False
            log.write(e="connected", d=k, node=session.node_id, t=time.time())
            return serve(session, k, how, rng, log, stop, contexts, node_config)
    except Exception as err:  # noqa: BLE001 - a device that fails is reported, not fatal
        log.write(e="error", d=k, why=f"{type(err).__name__}: {err}"[:300], t=time.time())
        return True
    finally:
        if holding:
            connects.release()
        log.write(e="left", d=k, t=time.time())


def serve(session, k, how, rng, log, stop, contexts, node_config) -> bool:  # noqa: ANN001, PLR0913
    """Answer tasks until `stop` (False) or until the device decides to leave (True)."""
    from flwr.app import Context, RecordDict

    while not stop.is_set():
        task = session.pull()
        log.count_poll()
        if task is None:
            stop.wait(how.poll)
            continue
        started = time.time()
        run_id, kind = task.metadata.run_id, task_kind(task)
        if run_id not in contexts:
            contexts[run_id] = Context(run_id, session.node_id, dict(node_config), RecordDict(), session.run_config(run_id))
        round_ = server_round(task)
        if is_training(kind) and rng.random() < how.dropout:
            log.write(e="dropped", d=k, node=session.node_id, round=round_, kind=kind, t=started)
            continue
        reply = answer(task, contexts[run_id])
        if is_training(kind) and how.latency > 0:
            stop.wait(how.latency * rng.uniform(0.5, 1.5))
        session.push(reply)
        log.write(e="reply", d=k, node=session.node_id, round=round_, kind=kind, error=reply.has_error(),
                  t_task=started, t=time.time())  # fmt: skip
        if is_training(kind) and rng.random() < how.reconnect:
            stop.wait(how.linger)  # Flower 1.41 turns a reply into "node unavailable" if its node left before it was pulled
            return True
    return False


def serve_devices(spec_path: Path) -> int:
    """A device process: `spec`'s devices, one thread each, until SIGTERM."""
    spec = json.loads(spec_path.read_text())
    how = Behaviour(**spec["behaviour"])
    stop, connects = threading.Event(), threading.BoundedSemaphore(CONNECTS_AT_ONCE)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log = EventLog(Path(spec["events"]))
    threads = [threading.Thread(target=device, args=(k, how, log, stop, connects), daemon=True) for k in spec["devices"]]
    for thread in threads:
        thread.start()
    while not stop.wait(POLL_REPORT_S):
        log.write(e="polls", p=os.getpid(), n=log.polls, t=time.time())
    for thread in threads:
        thread.join(timeout=max(0.1, STOP_GRACE / 2 / len(threads)))
    log.close()
    return 0


# ------------------------------------------------------------------------------------ coordinator


@dataclass
class Round:
    """What one round showed: its commit time, CPU and accepted replies, and the devices' replies."""

    number: int
    committed: float  # wall clock (metrics.jsonl's mtime)
    cpu_s: float  # the server tree's CPU seconds during the round
    accepted: int  # replies the node ledger accepted during the round
    pushed: int = 0  # training replies the devices pushed
    dropped: int = 0
    slowest_counted: float | None = None  # wall clock of the slowest reply the round counted

    @property
    def overhead_s(self) -> float | None:
        return None if self.slowest_counted is None else self.committed - self.slowest_counted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_devices:
        return serve_devices(Path(args.serve_devices))
    if args.plot:
        plot([json.loads(Path(path).read_text()) for path in args.plot], Path(args.out))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally blocks below
    with tempfile.TemporaryDirectory(prefix="flowerbed-fleet-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = Fleet(work, args).run()
    print(json.dumps(result), flush=True)
    return 0 if result["status"] == "completed" else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100, help=f"connected devices (at most {MAX_DEVICES})")
    parser.add_argument("--per-round", type=int, default=10, help="clients-per-round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--secure", action="store_true", help="SecAgg+ rounds, every device enrolled")
    parser.add_argument("--dropout", type=float, default=0.0, help="chance a device drops a training task mid-round")
    parser.add_argument("--over-select", type=float, default=0.0, help="the run config's over-select")
    parser.add_argument("--reply-deadline", type=float, default=0.0, help="the run config's reply-deadline (s)")
    parser.add_argument("--latency", type=float, default=0.5, help="mean s a device takes to answer a training task")
    parser.add_argument("--reconnect", type=float, default=0.0, help="chance a device leaves after a reply, back later")
    parser.add_argument("--away", type=float, default=5.0, help="s a device that left (or failed) stays away")
    parser.add_argument("--linger", type=float, default=3.0, help="s a leaving device stays after its last reply")
    parser.add_argument("--poll", type=float, default=3.0, help="s between a device's empty pulls (Flower's: 3)")
    parser.add_argument("--processes", type=int, default=0, help="device processes; 0 = one per 250 devices")
    parser.add_argument("--db", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--fleet-front", choices=("on", "off"), default="on", help="fedserver start's --fleet-front")
    parser.add_argument("--hidden", default="200,200", help="the MLP's hidden sizes (784 in, 10 out): 2NN")
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="s for the whole benchmark")
    parser.add_argument("--idle", type=float, default=10.0, help="s the server is measured idle after the run")
    parser.add_argument("--kill-after", type=int, default=0, help="SIGKILL the daemon after this round, then resume it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pki-cache", default="", help="keep each fleet size's PKI here and reuse it")
    parser.add_argument("--keep", default="", help="keep the work directory (logs, state) here")
    parser.add_argument("--plot", nargs="+", default=[], help="draw these results (JSON files) instead of running")
    parser.add_argument("--out", default="docs/img/fleet.png", help="where --plot draws")
    parser.add_argument("--serve-devices", default="", help=argparse.SUPPRESS)  # a device process's spec
    args = parser.parse_args(argv)
    if args.serve_devices or args.plot:
        return args
    if not 1 <= args.devices <= MAX_DEVICES or not 1 <= args.per_round <= args.devices:
        parser.error(f"--devices must be in [1, {MAX_DEVICES}] and --per-round in [1, --devices]")
    if not 1 <= args.rounds <= MAX_ROUNDS:
        parser.error(f"--rounds must be in [1, {MAX_ROUNDS}]")
    for name in ("dropout", "reconnect"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name} must be in [0, 1)")
    return args


class Fleet:
    """The daemon, the device processes, and what is measured of the daemon's tree."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.state = StateDir(work / "state")
        self.processes: list = []
        self.rounds: list[Round] = []
        self.status = "not started"
        self.pki = work / "pki"
        self.connected_at = 0.0  # wall clock when every device had connected
        self.idle: tuple[float, float, float] | None = None  # (start, end, server CPU s) after the run
        self.killed_at: float | None = None  # wall clock of --kill-after's SIGKILL

    def run(self) -> dict[str, object]:
        started = time.monotonic()
        deadline = started + self.args.timeout
        load = os.getloadavg()[0]
        self.pki = self.make_pki()
        (self.work / "run.toml").write_text(self.run_config())
        address = f"127.0.0.1:{free_port()}"
        peak, connect_s = MemoryPeak([], every=0.5), None
        try:
            daemon = self.start_daemon(address)
            peak.roots.append(daemon.pid)
            peak.start()
            self.wait_for_run(daemon, deadline)
            held_back = [self.args.devices] if self.args.idle > 0 and self.args.devices > 1 else []
            how = self.start_devices(address, range(1, self.args.devices + 1 - len(held_back)))
            connect_s = self.wait_connected(daemon, deadline, self.args.devices - len(held_back))
            if held_back:  # round 1 waits for every device: the others are idle, pulling for tasks
                self.measure_idle(daemon)
                self.spawn_devices(how, held_back, "last")
                self.wait_connected(daemon, deadline, self.args.devices)
            self.measure_rounds(daemon, deadline, address, peak)
        except (RuntimeError, KeyboardInterrupt) as err:
            self.status = f"stopped: {err}" if str(err) else "interrupted"
        finally:
            if peak.is_alive():
                peak.stop()
            self.save_server_log()
            stop_trees(self.processes, grace=STOP_GRACE)
        return self.result(peak, connect_s, load, time.monotonic() - started)

    def make_pki(self) -> Path:
        """`fedserver init`'s PKI for the devices: in the work directory, or made once in `--pki-cache`."""
        if not self.args.pki_cache:
            init_pki(self.work / "pki", clients=self.args.devices)
            return self.work / "pki"
        cached = Path(self.args.pki_cache) / f"devices-{self.args.devices}"
        if not (cached / "clients" / f"client-{self.args.devices}.crt").exists():
            init_pki(cached, clients=self.args.devices, force=True)
        return cached

    def run_config(self) -> str:
        a = self.args
        data = self.work / "server.npz"
        rng = np.random.default_rng(a.seed)
        x = rng.integers(0, 256, (TEST_SIZE, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, TEST_SIZE).astype(np.uint8)
        train = np.arange(a.devices) % TEST_SIZE  # the server reads only the test split; one example a device
        np.savez(data, x_train=x[train], y_train=y[train], x_test=x, y_test=y)
        config = {
            "dataset": "mnist", "data-path": str(data), "model": "mlp", "hidden": a.hidden,
            "num-clients": a.devices, "clients-per-round": a.per_round, "rounds": a.rounds, "device": "cpu",
            "node-wait-timeout": a.timeout, "round-timeout": a.round_timeout, "seed": a.seed,
            "secure-aggregation": a.secure,
        }  # fmt: skip
        if a.over_select:
            config["over-select"] = a.over_select
        if a.reply_deadline:
            config["reply-deadline"] = a.reply_deadline
        return tomli_w.dumps(config)

    def start_daemon(self, address: str):  # noqa: ANN201
        argv = [sys.executable, "-m", "fedserver.cli", "start", "--pki", str(self.pki),
                "--config", str(self.work / "run.toml"), "--state-dir", str(self.state.root),
                "--address", address, "--db", self.args.db, "--fleet-front", self.args.fleet_front]  # fmt: skip
        with open(self.work / "fedserver.out", "ab") as out:
            daemon = spawn(argv, env=fleet_env(), stdout=out, cwd=REPO)
        self.processes.append(daemon)
        host, port = address.rsplit(":", 1)
        if not wait_for_port(host, int(port), 120, alive=daemon):
            raise RuntimeError(f"fedserver did not start; see {self.work / 'fedserver.out'}")
        return daemon

    def wait_for_run(self, daemon, deadline: float) -> None:  # noqa: ANN001
        """Until the daemon has registered every key and submitted the run (devices would be refused before)."""
        while "submitted" not in (self.state.log.read_text() if self.state.log.exists() else ""):
            self.check_alive(daemon, deadline, "submitting the run")
            time.sleep(0.2)

    def start_devices(self, address: str, devices: range) -> Behaviour:
        """`devices` (PKI client numbers) spread over the device processes; how they behave."""
        a = self.args
        count = a.processes or max(1, math.ceil(len(devices) / 250))
        how = Behaviour(address, str(self.pki / "ca.pem"), str(self.pki / "clients"),
                        str(self.pki / "enrollment" / "enrollment-ca.pem"), a.poll, a.latency,
                        a.dropout, a.reconnect, a.away, a.linger, a.seed)  # fmt: skip
        for index in range(count):
            self.spawn_devices(how, list(devices[index::count]), str(index))
        return how

    def spawn_devices(self, how: Behaviour, devices: list[int], name: str) -> None:
        spec = self.work / f"devices-{name}.json"
        spec.write_text(json.dumps({"behaviour": asdict(how), "devices": devices,
                                    "events": str(self.work / f"events-{name}.jsonl")}))  # fmt: skip
        with open(self.work / f"devices-{name}.out", "ab") as out:
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve-devices", str(spec)]
            self.processes.append(spawn(argv, env=fleet_env(), stdout=out, cwd=REPO))

    def events(self) -> list[dict]:
        found = []
        for path in sorted(self.work.glob("events-*.jsonl")):
            found += [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        return found

    def wait_connected(self, daemon, deadline: float, devices: int) -> float:  # noqa: ANN001
        """Seconds until `devices` devices have connected once."""
        started = time.monotonic()
        while len({e["d"] for e in self.events() if e["e"] == "connected"}) < devices:
            self.check_alive(daemon, deadline, "the devices connecting")
            time.sleep(0.5)
        self.connected_at = time.time()
        return time.monotonic() - started

    def measure_rounds(self, daemon, deadline: float, address: str, peak: MemoryPeak) -> None:  # noqa: ANN001
        """Each round as it is committed: its time, the tree's CPU and the ledger's accepted replies;
        after round `--kill-after`, the daemon SIGKILLed and started again on its state (resume)."""
        metrics = self.state.run_dir / "metrics.jsonl"
        cpu, accepted = cpu_seconds([daemon.pid]), 0
        while len(self.rounds) < self.args.rounds:
            self.check_alive(daemon, deadline, f"round {len(self.rounds) + 1}")
            if len(read_metrics(self.state.run_dir)) <= len(self.rounds):
                time.sleep(0.1)
                continue
            now_cpu, now_accepted = cpu_seconds([daemon.pid]), ledger_accepted(self.state.run_dir, metrics.stat().st_mtime)
            number = len(self.rounds) + 1
            self.rounds.append(Round(number, metrics.stat().st_mtime, now_cpu - cpu, now_accepted - accepted))
            cpu, accepted = now_cpu, now_accepted
            if number == self.args.kill_after and number < self.args.rounds:
                daemon = self.restart(daemon, address, peak)
                cpu = cpu_seconds([daemon.pid])
        self.status = "completed"

    def restart(self, daemon, address: str, peak: MemoryPeak):  # noqa: ANN001, ANN201
        """SIGKILL the daemon's whole tree, as a machine crash would, and run the same command again
        on its state directory."""
        for pid in {daemon.pid, *descendants(daemon.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        daemon.wait()
        self.killed_at = time.time()
        restarted = self.start_daemon(address)
        peak.roots.append(restarted.pid)
        return restarted

    def idle_cost(self, events: list[dict]) -> dict[str, float | None]:
        """What the devices' polling alone costs the server, from the idle window before round 1."""
        if self.idle is None:
            return {"idle_server_cpu_s_per_s": None, "server_cpu_ms_per_pull": None}
        start, end, cpu = self.idle
        rate = pull_rate(events, start - POLL_REPORT_S, end + POLL_REPORT_S)
        return {
            "idle_server_cpu_s_per_s": round(cpu / (end - start), 3),
            "server_cpu_ms_per_pull": round(1000 * cpu / (end - start) / rate, 2) if rate else None,
        }

    def save_server_log(self) -> None:
        """The ServerApp's log, kept by the SuperLink, to WORK/serverapp.log (`flwr log RUN --show`)."""
        info = DaemonInfo.read(self.state.info)
        if info is None:
            return
        env = {**fleet_env(), "FLWR_HOME": str(self.state.flwr_home)}
        command = [str(Path(sys.executable).parent / "flwr"), "log", str(info.run_id), "--show"]
        try:
            shown = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return
        (self.work / "serverapp.log").write_text(shown.stdout + shown.stderr)

    def measure_idle(self, daemon) -> None:  # noqa: ANN001
        """The tree's CPU for `--idle` s while the devices connected pull for tasks and none has come."""
        start, cpu = time.time(), cpu_seconds([daemon.pid])
        time.sleep(self.args.idle)
        self.idle = (start, time.time(), cpu_seconds([daemon.pid]) - cpu)

    def check_alive(self, daemon, deadline: float, what: str) -> None:  # noqa: ANN001
        if daemon.poll() is not None:
            raise RuntimeError(f"fedserver exited with code {daemon.returncode} during {what}")
        info = DaemonInfo.read(self.state.info)
        if info is not None and info.run_status.startswith("finished"):
            raise RuntimeError(f"the run ended during {what}: {info.run_status} {info.run_details}"[:300])
        if time.monotonic() > deadline:
            raise RuntimeError(f"--timeout {self.args.timeout:g} s passed during {what}")

    def resume_s(self) -> float | None:
        """Seconds from --kill-after's SIGKILL to the next round's commit."""
        after = [r.committed for r in self.rounds if r.number == self.args.kill_after + 1]
        return round(after[0] - self.killed_at, 1) if after and self.killed_at is not None else None

    def result(self, peak: MemoryPeak, connect_s: float | None, load: float, wall_s: float) -> dict[str, object]:
        a = self.args
        events = self.events()
        for round_ in self.rounds:
            fill_round(round_, events, a.per_round)
        overheads = [r.overhead_s for r in self.rounds if r.overhead_s is not None]
        cpu = sum(r.cpu_s for r in self.rounds)
        lost = sum(max(0, min(a.per_round, r.pushed) - r.accepted) for r in self.rounds)
        last_commit = self.rounds[-1].committed if self.rounds else 0.0
        return {
            "devices": a.devices, "per_round": a.per_round, "rounds": a.rounds, "rounds_completed": len(self.rounds),
            "lost_replies": lost,
            "round_overhead_s": round(statistics.median(overheads), 3) if overheads else None,
            "round_overhead_max_s": round(max(overheads), 3) if overheads else None,
            "server_cpu_s_per_device_round": round(cpu / (len(self.rounds) * a.per_round), 4) if self.rounds else None,
            "server_cpu_s_per_round": [round(r.cpu_s, 2) for r in self.rounds],
            "server_peak_mb": round(peak.peak_rss / 1024), "server_peak_pss_mb": round(peak.peak_pss / 1024),
            "round_s": [row["seconds"] for row in read_metrics(self.state.run_dir)],
            "accepted": [r.accepted for r in self.rounds], "pushed": [r.pushed for r in self.rounds],
            "dropped": sum(r.dropped for r in self.rounds),
            "device_errors": sum(1 for e in events if e["e"] == "error"),
            "departures": sum(1 for e in events if e["e"] == "left" and e["t"] <= last_commit),
            "device_pulls_per_s": pull_rate(events, self.connected_at, last_commit),
            **self.idle_cost(events),
            "secure": a.secure, "dropout": a.dropout, "over_select": a.over_select,
            "reply_deadline": a.reply_deadline, "latency_s": a.latency, "poll_s": a.poll, "db": a.db, "fleet_front": a.fleet_front,
            "connect_s": None if connect_s is None else round(connect_s, 1), "wall_s": round(wall_s, 1),
            "load_average_at_start": round(load, 2), "cpus": os.cpu_count(), "status": self.status,
            "kill_after": a.kill_after, "resume_s": self.resume_s(),
        }  # fmt: skip


def plot(results: list[dict], out: Path) -> None:
    """Server CPU per device-round, round overhead and peak memory against connected devices, a
    line for each sampled share and aggregation (runs that completed no round are left out)."""
    import matplotlib  # noqa: PLC0415 - only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = [("server_cpu_s_per_device_round", "server CPU s per device-round"),
              ("round_overhead_s", "round time beyond the slowest reply (s)"), ("server_peak_mb", "server peak RSS (MB)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    lines: dict[tuple[bool, int, str, str], list[dict]] = {}
    for result in results:
        if result["rounds_completed"]:
            share = round(100 * result["per_round"] / result["devices"])
            front = result.get("fleet_front", "on")
            lines.setdefault((result["secure"], share, result["db"], front), []).append(result)
    for (secure, share, db, front), runs in sorted(lines.items()):
        runs.sort(key=lambda r: r["devices"])
        label = f"{share} % a round, {'SecAgg+' if secure else 'plaintext'}, {db}, fleet front {front}"
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot([r["devices"] for r in runs], [r[key] for r in runs], "o:" if front == "off" else "o-", label=label)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ax.set_xticks([100, 300, 1000], ["100", "300", "1000"])
        ax.minorticks_off()
        ax.set_xlabel("connected devices")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def fill_round(round_: Round, events: list[dict], per_round: int) -> None:
    """The devices' side of `round_`: training replies pushed, dropped, and the slowest counted reply
    (the `per_round`-th training reply, and every reply of a later stage of a secure round)."""
    mine = [e for e in events if e.get("round") == round_.number and e["t"] <= round_.committed]
    training = sorted(e["t"] for e in mine if e["e"] == "reply" and is_training(e["kind"]) and not e["error"])
    started = min((e["t_task"] for e in mine if e["e"] == "reply"), default=round_.committed)
    later = [e["t"] for e in events if e["e"] == "reply" and e["kind"] == "unmask" and started <= e["t"] <= round_.committed]
    round_.pushed = len(training)
    round_.dropped = sum(1 for e in mine if e["e"] == "dropped")
    counted = training[: per_round][-1:] + later
    round_.slowest_counted = max(counted) if counted else None


def pull_rate(events: list[dict], start: float, end: float) -> float | None:
    """Pulls for a task per second, all devices together, between `start` and `end` (wall clock)."""
    counts = [e for e in events if e["e"] == "polls" and start <= e["t"] <= end]
    first = {e["p"]: e for e in reversed(counts)}
    last = {e["p"]: e for e in counts}
    spans = [(last[p]["n"] - first[p]["n"], last[p]["t"] - first[p]["t"]) for p in last if last[p]["t"] > first[p]["t"]]
    if not spans:
        return None
    return round(sum(n for n, _ in spans) / statistics.mean(t for _, t in spans), 1)


def ledger_accepted(run_dir: Path, since: float, wait: float = 5.0) -> int:
    """Replies the run's node ledger has accepted so far, over every node, once it is saved at or
    after `since` (the ServerApp saves it just after the round's metrics)."""
    path, deadline = run_dir / NODES_FILE, time.monotonic() + wait
    while time.monotonic() < deadline and (not path.exists() or path.stat().st_mtime < since):
        time.sleep(0.05)
    try:
        return sum(entry["accepted"] for entry in json.loads(path.read_text())["nodes"])
    except (OSError, ValueError, KeyError):
        return 0


def fleet_env() -> dict[str, str]:
    return {**node_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}


if __name__ == "__main__":
    sys.exit(main())
