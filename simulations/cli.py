"""`fedsim run [CONFIG.toml | --config CONFIG.toml] [--set key=value ...] [--output DIR] [--client-app MODULE:ATTR]`:
parse, load the app (Flowerbed's), run it with the runner (simulations/runner.py).

`fedsim run --app DIR [--run-config 'key=value ...'] [--num-supernodes N]` runs a Flower app
directory instead (simulations/apps.py): the same runner, another app."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedserver.cli import add_dashboard_arguments, dashboard_flag
from shared.cli import add_command, build_parser as build_command_parser, run_cli
from shared.config import BACKENDS, load_config
from shared.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from fedserver.dashboard import Dashboard
    from fedserver.events import RoundCallback
    from simulations.runner import Backend, SimulatedApp

PROG = "fedsim"
DEFAULT_NAME = "default"  # the embedded federation: FedProx Synthetic(1,1), 30 clients


def build_parser() -> argparse.ArgumentParser:
    parser = build_command_parser(PROG, "Flowerbed simulator: run a whole federation in one process.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = add_command(sub, "run", "run a federation (the embedded default when no config is given)")
    run.add_argument("config_arg", nargs="?", type=Path, metavar="CONFIG", help="a TOML run config (see configs/)")
    run.add_argument("--config", type=Path, metavar="CONFIG", help="the same, as an option (as 'fedserver start')")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key (repeatable)")
    run.add_argument("--output", type=Path, help="output directory (default runs/<config name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="go on with the run in DIR after its last completed round (its config.toml, plus --set)")
    run.add_argument("--workers", metavar="N",
                     help="processes training clients in parallel: a count or 'auto' (= --set workers=N); also with --app")
    run.add_argument("--gpu-memory-fraction", metavar="F",
                     help="on CUDA, the share of a GPU's memory each worker may use (= --set gpu-memory-fraction=F); "
                          "also with --app")
    run.add_argument("--backend", choices=BACKENDS,
                     help="what runs the clients: fedsim's own grid, or Flower's Ray engine (= --set backend=NAME)")
    run.add_argument("--quiet", action="store_true", help="no progress bar (with --app: no Flower INFO log)")
    run.add_argument("--client-app", default="", metavar="MODULE:ATTR",
                     help="every node runs this ClientApp object instead of Flowerbed's (e.g. a malicious one)")
    app = run.add_argument_group("a Flower app (instead of a platform config)")
    app.add_argument("--app", type=Path, metavar="DIR",
                     help="run the Flower app in DIR (its pyproject.toml names a serverapp and a clientapp)")
    app.add_argument("--run-config", dest="run_config", action="append", default=[], metavar="'KEY=VALUE ...'",
                     help="override the app's [tool.flwr.app.config], as 'flwr run --run-config' (repeatable)")
    app.add_argument("--num-supernodes", type=int, metavar="N",
                     help="virtual nodes (default: the app's local-simulation federation, else Flower's default)")
    add_dashboard_arguments(run, default=None)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, `config` being the positional CONFIG or --config (not both)."""
    args = build_parser().parse_args(argv)
    if args.config_arg is not None and args.config is not None:
        raise UsageError("give the config once: CONFIG or --config CONFIG")
    args.config = args.config or args.config_arg
    if args.resume is not None and (args.config is not None or args.output is not None):
        raise UsageError("--resume DIR takes its config and output from DIR")
    _check_app_args(args)
    _check_dashboard_args(args)
    return args


def _check_dashboard_args(args: argparse.Namespace) -> None:
    """The dashboard shows Flowerbed's round events; its files go with it."""
    args.dashboard = dashboard_flag(args.dashboard)
    if args.dashboard is None and (args.dashboard_token_file or args.dashboard_names):
        raise UsageError("--dashboard-token-file and --dashboard-names go with --dashboard [HOST:]PORT")
    if args.dashboard is not None and args.app is not None:
        raise UsageError("--dashboard shows Flowerbed's round events, and a Flower app (--app) tells none")


