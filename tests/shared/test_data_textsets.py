"""Text datasets as token ids: LEAF windows as chunks, IMDB reviews and Shakespeare roles as federations."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from shared.config import ConfigError, RunConfig
from shared.data import CharVocab, DataError, WordTokenizer, char_windows
from shared.data.federation import TOKENIZER_FILE, data_spec, load_federation, load_local, save_run_tokenizer
from shared.data.textsets import IGNORE, next_char_chunks, read_reviews, read_roles


def scored_windows(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(window ending at each scored position, its label), in text order."""
    k, t = np.nonzero(y != IGNORE)
    windows = [x[a, b - window + 1 : b + 1] for a, b in zip(k, t)]
    return np.stack(windows) if windows else np.zeros((0, window), np.int64), y[k, t]


@pytest.mark.parametrize("n", [5, 6, 7, 19, 40, 41])
def test_chunks_score_exactly_the_leaf_windows(n):
    vocab = CharVocab.fit(["abcdefgh"])
    text = "".join("abcdefgh"[(i * 5) % 8] for i in range(n))
    windows_x, windows_y = char_windows(text, vocab, seq_len=5)

    x, y = next_char_chunks(vocab.encode(text), length=12, context=4)

    got_x, got_y = scored_windows(x, y, window=5)
    assert x.shape[1] == y.shape[1] == 12
    np.testing.assert_array_equal(got_x, windows_x)
    np.testing.assert_array_equal(got_y, windows_y)


def test_chunks_without_context_score_every_next_char():
    ids = np.arange(2, 25, dtype=np.int64)

    x, y = next_char_chunks(ids, length=8, context=0)

    assert x.shape == (3, 8)
    np.testing.assert_array_equal(y[y != IGNORE], ids[1:])
    np.testing.assert_array_equal(x[y != IGNORE], ids[:-1])
    assert x[y == IGNORE].tolist() == [24] + [0] * 1  # the last char (nothing follows), then padding


def test_chunks_of_a_text_too_short_for_a_window_are_empty():
    x, y = next_char_chunks(np.arange(2, 7, dtype=np.int64), length=12, context=4)

    assert x.shape == y.shape == (0, 12)


def write_reviews(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


REVIEWS = [
    {"text": "great great film", "label": 1, "movie": "tt1", "split": "train"},
    {"text": "great acting<br />great", "label": 1, "movie": "tt1", "split": "train"},
    {"text": "awful awful plot", "label": 0, "movie": "tt2", "split": "train"},
    {"text": "awful film", "label": 0, "movie": "tt3", "split": "train"},
    {"text": "zyzzyva zyzzyva zyzzyva great", "label": 1, "movie": "tt4", "split": "test"},
    {"text": "zyzzyva awful", "label": 0, "movie": "tt4", "split": "test"},
    {"text": "quokka quokka quokka", "label": 1, "movie": "tt5", "split": "val"},
]


def test_the_word_tokenizer_sees_training_text_only(tmp_path):
    path = write_reviews(tmp_path / "r.jsonl.gz", REVIEWS)

    reviews = read_reviews(path, max_len=6, vocab_size=100, test_fraction=0.2, seed=0)

    words = set(reviews.tokenizer.words)
    assert {"great", "awful", "film"} <= words
    assert not words & {"zyzzyva", "quokka"}  # test-only and val-only words: never fitted
    assert reviews.splits.x_train.shape == (4, 6) and reviews.splits.x_train.dtype == np.int64
    assert reviews.splits.x_test[0].tolist() == [1, 1, 1, reviews.tokenizer.encode("great", 1)[0], 0, 0]
    assert reviews.movies.tolist() == ["tt1", "tt1", "tt2", "tt3"]


def test_reviews_without_split_hold_out_a_test_fraction(tmp_path):
    rows = [{"text": f"word{i % 3} good", "label": i % 2} for i in range(10)]
    path = write_reviews(tmp_path / "r.jsonl.gz", rows)

    reviews = read_reviews(path, max_len=4, vocab_size=100, test_fraction=0.3, seed=0)

    assert (len(reviews.splits.y_train), len(reviews.splits.y_test)) == (7, 3)
    assert reviews.movies is None


def test_reviews_need_a_train_and_a_test_split(tmp_path):
    path = write_reviews(tmp_path / "r.jsonl.gz", [r for r in REVIEWS if r["split"] != "test"])

    with pytest.raises(DataError, match="needs records with split 'train' and 'test'"):
        read_reviews(path, max_len=4, vocab_size=100, test_fraction=0.2, seed=0)


def imdb_config(path, **changes) -> RunConfig:
    base = dict(dataset="imdb", model="transformer-classifier", data_path=str(path), max_len=6,
                num_clients=4, clients_per_round=2)  # fmt: skip
    return RunConfig(**(base | changes))


def test_imdb_clients_are_movies_with_a_central_test_set(tmp_path):
    cfg = imdb_config(write_reviews(tmp_path / "r.jsonl.gz", REVIEWS), min_client_size=2)

    federation = load_federation(cfg)

    assert federation.num_clients == 2  # tt1, and tt2 + tt3 merged (one review each)
    assert [len(federation.client(k).y_train) for k in range(2)] == [2, 2]
    assert federation.client(0).x_train.dtype == np.int64 and len(federation.client(0).y_test) == 0
    assert federation.central_test[0].shape == (2, 6)


def test_a_text_spec_writes_nothing_and_the_run_saves_its_tokenizer_once_atomically(tmp_path, monkeypatch):
    cfg = imdb_config(write_reviews(tmp_path / "r.jsonl.gz", REVIEWS), run_dir=str(tmp_path / "run"))
    federation = load_federation(cfg)
    renames: list[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(Path(dst).name), replace(src, dst))[1])

    spec = data_spec(cfg, federation=federation)
    assert not (tmp_path / "run").exists()  # a getter: pure
    save_run_tokenizer(cfg, federation)

    saved = WordTokenizer.load(tmp_path / "run" / TOKENIZER_FILE)
    assert saved.words == federation.vocabulary.words
    assert (spec.input_dim, spec.num_classes, spec.vocab_size) == (6, 2, len(saved))
    assert renames == [TOKENIZER_FILE]  # written under a temporary name, then renamed into place


