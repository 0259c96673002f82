"""Quieting a library's logger for a while, the one way every side does it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quieter(name: str, level: int) -> Iterator[None]:
    """Logger `name` shows only `level` and above within the block, and is as it was after it."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
