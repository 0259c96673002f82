"""Small IMDB and Shakespeare federations, end to end through fedsim (ServerApp + ClientApp)."""

import gzip
import json
from pathlib import Path

from shared.config import load_config
from shared.data import CharVocab, WordTokenizer
from shared.data.federation import TOKENIZER_FILE, load_federation
from simulations.engine import run_simulation

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OUTPUTS = ("config.toml", "metrics.jsonl", "summary.json", "curves.png", "model.safetensors", TOKENIZER_FILE)


def imdb_subset(source: Path, tmp_path: Path, per_label: dict[str, int]) -> Path:
    """The first `per_label[split]` reviews of each label of each split of IMDB file `source`, as a smaller JSONL."""
    left = {(split, label): count for split, count in per_label.items() for label in (0, 1)}
    subset = tmp_path / "imdb-subset.jsonl"
    with gzip.open(source, "rt", encoding="utf-8") as f, subset.open("w", encoding="utf-8") as out:
        for line in f:
            record = json.loads(line)
            key = (record["split"], record["label"])
            if left.get(key, 0) > 0:
                left[key] -= 1
                out.write(line)
            if not any(left.values()):
                break
    return subset


def run_and_check_outputs(cfg, run_dir, tokens, load_tokenizer):
    """Run `cfg`; every output file is written, the saved tokenizer is the federation's own."""
    result = run_simulation(cfg, run_dir, progress=False)
    federation = load_federation(cfg)
    assert all((run_dir / name).exists() for name in OUTPUTS)
    assert tokens(load_tokenizer(run_dir / TOKENIZER_FILE)) == tokens(federation.vocabulary)
    return result, federation


def test_imdb_with_label_skew_beats_chance(tmp_path, dataset):
    data = imdb_subset(dataset("imdb.jsonl.gz"), tmp_path, per_label={"train": 1000, "test": 250})
    cfg = load_config(
        CONFIGS / "imdb-transformer.toml",
        [f'data-path="{data}"', "num-clients=4", "clients-per-round=4", "max-len=64", "vocab-size=5000",
         "rounds=3", "local-epochs=2", "eval-batch-size=500", "torch-threads=1"],
    )  # fmt: skip

    result, federation = run_and_check_outputs(cfg, tmp_path / "run", lambda vocab: vocab.words, WordTokenizer.load)

    assert len(federation.central_test[1]) == 500
    assert result.summary["rounds"] == 3
    assert result.summary["final_accuracy"] > 0.58  # chance is 0.5 (balanced test set); measured 0.66


def test_shakespeare_roles_beat_chance(tmp_path, dataset):
    dataset("shakespeare")
    cfg = load_config(
        CONFIGS / "shakespeare-charlm.toml",
        ["min-role-chars=35000", "num-clients=4", "clients-per-round=4", "max-len=20", "d-model=32",
         "num-layers=1", "rounds=2", "local-epochs=1", "torch-threads=1"],
    )  # fmt: skip

    result, _ = run_and_check_outputs(cfg, tmp_path / "run", lambda vocab: vocab.chars, CharVocab.load)

    assert result.summary["rounds"] == 2
    assert result.summary["final_accuracy"] > 0.3  # always guessing the commonest character (space) scores ~0.17
