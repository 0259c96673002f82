"""Text on deployed devices: `fedserver start` and two `fedclient start`, three rounds each.

The classifier's devices hold IMDB reviews as JSON lines (`text`, `label`) and the run ships
them a word-level tokenizer fitted on other text (`tokenizer = "file"`); the character LM's
devices hold plain text or JSON lines and use bytes (`tokenizer = "bytes"`). The reviews are the
real IMDB where ../shared/datasets has it, else generated ones with a learnable signal. Each test
reports a device's peak memory (all its processes) and the seconds per round.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedserver.checkpoints import read_metrics
from fedserver.state import StateDir
from shared.processes import descendants, free_port, stop_trees

pytestmark = pytest.mark.e2e

CLIENTS = 2
ROUNDS = 3
REVIEWS = 750  # per device, a fifth held out: 1,500 in all
IMDB = Path(os.environ.get("FLOWERBED_DATASETS") or Path(__file__).resolve().parents[3] / "shared" / "datasets")
MODEL = {"d-model": 16, "num-heads": 2, "num-layers": 1, "dropout": 0.0, "device": "cpu", "torch-threads": 1}
POSITIVE = "great superb moving brilliant lovely fun wonderful charming".split()
NEGATIVE = "awful boring dull terrible weak clumsy tedious bad".split()
FILLER = "the a film movie plot actor scene story was is and of it this with".split()


@dataclass
class Deployment:
    rows: list[dict]
    peak: dict[str, float]  # one device's processes at the moment they held the most memory: name -> MB
    seconds_per_round: float

    @property
    def peak_mb(self) -> float:
        return sum(self.peak.values())


def reviews() -> tuple[list[dict], list[str]]:
    """Training reviews (text, label) for the devices, and other reviews to fit the tokenizer on."""
    path = IMDB / "imdb.jsonl.gz"
    if path.exists():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        rng = random.Random(0)
        train = [{"text": r["text"], "label": r["label"]} for r in records if r.get("split") == "train"]
        public = [r["text"] for r in records if r.get("split") == "test"]
        return rng.sample(train, CLIENTS * REVIEWS), rng.sample(public, 5000)
    return _generated(CLIENTS * REVIEWS, seed=0), [r["text"] for r in _generated(1000, seed=1)]


def _generated(count: int, seed: int) -> list[dict]:
    """Reviews of filler words with a few words of their sentiment mixed in."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = rng.choices(FILLER, k=rng.randint(20, 40)) + rng.choices((NEGATIVE, POSITIVE)[i % 2], k=4)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": i % 2})
    return rows


def fit_word_tokenizer(texts: list[str], path: Path) -> Path:
    """What an operator runs on public text (docs/text-models.md)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=2000, special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


def rss_mb(pids: set[int]) -> dict[str, float]:
    """Resident memory of each process of `pids` still alive, in MB, by "pid name"."""
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:  # gone since it was listed
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        found[f"{pid} {fields['Name'].strip()}"] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
    return found


def deploy(e2e, work: Path, config: dict, parts: list[Path]) -> Deployment:
    """A federation on 127.0.0.1 running `config` over `parts`, sampled until ROUNDS rounds are in; then stopped."""
    assert e2e.run_cli(["fedserver.cli", "init", str(work / "pki"), "--clients", str(CLIENTS)]).returncode == 0
    run = {"num-clients": CLIENTS, "clients-per-round": CLIENTS, "rounds": ROUNDS, **MODEL, **config}
    (work / "run.toml").write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in run.items()))
    state, address = StateDir(work / "state"), f"127.0.0.1:{free_port()}"
    name = work.name
    started = [e2e.start_daemon(f"{name}-server", work / "pki", work / "run.toml", state, address)]
    for k in range(1, CLIENTS + 1):
        key = work / "pki" / "clients" / f"client-{k}.key"
        started.append(e2e.start_fedclient(f"{name}-client-{k}", address, work / "pki", key, parts[k - 1]))
    peak: dict[str, float] = {}
    deadline = time.monotonic() + 600
    try:
        while len(read_metrics(state.run_dir)) < ROUNDS:
            assert time.monotonic() < deadline, f"{ROUNDS} rounds not done in 600 s (see {e2e.logs})"
            assert started[0].poll() is None, e2e.log(f"{name}-server")
            device = started[1].pid
            peak = max(peak, rss_mb({device} | descendants(device)), key=lambda mb: sum(mb.values()))
            time.sleep(0.2)
    finally:
        stop_trees(started, grace=10.0)
    rows = read_metrics(state.run_dir)
    return Deployment(rows, peak, sum(r["seconds"] for r in rows) / len(rows))


def report(deployment: Deployment, what: str) -> None:
    processes = ", ".join(f"{name} {mb:.0f}" for name, mb in sorted(deployment.peak.items()))
    print(f"\n{what}: peak memory of one device {deployment.peak_mb:.0f} MB ({processes}), "
          f"{deployment.seconds_per_round:.1f} s per round, rounds {deployment.rows}")  # fmt: skip


def test_devices_train_the_classifier_on_their_reviews_with_a_shipped_tokenizer(tmp_path, e2e):
    rows, public = reviews()
    parts = []
    for k in range(CLIENTS):
        parts.append(tmp_path / f"reviews-{k}.jsonl")
        mine = rows[k * REVIEWS : (k + 1) * REVIEWS]
        parts[-1].write_text("".join(json.dumps(row) + "\n" for row in mine))
    config = {
        "dataset": "imdb", "model": "transformer-classifier", "max-len": 96, "tokenizer": "file",
        "tokenizer-path": str(fit_word_tokenizer(public, tmp_path / "tokenizer.json")),
        "local-epochs": 2, "batch-size": 16, "optimizer": "adam", "lr": 0.01, "test-fraction": 0.2,
    }  # fmt: skip

    deployment = deploy(e2e, tmp_path / "classifier", config, parts)

    report(deployment, "classifier")
    first, last = deployment.rows[0], deployment.rows[-1]
    assert [r["round"] for r in deployment.rows] == [1, 2, 3]
    # Training loss, not eval loss: the generated reviews (no ../shared) are learnt in round 1,
    # after which the eval loss is about 0.01 and moves by noise.
    assert last["train_loss"] < first["train_loss"]
    assert last["accuracy"] > 0.55  # chance is 0.5


def test_devices_train_the_character_lm_on_plain_text_and_json_lines(tmp_path, e2e):
    texts = [row["text"] for row in reviews()[0][: CLIENTS * 40]]
    parts = [tmp_path / "text-0.txt", tmp_path / "text-1.jsonl"]
    for k, part in enumerate(parts):
        mine = texts[k * 40 : (k + 1) * 40]
        lines = mine if part.suffix == ".txt" else [json.dumps({"text": text}) for text in mine]
        part.write_text("\n".join(lines))
    config = {
        "dataset": "shakespeare", "model": "char-lm", "max-len": 32, "tokenizer": "bytes",
        "local-epochs": 1, "batch-size": 16, "optimizer": "adam", "lr": 0.005, "test-fraction": 0.2,
    }  # fmt: skip

    deployment = deploy(e2e, tmp_path / "charlm", config, parts)

    report(deployment, "character LM")
    losses = [r["eval_loss"] for r in deployment.rows]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]
    assert deployment.rows[-1]["accuracy"] > 1 / 96  # above a guess among the bytes text uses
