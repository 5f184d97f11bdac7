"""The cache epoch: a token in every key's namespace that a cache reset replaces.

After vLLM changes a model's weights in place it calls the connector's reset. A new
epoch makes every key new at once, on every tier: nothing stored before the reset
can be hit after it, including stores still in flight, whatever tier holds them.
With a disk tier the epoch is kept in ``<local_disk>/epoch``, so an engine that
restarts on the same directory stays in the epoch its files were written in.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

EPOCH_FILE = "epoch"
_EPOCH = re.compile(r"[0-9a-f]{32}")


def read_epoch(root: str | os.PathLike[str] | None) -> str:
    """The epoch stored under `root` ("" when there is none: the keys of a cache that
    was never reset). An unreadable epoch file starts a new epoch: that costs the disk
    tier's hits, never a wrong one."""
    if root is None:
        return ""
    path = Path(root) / EPOCH_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        text = f"<unreadable: {exc}>"
    if _EPOCH.fullmatch(text):
        return text
    logger.warning(
        "cache epoch file %s holds %r, expected 32 hex digits: starting a new epoch, "
        "so the chunks already on disk will not be hit",
        path,
        text[:64],
    )
    try:
        return new_epoch(root)
    except OSError as exc:
        logger.warning("cannot write a new cache epoch to %s (%s): this process keeps it in memory", path, exc)
        return secrets.token_hex(16)


def new_epoch(root: str | os.PathLike[str] | None) -> str:
    """A fresh random epoch, made durable under `root` (when given) before it is
    returned; raises OSError when it cannot be written."""
    epoch = secrets.token_hex(16)
    if root is None:
        return epoch
    path = Path(root) / EPOCH_FILE
    tmp = path.with_name(f".{EPOCH_FILE}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", encoding="ascii") as f:
        f.write(epoch + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return epoch


def next_epoch(root: str | os.PathLike[str] | None) -> str | None:
    """`new_epoch`, or None, logged, when it cannot be made durable: the caller then
    refuses the reset rather than let a restart find the old epoch."""
    try:
        return new_epoch(root)
    except OSError as exc:
        logger.error("cache reset refused: cannot write a new epoch under %s (%s)", root, exc)
        return None
