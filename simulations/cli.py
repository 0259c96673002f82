"""`fedsim run [CONFIG.toml] [--set key=value ...] [--output DIR]`: parse, then call the engine."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from shared.config import ConfigError, load_config
from shared.data.errors import DataError

DEFAULT_NAME = "default"  # the embedded federation: FedProx Synthetic(1,1), 30 clients


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description="Simulate a federation in one process.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federation (the embedded default when no CONFIG is given)")
    run.add_argument("config", nargs="?", type=Path, help="a TOML run config (see configs/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key (repeatable)")
    run.add_argument("--output", type=Path, help="output directory (default runs/<config name>-<time>)")
    run.add_argument("--resume", type=Path, metavar="DIR",
                     help="go on with the run in DIR after its last completed round (its config.toml, plus --set)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def default_output(config: Path | None) -> Path:
    name = config.stem if config is not None else DEFAULT_NAME
    return Path("runs") / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    args = build_parser().parse_args(argv)
    if args.resume is not None and (args.config is not None or args.output is not None):
        print("fedsim: error: --resume DIR takes its config and output from DIR", file=sys.stderr)
        return 2
    try:
        from fedserver.app import RoundFailed  # torch and Flower load only for a run
        from fedserver.checkpoints import CheckpointError
        from simulations.engine import CONFIG_FILE, OutputExists, run_simulation

        config = args.resume / CONFIG_FILE if args.resume else args.config
        cfg = load_config(config, args.overrides)
        output = args.resume or args.output or default_output(args.config)
        result = run_simulation(cfg, output, progress=not args.quiet, resume=args.resume is not None)
    except (ConfigError, DataError, CheckpointError, OutputExists) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    except RoundFailed as err:
        print(f"fedsim: run failed: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary, indent=2))
    print(f"outputs in {result.output}/ (config.toml, metrics.jsonl, summary.json, curves.png, model.safetensors)")
    if result.interrupted:
        print("fedsim: interrupted; what was written is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
