"""The daemon's log files, rotated by size so that a daemon running for months keeps them bounded.

fedserver.log is written by Python's logging. superlink.log is the output of the SuperLink and
of the processes it starts (SuperExec, the ServerApp): they write to a pipe that a thread of the
daemon copies into the file line by line, rotating it the same way. When a file passes
MAX_BYTES it becomes NAME.1 (NAME.1 becomes NAME.2, ...; NAME.BACKUPS is dropped).
"""

from __future__ import annotations

import logging
import threading
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3


def rotating_handler(path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> RotatingFileHandler:
    """A logging handler appending to `path`, rotated at `max_bytes` keeping `backups` old files."""
    return RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")


def copy_lines(
    stream: IO[bytes], path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS
) -> threading.Thread:
    """Start a thread copying `stream` into `path` (rotated as `rotating_handler`) until it ends."""
    handler = rotating_handler(path, max_bytes, backups)
    handler.setFormatter(logging.Formatter("%(message)s"))

    def copy() -> None:
        try:
            for line in stream:
                handler.emit(logging.makeLogRecord({"msg": line.decode("utf-8", "replace").rstrip("\n")}))
        finally:
            handler.close()

    thread = threading.Thread(target=copy, name=f"log {path.name}", daemon=True)
    thread.start()
    return thread
