"""What the filesystem under a test's directory can do, for tests that expect the disk
tier's O_DIRECT path where it exists and its buffered fallback elsewhere."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path


def direct_io_supported(directory: Path) -> bool:
    """Whether `directory`'s filesystem takes an aligned O_DIRECT write."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
        try:
            os.pwritev(fd, [mmap.mmap(-1, 4096)], 0)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True