def _check_app_args(args: argparse.Namespace) -> None:
    """`--app` brings its own config; `--run-config` and `--num-supernodes` are for an app only."""
    if args.app is None:
        if args.run_config or args.num_supernodes is not None:
            raise UsageError("--run-config and --num-supernodes go with --app DIR")
        return
    given = (("CONFIG", args.config), ("--set", args.overrides), ("--resume", args.resume),
             ("--client-app", args.client_app))  # fmt: skip
    platform = [name for name, value in given if value]
    if platform:
        raise UsageError(f"--app runs a Flower app with its own config: give --run-config, not {', '.join(platform)}")


def default_output(config: Path | None) -> Path:
    name = config.stem if config is not None else DEFAULT_NAME
    return Path("runs") / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    """`fedsim run`: load the app (Flowerbed's, or `--app`'s), run it with the runner, report."""
    from simulations.runner import simulate  # torch and Flower load only for a run

    dashboard = _dashboard(args)  # its flags and files checked before anything is written
    with loaded_app(args) as (app, backend), _served(dashboard, app) as subscribers:
        result = simulate(app, backend, subscribers=subscribers)
    return report(result.summary, f"{result.output}/ ({result.outputs})", result.interrupted)


def _dashboard(args: argparse.Namespace) -> Dashboard | None:
    from fedserver.dashboard import Dashboard

    return Dashboard.for_simulation(args.dashboard, args.dashboard_token_file, args.dashboard_names) if args.dashboard else None


@contextlib.contextmanager
def _served(dashboard: Dashboard | None, app: SimulatedApp) -> Iterator[list[RoundCallback]]:
    """The dashboard's round-event subscriber, the page served for the block (its URL on stderr); none without one."""
    if dashboard is None:
        yield []
        return
    dashboard.describe(app.cfg, app.rows)  # type: ignore[attr-defined] - Flowerbed's app: --app refuses --dashboard
    with dashboard:
        print(f"dashboard on {dashboard.url}", file=sys.stderr, flush=True)
        yield [dashboard.subscriber]


@contextlib.contextmanager
def loaded_app(args: argparse.Namespace) -> Iterator[tuple[SimulatedApp, Backend]]:
    """The app `fedsim run` runs and the backend its execution keys (config or flags) name."""
    from simulations.runner import Backend

    if args.app is not None:
        from simulations.apps import FlowerAppRun, load_flower_app

        backend = Backend.from_config(load_config(None, execution_overrides(args)))  # checked as config keys
        backend.require()
        app = load_flower_app(args.app, args.run_config, args.num_supernodes)
        yield FlowerAppRun(app, args.output or default_output(app.directory), quiet=args.quiet), backend
        return
    from simulations.engine import CONFIG_FILE, flowerbed_app

    config = args.resume / CONFIG_FILE if args.resume else args.config
    cfg = load_config(config, [*args.overrides, *execution_overrides(args)])
    output = args.resume or args.output or default_output(args.config)
    resume, progress, backend = args.resume is not None, not args.quiet, Backend.from_config(cfg)
    backend.require()
    with flowerbed_app(cfg, output, progress=progress, resume=resume, client_app=args.client_app) as flowerbed:
        yield flowerbed, backend


def execution_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides `--workers`, `--gpu-memory-fraction` and `--backend` stand for."""
    flags = (("workers", args.workers), ("gpu-memory-fraction", args.gpu_memory_fraction), ("backend", args.backend))
    return [f"{key}={value}" for key, value in flags if value is not None]


def report(summary: dict[str, object], outputs: str, interrupted: bool) -> int:
    """Print a run's summary and where its outputs are; return the exit status."""
    print(json.dumps(summary, indent=2))
    print(f"outputs in {outputs}")
    if interrupted:
        print(f"{PROG}: interrupted; what was written is kept", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedsim` console script; returns the exit status (shared.errors.ExitCode)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return run_cli(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