def test_a_deployed_node_cannot_use_a_fitted_tokenizer(tmp_path):
    path = write_reviews(tmp_path / "r.jsonl", REVIEWS)

    with pytest.raises(DataError, match="tokenizer 'fitted' runs in fedsim only"):
        load_local(path, imdb_config(path))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (dict(model="mlp"), "dataset 'imdb' needs model 'transformer-classifier'"),
        (dict(dataset="mnist"), "model 'transformer-classifier' reads token ids"),
        (dict(num_classes=3), "'num-classes' do not apply"),
        (dict(d_model=30, num_heads=4), "'d-model' \\(30\\) must be a multiple of 'num-heads' \\(4\\)"),
        (dict(vocab_size=2), "'vocab-size' must be >= 3"),
    ],
)
def test_text_config_errors_name_the_problem(tmp_path, changes, problem):
    with pytest.raises(ConfigError, match=problem):
        imdb_config(tmp_path / "r.jsonl", **changes)


PLAY = """THE TRAGEDY OF TESTING

ACT I. SCENE I.

ALPHA.
abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc xyz

BETA.
short

ALPHA.
abcabcabcabcabc QQ
"""


def test_roles_are_split_by_time_and_the_vocabulary_sees_training_text_only(tmp_path):
    (tmp_path / "testing_gut.txt").write_text(PLAY)

    roles = read_roles(tmp_path, min_chars=20, window=4, test_fraction=0.2)

    assert roles.names == [("testing", "ALPHA")]  # BETA speaks too little
    text = "abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcabc xyz\nabcabcabcabcabc QQ"
    cut = len(text) - round(len(text) * 0.2)
    assert roles.vocab.decode(roles.train[0]) == text[:cut]
    assert roles.vocab.decode(roles.test[0]).endswith("abc \ufffd\ufffd")  # "QQ" only in the test part
    assert "Q" not in roles.vocab.chars


def test_a_shakespeare_client_is_evaluated_on_its_test_windows(tmp_path):
    (tmp_path / "testing_gut.txt").write_text(PLAY)
    cfg = RunConfig(dataset="shakespeare", model="char-lm", data_path=str(tmp_path), max_len=4,
                    min_role_chars=20, num_clients=1, clients_per_round=1)  # fmt: skip

    federation = load_federation(cfg)

    client = federation.client(0)
    roles = read_roles(tmp_path, min_chars=20, window=4, test_fraction=0.2)
    assert federation.num_clients == 1 and federation.central_test is None
    assert int((client.y_test != IGNORE).sum()) == len(roles.test[0]) - 4
    assert int((client.y_train != IGNORE).sum()) == len(roles.train[0]) - 1
    assert federation.spec.vocab_size == len(roles.vocab) == federation.spec.num_classes


def test_no_role_long_enough_is_a_data_error(tmp_path):
    (tmp_path / "testing_gut.txt").write_text(PLAY)

    with pytest.raises(DataError, match="lower 'min-role-chars' or 'max-len'"):
        read_roles(tmp_path, min_chars=10_000, window=80, test_fraction=0.2)
