"""Write docs/config.md and pyproject's `[tool.flwr.app.config]` from RunConfig: `python -m shared.config_docs`.

RunConfig (shared/config.py) is the one source of every key's type, default and meaning;
tests/shared/test_config_docs.py fails when either generated file is stale.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from pathlib import Path

import tomli_w

from shared.config import CHOICES, RunConfig, Scalar, Section, config_key, toml_value

COMMAND = "python -m shared.config_docs"
REPO = Path(__file__).resolve().parents[1]
CONFIG_DOC = Path("docs") / "config.md"
PYPROJECT = Path("pyproject.toml")
TABLE_HEADER = "[tool.flwr.app.config]"

# The one deliberate difference between pyproject's table and RunConfig, and why.
FLWR_RUN_OVERRIDES: dict[str, Scalar] = {"num-clients": 2, "clients-per-round": 2, "rounds": 3}
FLWR_RUN_REASON = (
    "`flwr run .` runs on the SuperNodes that are connected, usually two or three on a first try; "
    f"with {RunConfig().num_clients} clients every round would wait `node-wait-timeout` "
    f"({RunConfig().node_wait_timeout:g} s) for nodes that never come. Set the federation's size with "
    "`flwr run . <federation> --run-config 'num-clients=N clients-per-round=K'`."
)


def flwr_run_defaults() -> dict[str, Scalar]:
    """The run config `flwr run .` starts from: RunConfig's defaults and FLWR_RUN_OVERRIDES."""
    return {**RunConfig().to_mapping(), **FLWR_RUN_OVERRIDES}


def flwr_table() -> str:
    """pyproject's `[tool.flwr.app.config]` table, header included."""
    lines = [
        TABLE_HEADER,
        f"# Generated from RunConfig (shared/config.py) by `{COMMAND}`: edit there, not here.",
        "# Flower accepts a `flwr run --run-config` key only if it is in this table, so it lists every key.",
        f"# RunConfig's defaults, except {', '.join(FLWR_RUN_OVERRIDES)} (see {CONFIG_DOC.as_posix()}).",
    ]
    return "\n".join(lines) + "\n" + tomli_w.dumps(flwr_run_defaults())


def with_flwr_table(pyproject: str) -> str:
    """`pyproject` with its `[tool.flwr.app.config]` table replaced; all other text kept as it is."""
    lines = pyproject.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == TABLE_HEADER)
    except StopIteration:
        raise ValueError(f"pyproject.toml has no {TABLE_HEADER} table") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    while end > start + 1 and lines[end - 1].strip()[:1] in ("", "#"):  # the next table's comments stay
        end -= 1
    return "".join(lines[:start]) + flwr_table() + "".join(lines[end:])


def config_markdown() -> str:
    """docs/config.md: every key by section, with type, default, allowed values and meaning."""
    parts = [
        "# Configuration\n",
        f"*Generated from RunConfig (shared/config.py) by `{COMMAND}`: edit there, not here.*\n",
        "A run is configured by one flat set of hyphenated keys, the same everywhere: a TOML file "
        "(the presets in `configs/`, the `config.toml` a run writes), `key=value` overrides "
        "(`--set key=value`), and Flower's run config (`flwr run . --run-config 'key=value ...'`). "
        "Defaults come first, then the file, then each override. An unknown key or a wrong type is an "
        "error naming the key and what is allowed.\n",
        "Values are scalars (Flower's run config carries nothing else): where a key can be \"unset\", "
        "a value such as `0`, `\"\"` or `-1` stands for it, as its meaning says. A relative `data-path` "
        "or `run-dir` in a config file is relative to that file's folder; in an override, to the "
        "working directory. Both are stored absolute in the run's `config.toml`, so `--resume` works "
        "from anywhere. Where to get the public datasets: "
        "[Datasets](simulation.md#datasets).\n",
    ]
    for section, keyed in _sections().items():
        parts.append(f"## {section.title}\n\n{section.about}\n\n" + _table(keyed))
    parts.append(_flwr_run_section())
    return "\n".join(parts)


def _sections() -> dict[Section, list[Field]]:
    grouped: dict[Section, list[Field]] = {}
    for f in fields(RunConfig):
        grouped.setdefault(f.metadata["section"], []).append(f)
    return grouped


def _table(keyed: list[Field]) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in keyed:
        key = config_key(f.name)
        meaning = f.metadata["meaning"]
        if key in CHOICES:
            meaning += " One of " + ", ".join(f"`{c}`" for c in CHOICES[key]) + "."
        rows.append(f"| `{key}` | {type(f.default).__name__} | `{toml_value(f.default)}` | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _flwr_run_section() -> str:
    rows = ["| key | RunConfig | `flwr run .` |", "|---|---|---|"]
    defaults = RunConfig().to_mapping()
    rows += [f"| `{k}` | `{toml_value(defaults[k])}` | `{toml_value(v)}` |" for k, v in FLWR_RUN_OVERRIDES.items()]
    return (
        "## Defaults of `flwr run .`\n\n"
        f"pyproject.toml's `{TABLE_HEADER}` table holds the defaults of `flwr run .`: every key, "
        "with RunConfig's default except these:\n\n" + "\n".join(rows) + f"\n\n{FLWR_RUN_REASON}\n"
    )


def generated(repo: Path = REPO) -> dict[Path, str]:
    """Each generated file's path in `repo` and the text it should hold."""
    pyproject = (repo / PYPROJECT).read_text(encoding="utf-8")
    return {repo / CONFIG_DOC: config_markdown(), repo / PYPROJECT: with_flwr_table(pyproject)}


def stale(repo: Path = REPO) -> dict[Path, str]:
    """The generated files in `repo` whose text is not what RunConfig gives, with that text."""
    return {
        path: text
        for path, text in generated(repo).items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    }


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated files that are out of date (with --check: only name them, exit 1)."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=f"Write {CONFIG_DOC.as_posix()} and pyproject's {TABLE_HEADER} from RunConfig."
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    outdated = stale()
    for path, text in outdated.items():
        name = path.relative_to(REPO).as_posix()
        if args.check:
            print(f"{name} is out of date: run {COMMAND}", file=sys.stderr)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {name}")
    return 1 if args.check and outdated else 0


if __name__ == "__main__":
    sys.exit(main())
