"""`fedsim run [CONFIG.toml | --config CONFIG.toml] [--set key=value ...] [--output DIR]`: parse, then call the engine."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from shared.cli import add_command, build_parser as build_command_parser, run_cli
from shared.config import load_config
from shared.errors import ExitCode, UsageError

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
    run.add_argument("--workers", metavar="N", help="processes training clients in parallel: a count or 'auto' (= --set workers=N)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, `config` being the positional CONFIG or --config (not both)."""
    args = build_parser().parse_args(argv)
    if args.config_arg is not None and args.config is not None:
        raise UsageError("give the config once: CONFIG or --config CONFIG")
    args.config = args.config or args.config_arg
    if args.resume is not None and (args.config is not None or args.output is not None):
        raise UsageError("--resume DIR takes its config and output from DIR")
    return args


def default_output(config: Path | None) -> Path:
    name = config.stem if config is not None else DEFAULT_NAME
    return Path("runs") / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    from simulations.engine import CONFIG_FILE, run_simulation  # torch and Flower load only for a run

    config = args.resume / CONFIG_FILE if args.resume else args.config
    workers = [f"workers={args.workers}"] if args.workers is not None else []
    cfg = load_config(config, [*args.overrides, *workers])
    output = args.resume or args.output or default_output(args.config)
    result = run_simulation(cfg, output, progress=not args.quiet, resume=args.resume is not None)
    print(json.dumps(result.summary, indent=2))
    print(f"outputs in {result.output}/ (config.toml, metrics.jsonl, summary.json, curves.png, model.safetensors)")
    if result.interrupted:
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
