"""The warm worker: one long-lived process runs every ClientApp task of its SuperNode
(`flower-supernode --isolation process`), so PyTorch, the model and the data stay loaded across rounds.

It takes `flwr-clientapp`'s steps over the SuperNode's Runtime API (shared.flower_compat.runtime),
but runs the ClientApp installed on this device, refuses a task whose FAB names another (unless
`--trust-server-code`), and replies to a failure with a code and its fixed message only
(shared/device_errors.py). It signs its requests for tasks with the SuperNode's secret and trusts
only the SuperNode's certificate: docs/security.md.

    python -m fedclient.worker --runtime-api-address 127.0.0.1:9094 --runtime-certificate PATH
        [--poll-interval 0.2] [--client-app M:A] [--trust-server-code] [--auth-secret-file PATH]
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from shared.device_errors import MESSAGES, DeviceCode
from shared.flower_compat.app_config import get_fab_config
from shared.flower_compat.runtime import (
    Fab,
    Interceptor,
    Run,
    RuntimeHttpClient,
    SubStatus,
    acquire_client_app_task,
    install_fab_client_app,
    load_client_app,
    pull_task_input,
    push_message,
    push_task_output,
    runtime_client,
    superexec_interceptors,
    task_heartbeat,
    task_interceptors,
)

LOG = logging.getLogger("flowerbed.worker")
DEFAULT_POLL_INTERVAL = 0.2  # s; each poll costs the worker and the SuperNode a request
# The project's packages this worker imports itself; the FAB's ClientApp imports the FAB's copies.
OWN_PACKAGES = ((__package__ or "fedclient").split(".")[0], "shared")  # __name__ is "__main__" under -m
WARM_MODULES = ("torch", "numpy")  # what the ClientApp imports that is slow to import
INSTALLED_CLIENT_APP = "fedclient.app:app"  # the ClientApp a device runs; Flowerbed's FABs name it
# Retry delays (s) for a message object the SuperNode has not received yet: first, and cap. Flower's
# (1 s, 2 s, ...) cost a warm worker, which takes a task at once, about 1 s a round.
OBJECT_RETRY = (0.02, 0.2)


@dataclass
class LoadedApp:
    """The ClientApp this worker serves: its FAB's hash and installed directory."""

    fab_hash: str = ""
    app: ClientApp | None = None
    directory: Path | None = None
    override: str = ""  # MODULE:ATTR served instead of the installed or the FAB's ClientApp (tests)
    trust_server_code: bool = False  # run the FAB's code (Flower's behaviour), not the installed app


class ForeignClientAppError(Exception):
    """A task's FAB names a ClientApp other than the installed one, and server code is not trusted."""


@dataclass
class TaskOutcome:
    """What a task produced: the reply to push and the final status for the SuperNode."""

    reply: Message | None = None
    context: Context | None = None
    status: str = SubStatus.FAILED
    details: str = "ClientApp task failed"
    kind: str = "task"  # the message type, once known
    seconds: dict[str, float] = field(default_factory=dict)  # per step, for the log

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = time.perf_counter() - started


@dataclass(frozen=True)
class RuntimeLink:
    """The SuperNode's Runtime API: its address, and the one certificate (PEM) it must prove itself with."""

    address: str
    certificate: bytes

    def client(self, interceptors: Sequence[Interceptor] = (), retry: bool = True) -> RuntimeHttpClient:
        """A TLS client that trusts `certificate` alone (and checks that it names the address's host)."""
        return runtime_client(self.address, self.certificate, interceptors, retry)


@dataclass
class LinkReport:
    """What the worker says about its link to the SuperNode: a failure once per streak, then the recovery."""

    address: str
    failing: str = ""  # "unverified" or "unanswered" during a streak of failed polls

    def unverified(self, why: str) -> None:
        text = "the Runtime API at %s did not prove to be this node's SuperNode: %s; taking no task"
        self._once("unverified", text, why)

    def unanswered(self, why: str) -> None:
        self._once("unanswered", "the Runtime API at %s does not answer (%s); waiting for the SuperNode", why)

    def answered(self) -> None:
        if self.failing:
            LOG.info("the Runtime API at %s answers as this node's SuperNode again", self.address)
        self.failing = ""

    def _once(self, kind: str, text: str, why: str) -> None:
        if kind != self.failing:
            LOG.warning(text, self.address, why)
        self.failing = kind


