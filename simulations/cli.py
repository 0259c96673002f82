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
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def default_output(config: Path | None) -> Path:
    name = config.stem if config is not None else DEFAULT_NAME
    return Path("runs") / f"{name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from simulations.engine import run_simulation  # torch and Flower load only for a run

        result = run_simulation(cfg, args.output or default_output(args.config), progress=not args.quiet)
    except (ConfigError, DataError) as err:
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.summary, indent=2))
    print(f"outputs in {result.output}/ (config.toml, metrics.jsonl, summary.json, curves.png, model.safetensors)")
    if result.interrupted:
        print("fedsim: interrupted; what was written is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
