"""The text datasets as arrays of token ids: IMDB reviews and LEAF-style Shakespeare roles.

A tokenizer given is used as it is (`bytes`, `file`); otherwise one is fitted on training text
only (test text never adds a word or a character; what it holds that training text did not
becomes the unknown id 1). Token id 0 is padding.
`shared.data.federation` turns these arrays into clients.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data._io import open_text
from shared.data.errors import DataError
from shared.data.readers import Splits, TextRecords, read_jsonl, read_shakespeare
from shared.data.text import PAD, ByteTokenizer, CharVocab, FileTokenizer, WordTokenizer

IGNORE = -100  # a label position nothing is predicted at (torch's cross-entropy ignore_index)
TRAIN_SPLIT, TEST_SPLIT = "train", "test"
GROUP_FIELD, SPLIT_FIELD = "movie", "split"


@dataclass(frozen=True, eq=False)
class EncodedReviews:
    """Reviews as (N, max_len) word ids: train and test splits, the movie per training review."""

    splits: Splits
    movies: np.ndarray | None
    tokenizer: WordTokenizer | ByteTokenizer | FileTokenizer


def read_reviews(
    path: Path,
    *,
    max_len: int,
    vocab_size: int,
    test_fraction: float,
    seed: int,
    tokenizer: ByteTokenizer | FileTokenizer | None = None,
) -> EncodedReviews:
    """JSON lines with `text` and `label`, optionally `movie` (natural client) and `split`.

    With a `split` field, "train" records train and "test" records form the test set (any other
    split, such as IMDB's "val", is left out); without one, a seeded `test_fraction` of the
    records is held out as the test set.
    """
    optional = _present_fields(path, (GROUP_FIELD, SPLIT_FIELD))
    records = read_jsonl(
        path,
        group_field=GROUP_FIELD if GROUP_FIELD in optional else None,
        split_field=SPLIT_FIELD if SPLIT_FIELD in optional else None,
    )
    train, test = _split_indices(path, records, test_fraction, seed)
    train_texts = [records.texts[i] for i in train]
    if tokenizer is None:
        tokenizer = WordTokenizer.fit(train_texts, max_vocab=vocab_size)
    splits = Splits(
        tokenizer.encode_batch(train_texts, max_len),
        records.labels[train],
        tokenizer.encode_batch([records.texts[i] for i in test], max_len),
        records.labels[test],
    )
    movies = np.asarray(records.groups)[train] if records.groups is not None else None
    return EncodedReviews(splits, movies, tokenizer)


def _present_fields(path: Path, fields: tuple[str, ...]) -> set[str]:
    """Which of `fields` the first record has (read_jsonl then requires them of every record)."""
    with open_text(path) as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: no records")
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line 1: invalid JSON: {exc.msg}") from exc
    return {f for f in fields if isinstance(record, dict) and f in record}


def _split_indices(
    path: Path, records: TextRecords, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    if records.splits is None:
        order = np.random.default_rng(seed).permutation(len(records.texts))
        n_test = int(round(len(order) * test_fraction))
        return np.sort(order[n_test:]), np.sort(order[:n_test])
    splits = np.asarray(records.splits)
    train, test = np.flatnonzero(splits == TRAIN_SPLIT), np.flatnonzero(splits == TEST_SPLIT)
    if len(train) == 0 or len(test) == 0:
        found = sorted(set(splits))
        raise DataError(f"{path}: needs records with split '{TRAIN_SPLIT}' and '{TEST_SPLIT}', found {found}")
    return train, test


@dataclass(frozen=True, eq=False)
class Roles:
    """LEAF Shakespeare clients: each (play, role)'s character ids, cut by time into train and test."""

    names: list[tuple[str, str]]
    train: list[np.ndarray]
    test: list[np.ndarray]
    vocab: CharVocab | ByteTokenizer | FileTokenizer


def read_roles(
    texts_dir: str | os.PathLike[str] | None,
    *,
    min_chars: int,
    window: int,
    test_fraction: float,
    vocab: ByteTokenizer | FileTokenizer | None = None,
) -> Roles:
    """Roles speaking at least `min_chars` characters, each split by time: the first (1 - test_fraction)
    of its text trains, the rest tests. Roles whose test part holds no `window`-char window are dropped.
    """
    speeches = read_shakespeare(texts_dir)
    kept = {name: text for name, text in sorted(speeches.items()) if len(text) >= min_chars}
    cuts = {name: len(text) - int(round(len(text) * test_fraction)) for name, text in kept.items()}
    kept = {name: text for name, text in kept.items() if len(text) - cuts[name] > window}
    if not kept:
        raise DataError(
            f"no Shakespeare role has >= {min_chars} characters and a test part longer than {window}; "
            "lower 'min-role-chars' or 'max-len'"
        )
    if vocab is None:
        vocab = CharVocab.fit(text[: cuts[name]] for name, text in kept.items())
    encoded = {name: vocab.encode(text) for name, text in kept.items()}
    return Roles(
        names=list(kept),
        train=[encoded[name][: cuts[name]] for name in kept],
        test=[encoded[name][cuts[name] :] for name in kept],
        vocab=vocab,
    )


def next_char_chunks(ids: np.ndarray, length: int, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-token targets for every position from `context` on, in chunks of `length` tokens.

    x[k, t] is a token and y[k, t] the token after it, or IGNORE where nothing is scored. Chunks
    start every `length - context` tokens; in each, the first `context` positions only give
    context, the rest are scored, so every position p >= context of `ids` (predicting p + 1) is
    scored exactly once, with its whole `context + 1`-token window inside the chunk. The last
    chunk is padded (x = PAD, y = IGNORE). `context = window - 1` gives exactly LEAF's
    `window`-char windows -> next char (`readers.char_windows`); `context = 0` scores every char.
    """
    if not 0 <= context < length:
        raise ValueError(f"context must be in [0, length), got context {context}, length {length}")
    scored = len(ids) - 1 - context  # positions context .. len(ids) - 2
    if scored <= 0:
        return np.zeros((0, length), np.int64), np.zeros((0, length), np.int64)
    step = length - context
    starts = np.arange(0, scored, step)  # (K,)
    pos = starts[:, None] + np.arange(length)  # (K, length)
    padded = np.concatenate([ids, np.full(length + 1, PAD, np.int64)])
    x = padded[pos]
    y = np.where(pos + 1 < len(ids), padded[pos + 1], IGNORE)
    y[:, :context] = IGNORE
    return x, y
