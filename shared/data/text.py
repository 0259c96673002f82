"""Tokenizers for the text tasks.

`WordTokenizer` and `CharVocab` are fitted on training text (fedsim's `tokenizer = "fitted"`)
and saved as JSON. `ByteTokenizer` fits nothing and `FileTokenizer` reads one fitted on public
text: those two need no client's data, so a deployed server and its devices build the same model.
All reserve id 0 for padding and id 1 for anything unknown.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared.data._io import read_json, write_json_atomic
from shared.data.errors import DataError
from shared.files import atomic_write_bytes

PAD, UNK = 0, 1
_RESERVED = 2
_UNK_CHAR = "\ufffd"
_BREAK_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


class CharVocab:
    """Character ids: 0 padding, 1 unknown, 2.. the characters seen by `fit`, in code-point order."""

    _FORMAT = "flowerbed-char-vocab"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = sorted(set(chars))
        self._ids = {c: i for i, c in enumerate(self.chars, start=_RESERVED)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharVocab:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(seen)

    def __len__(self) -> int:
        return len(self.chars) + _RESERVED

    def encode(self, text: str) -> np.ndarray:
        get = self._ids.get
        return np.fromiter((get(c, UNK) for c in text), np.int64, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids; padding is dropped and unknown ids show as U+FFFD."""
        return "".join(self._char(int(i)) for i in ids if i != PAD)

    def _char(self, i: int) -> str:
        return self.chars[i - _RESERVED] if _RESERVED <= i < len(self) else _UNK_CHAR

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, {"format": self._FORMAT, "chars": self.chars})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharVocab:
        chars = _load_tokens(path, cls._FORMAT, "chars")
        if any(len(c) != 1 for c in chars):
            raise DataError(f"{path}: 'chars' must hold single characters")
        return cls(chars)


def tokenize(text: str) -> list[str]:
    """Lower-cased words; `<br />` tags and punctuation (apostrophes inside words excepted) dropped."""
    return _WORD.findall(_BREAK_TAG.sub(" ", text.lower()))


class WordTokenizer:
    """Word ids: 0 padding, 1 unknown, 2.. the kept words, most frequent first."""

    _FORMAT = "flowerbed-word-tokenizer"

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        self._ids = {w: i for i, w in enumerate(self.words, start=_RESERVED)}

    @classmethod
    def fit(cls, texts: Iterable[str], max_vocab: int = 20000, min_freq: int = 2) -> WordTokenizer:
        """Keep words seen at least `min_freq` times; `max_vocab` caps len(tokenizer), reserved ids included."""
        if max_vocab <= _RESERVED:
            raise ValueError(f"max_vocab must be > {_RESERVED} (ids 0 and 1 are reserved), got {max_vocab}")
        counts = Counter(word for text in texts for word in tokenize(text))
        ranked = sorted((w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w))
        return cls(ranked[: max_vocab - _RESERVED])

    def __len__(self) -> int:
        return len(self.words) + _RESERVED

    def encode(self, text: str, max_len: int) -> np.ndarray:
        """The first `max_len` word ids of `text`, zero-padded at the end to exactly `max_len`."""
        ids = np.zeros(max_len, np.int64)
        tokens = tokenize(text)[:max_len]
        ids[: len(tokens)] = [self._ids.get(t, UNK) for t in tokens]
        return ids

    def encode_batch(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        rows = [self.encode(text, max_len) for text in texts]
        return np.stack(rows) if rows else np.zeros((0, max_len), np.int64)

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, {"format": self._FORMAT, "words": self.words})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordTokenizer:
        return cls(_load_tokens(path, cls._FORMAT, "words"))


def padded(rows: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """(len(rows), max_len) ids: each row's first `max_len` ids, zero-padded at the end."""
    out = np.zeros((len(rows), max_len), np.int64)
    for i, row in enumerate(rows):
        out[i, : min(len(row), max_len)] = row[:max_len]
    return out


class ByteTokenizer:
    """UTF-8 bytes as ids 2..257 (byte + 2): nothing fitted, so no text is needed to build it."""

    def __len__(self) -> int:
        return 256 + _RESERVED

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + _RESERVED

    def encode_batch(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        return padded([self.encode(text) for text in texts], max_len)


class FileTokenizer:
    """A `tokenizers` library tokenizer (its JSON file), its ids shifted by 2 past padding and unknown.

    `sha256` is the file's checksum: a run pins it, and a device checks the file it is sent against it.
    """

    def __init__(self, data: bytes, source: str = "tokenizer") -> None:
        from tokenizers import Tokenizer  # imported here: only runs with `tokenizer = "file"` need it

        try:
            self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - the library raises plain Exception on bad JSON
            raise DataError(f"{source}: not a tokenizers JSON file: {err}") from None
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FileTokenizer:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read tokenizer {path}: {err.strerror}") from None
        return cls(data, str(path))

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size() + _RESERVED

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, np.int64) + _RESERVED

    def encode_batch(self, texts: Iterable[str], max_len: int) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return padded([np.asarray(e.ids, np.int64) + _RESERVED for e in encodings], max_len)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_bytes(path, self.data)


def _load_tokens(path: str | os.PathLike[str], expected_format: str, key: str) -> list[str]:
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != expected_format:
        raise DataError(f"{path}: not a {expected_format} file")
    tokens = doc.get(key)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise DataError(f"{path}: {key!r} must be a list of strings")
    return tokens
