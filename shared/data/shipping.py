"""How a run's tokenizer reaches its devices: with `tokenizer = "file"`, every training and
evaluation message carries the tokenizer file and its SHA-256, and a device builds its model only
from a file whose checksum is the one the run pinned (`tokenizer-sha256`).

The file is small (a `tokenizers` JSON) and a node may first hear of a run in any round, so it
rides with every message rather than once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from shared import messages as keys
from shared.config import RunConfig
from shared.data.errors import DataError
from shared.data.federation import check_pinned, text_tokenizer
from shared.data.text import FileTokenizer


# Largest tokenizer file a device takes from a message: a `tokenizers` JSON of a 50,000-word
# vocabulary is about 1-3 MB; the model it shapes is bounded by the device's policy besides.
MAX_TOKENIZER_BYTES = 16 << 20


def tokenizer_entries(cfg: RunConfig) -> dict[str, bytes | str]:
    """The config entries a server adds to its messages: the tokenizer and its SHA-256, or none."""
    tokenizer = text_tokenizer(cfg)
    if not isinstance(tokenizer, FileTokenizer):
        return {}
    return {keys.TOKENIZER: tokenizer.data, keys.TOKENIZER_SHA256: tokenizer.sha256}


def received_tokenizer(cfg: RunConfig, config: Mapping[str, object]) -> FileTokenizer | None:
    """The tokenizer a message carries, checked against the run's pin; None unless `tokenizer = "file"`."""
    if cfg.tokenizer != "file":
        return None
    data = config.get(keys.TOKENIZER)
    if not isinstance(data, bytes):
        raise DataError("the run uses tokenizer 'file' but the message carries no tokenizer")
    if len(data) > MAX_TOKENIZER_BYTES:
        raise DataError(f"the message's tokenizer is {len(data):,} bytes, more than {MAX_TOKENIZER_BYTES:,}")
    digest = hashlib.sha256(data).hexdigest()
    sent = config.get(keys.TOKENIZER_SHA256)
    if sent != digest:
        raise DataError(f"tokenizer checksum mismatch: the message says {sent}, its tokenizer's SHA-256 is {digest}")
    tokenizer = FileTokenizer(data, "the shipped tokenizer")
    check_pinned(tokenizer, cfg)
    return tokenizer
