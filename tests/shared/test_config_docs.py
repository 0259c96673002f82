"""docs/config.md and pyproject's [tool.flwr.app.config] are what RunConfig generates."""

import tomllib
from pathlib import Path

import pytest

from shared.config import RunConfig
from shared.config_docs import (
    COMMAND,
    CONFIG_DOC,
    FLWR_RUN_OVERRIDES,
    PYPROJECT,
    REPO,
    config_markdown,
    generated,
    stale,
    with_flwr_table,
)


@pytest.mark.parametrize("name", [CONFIG_DOC, PYPROJECT], ids=str)
def test_generated_file_is_up_to_date(name):
    path = REPO / name

    expected = generated()[path]

    assert path.exists() and path.read_text(encoding="utf-8") == expected, f"{name} is stale: run `{COMMAND}`"


def test_the_doc_gives_every_key_its_type_default_and_allowed_values():
    doc = config_markdown()

    for key, value in RunConfig().to_mapping().items():
        assert f"| `{key}` | {type(value).__name__} |" in doc, key
    assert "| `server-lr` | float | `0.0` |" in doc
    assert "| `data-seed` | int | `-1` |" in doc
    assert "One of `sgd`, `adam`." in doc
    assert COMMAND in doc.splitlines()[2]


def test_the_flwr_run_overrides_are_written_down_with_their_reason():
    doc = config_markdown()

    for key, value in FLWR_RUN_OVERRIDES.items():
        assert f"| `{key}` | `{RunConfig().to_mapping()[key]}` | `{value}` |" in doc


def test_only_the_flwr_config_table_is_rewritten():
    # Prepare: a table before, a comment and a table after, and a stale config table
    before = '[project]\nname = "x"  # kept\n\n# about the app\n'
    after = '\n# next\n[tool.other]\na = 1\n'
    text = before + "[tool.flwr.app.config]\nrounds = 99\nold-key = 1\n" + after

    # Execute
    rewritten = with_flwr_table(text)

    # Assert
    assert rewritten.startswith(before) and rewritten.endswith(after)
    assert tomllib.loads(rewritten)["tool"]["flwr"]["app"]["config"]["rounds"] == FLWR_RUN_OVERRIDES["rounds"]
    assert "old-key" not in rewritten
    assert with_flwr_table(rewritten) == rewritten


def test_a_pyproject_without_the_table_is_refused():
    with pytest.raises(ValueError, match=r"no \[tool.flwr.app.config\] table"):
        with_flwr_table('[project]\nname = "x"\n')


def test_stale_names_the_files_that_differ(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\n\n[tool.flwr.app.config]\nrounds = 1\n')

    first = stale(tmp_path)
    for path, text in first.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    assert set(first) == {tmp_path / CONFIG_DOC, tmp_path / PYPROJECT}
    assert stale(tmp_path) == {}
    assert Path(tmp_path / PYPROJECT).read_text().startswith("[project]\n\n[tool.flwr.app.config]\n")