def serve(
    link: RuntimeLink,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    loaded: LoadedApp | None = None,
    auth_secret_file: Path | None = None,
) -> None:
    """Acquire and run ClientApp tasks from the SuperNode at `link` until stopped.

    `loaded` says which ClientApp to run (default: the installed one); with `auth_secret_file`
    the requests for tasks are signed with the SuperNode's SuperExec secret.
    """
    loaded = loaded or LoadedApp()
    warm_imports()
    # `poll` says why a request failed, and it is sent again
    superexec = link.client(superexec_interceptors(auth_secret_file), retry=False)
    report = LinkReport(link.address)
    code = "the FAB's ClientApp (--trust-server-code)" if loaded.trust_server_code else "the installed ClientApp"
    LOG.info("warm ClientApp worker polling %s every %.2f s; runs %s", link.address, poll_interval, code)
    while True:
        token = poll(superexec, report)
        if token:
            run_task(link, token, loaded)
        else:
            time.sleep(poll_interval)


def poll(superexec: RuntimeHttpClient, report: LinkReport) -> str:
    """One request for a task: its token, or "" when the SuperNode has none or there is no SuperNode to ask.

    What answers on the port and fails the TLS handshake (a certificate other than the SuperNode's,
    no TLS) never sees the request: `report` says so once per streak of such polls.
    """
    try:
        token = acquire_client_app_task(superexec)
    except httpx.TransportError as err:
        failure = _tls_failure(err)
        if failure is not None:
            report.unverified(str(failure))
        else:
            report.unanswered(str(err) or type(err).__name__)
        return ""
    report.answered()
    return token


def _tls_failure(err: BaseException) -> ssl.SSLError | None:
    """The TLS error (handshake, certificate) under an HTTP client's error, if that is what it is."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    return cause


def warm_imports() -> None:
    """Import what every ClientApp of this project needs once, before the first task."""
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def run_task(link: RuntimeLink, token: str, loaded: LoadedApp) -> None:
    """Flower's `flwr-clientapp` steps for one task, in this process."""
    client = link.client(task_interceptors(token))
    beat_client = link.client(task_interceptors(token), retry=False)
    heartbeat = task_heartbeat(beat_client)
    heartbeat.start()
    outcome = TaskOutcome()
    try:
        _execute(client, loaded, outcome)
    finally:
        _finish(client, outcome)
        heartbeat.stop()
        beat_client.close()
        client.close()
    steps = ", ".join(f"{step} {seconds:.2f} s" for step, seconds in outcome.seconds.items())
    LOG.info("%s message %s: %s", outcome.kind, outcome.status, steps)


def _execute(client: RuntimeHttpClient, loaded: LoadedApp, outcome: TaskOutcome) -> None:
    message: Message | None = None
    try:
        with outcome.timed("pull"):
            message, outcome.context, run, fab = pull_task_input(client, OBJECT_RETRY)
        outcome.kind = message.metadata.message_type
        with outcome.timed("load"):
            app = _client_app(loaded, run, fab)
        with outcome.timed("ClientApp"):
            outcome.reply = app(message=message, context=outcome.context)
        outcome.status, outcome.details = SubStatus.COMPLETED, ""
    except Exception as ex:  # pylint: disable=broad-exception-caught
        # As flwr-clientapp does, the failure goes back to the server as an Error reply; unlike it,
        # with a code and its fixed message only: the exception's text stays in this log.
        foreign = isinstance(ex, ForeignClientAppError)
        if foreign:
            LOG.error("refused the task: %s", ex)
        else:
            LOG.error("ClientApp raised an exception", exc_info=ex)
        code = DeviceCode.FOREIGN_CODE if foreign else DeviceCode.FAILED
        outcome.details = MESSAGES[code]
        if message is not None:
            outcome.reply = Message(Error(code=code, reason=MESSAGES[code]), reply_to=message)


def _finish(client: RuntimeHttpClient, outcome: TaskOutcome) -> None:
    if outcome.reply is not None and outcome.context is not None:
        try:
            with outcome.timed("reply"):
                push_message(client, outcome.reply, outcome.context)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            LOG.error("failed to push the reply message", exc_info=ex)
            outcome.status, outcome.details = SubStatus.FAILED, "pushing the reply failed (details in the device's log)"
    push_task_output(client=client, context=outcome.context, sub_status=outcome.status, details=outcome.details)


def _client_app(loaded: LoadedApp, run: Run, fab: Fab) -> ClientApp:
    """The ClientApp to run for a task of `run` with `fab`: the installed one or the FAB's."""
    if loaded.trust_server_code:
        return _fab_client_app(loaded, run, fab)
    return _installed_client_app(loaded, fab)


def _installed_client_app(loaded: LoadedApp, fab: Fab) -> ClientApp:
    """The installed ClientApp (or the override), once `fab` is known to name the installed one."""
    if fab.hash_str != loaded.fab_hash:
        named = fab_client_app(fab.content)
        if named != INSTALLED_CLIENT_APP:
            raise ForeignClientAppError(
                f"the run's FAB names the ClientApp {named!r}; this device runs only its installed "
                f"{INSTALLED_CLIENT_APP} (start fedclient with --trust-server-code to run the server's code)"
            )
        loaded.fab_hash = fab.hash_str
    if loaded.app is None:
        reference = loaded.override or INSTALLED_CLIENT_APP
        loaded.app = load_client_app(reference)
    return loaded.app


def fab_client_app(content: bytes) -> str:
    """The `clientapp` component a FAB's pyproject.toml names, read without installing the FAB."""
    try:
        return str(get_fab_config(content)["tool"]["flwr"]["app"]["components"]["clientapp"])
    except Exception as ex:  # pylint: disable=broad-exception-caught  # a zip, TOML or schema error
        raise ForeignClientAppError(f"the run's FAB names no ClientApp that can be read ({ex})") from ex


def _fab_client_app(loaded: LoadedApp, run: Run, fab: Fab) -> ClientApp:
    """The FAB's ClientApp (or the override): installed and imported on its first task only."""
    if loaded.app is not None and (loaded.override or fab.hash_str == loaded.fab_hash):
        return loaded.app
    if loaded.override:
        loaded.app = load_client_app(loaded.override)
        return loaded.app
    if loaded.directory is None:
        _forget_modules(lambda name, _file: name.split(".")[0] in OWN_PACKAGES)
    else:
        LOG.info("new app (FAB %s): unloading FAB %s", fab.hash_str[:8], loaded.fab_hash[:8])
        _unload(loaded.directory)
    loaded.app, loaded.directory = install_fab_client_app(run, fab)
    loaded.fab_hash = fab.hash_str
    return loaded.app


def _unload(directory: Path) -> None:
    """Forget every module imported from an installed app, and its directory on `sys.path`."""
    root = str(Path(directory).resolve())
    _forget_modules(lambda _name, file: file.startswith(root + os.sep))
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry) != root]


def _forget_modules(matches: Callable[[str, str], bool]) -> None:
    """Drop from `sys.modules` each module for which `matches(name, file)`."""
    for name, module in list(sys.modules.items()):
        if matches(name, str(getattr(module, "__file__", None) or "")):
            del sys.modules[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedclient.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT", help="the SuperNode's Runtime API")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL, metavar="SECONDS")
    parser.add_argument("--client-app", default="", metavar="MODULE:ATTR", help="for tests: serve this ClientApp")
    parser.add_argument("--trust-server-code", action="store_true", help="run the ClientApp each run's FAB names")
    parser.add_argument("--auth-secret-file", type=Path, metavar="PATH", help="the SuperNode's SuperExec secret")
    parser.add_argument(
        "--runtime-certificate", type=Path, required=True, metavar="PATH",
        help="the certificate the SuperNode's Runtime API must present (the only one trusted)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        link = RuntimeLink(args.runtime_api_address, args.runtime_certificate.read_bytes())
    except OSError as err:
        parser.error(f"--runtime-certificate {args.runtime_certificate}: {err.strerror or err}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):  # a line per poll otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        loaded = LoadedApp(override=args.client_app, trust_server_code=args.trust_server_code)
        serve(link, args.poll_interval, loaded, args.auth_secret_file)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
