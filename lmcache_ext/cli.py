"""``python -m lmcache_ext``: what an operator asks of an installation and of a disk cache.

- ``info``: the build (version, CUDA or CPU, CUDA archs) and the CUDA devices seen now.
- ``disk-stats DIR``: chunks and bytes per namespace under a disk cache, read-only
  (a running cache may hold the directory meanwhile).
- ``verify DIR``: checks every chunk file whole, deletes the bad ones (and temp files
  a killed writer left), and reports them; exit status 1 when it deleted any. It
  takes the directory's lock, so it refuses a directory a running cache holds.

DIR is a ``local_disk`` directory: one tier's root (sub-directories 00..ff), or the
connector's, which holds one root per shard (``shard0/``, ``shard1/``, ...: a KV head,
or a TP rank's KV where it is not kept per head). Files are
read with the disk tier's own code (`lmcache_ext.tiers.disk`). Bad input exits with
status 2 and a line naming the value and what was expected.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lmcache_ext.about import build_line, devices, format_bytes
from lmcache_ext.tiers.disk import DiskTier, is_tier_root, numbered_roots, read_file_header, scan_root
from lmcache_ext.tiers.record import BadRecord


class UsageError(Exception):
    """Bad input from the command line: exit status 2."""


def tier_roots(directory: str) -> list[Path]:
    """The disk tier roots under `directory`: itself, or its ``shard<N>`` sub-directories
    (and the ``rank<N>`` ones of an older format)."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"DIR = '{root}' is not a directory: expected a disk cache's directory (local_disk)")
    if is_tier_root(root):
        return [root]
    roots = numbered_roots(root, "shard") + numbered_roots(root, "rank")
    if not roots:
        raise UsageError(
            f"DIR = '{root}' holds no disk cache: expected the local_disk directory of lmcache_ext "
            "(sub-directories 00..ff, or one such shard<N>/ directory per shard)"
        )
    return roots


def info() -> list[str]:
    found = devices()
    return [build_line(), f"CUDA devices: {', '.join(found) if found else 'none'}"]


def disk_stats(directory: str) -> list[str]:
    lines = []
    for root in tier_roots(directory):
        found, junk = scan_root(root)
        chunks: Counter[str] = Counter()
        nbytes: Counter[str] = Counter()
        for _, key, size in found:
            try:
                namespace = read_file_header(root / key.hex()[:2] / key.hex()).namespace.hex()
            except (BadRecord, OSError):
                namespace = "unreadable header"
            chunks[namespace] += 1
            nbytes[namespace] += size
        lines.append(
            f"{root}: {len(found)} chunks, {format_bytes(sum(nbytes.values()))} "
            f"({sum(nbytes.values())} bytes); {len(junk)} other files"
        )
        for namespace, n in sorted(chunks.items(), key=lambda item: -item[1]):
            lines.append(f"  namespace {namespace}: {n} chunks, {format_bytes(nbytes[namespace])}")
    return lines


def verify(directory: str) -> tuple[list[str], int]:
    """Report lines, and how many files were deleted."""
    lines, deleted = [], 0
    for root in tier_roots(directory):
        try:
            tier = DiskTier(root, sys.maxsize)  # no cap: verify evicts nothing
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        bad: Counter[str] = Counter()
        unreadable: Counter[str] = Counter()
        with tier:
            removed_at_start = tier.stats()["removed_at_start"]
            keys = tier.keys()
            for key in keys:
                try:
                    kind = tier.verify(key)
                except OSError as exc:
                    unreadable[exc.strerror or type(exc).__name__] += 1
                    continue
                if kind is not None:
                    bad[kind] += 1
        deleted += removed_at_start + sum(bad.values())
        lines.append(
            f"{root}: {len(keys)} chunk files checked, {len(keys) - sum(bad.values()) - sum(unreadable.values())}"
            f" good, {sum(bad.values())} bad and deleted; {removed_at_start} temp or stray files deleted"
        )
        lines += [f"  bad ({kind}): {n}" for kind, n in sorted(bad.items())]
        lines += [f"  could not read ({why}), kept: {n}" for why, n in sorted(unreadable.items())]
    return lines, deleted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcache_ext", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="the build (CUDA or CPU, CUDA archs) and the CUDA devices seen now")
    commands.add_parser(
        "disk-stats", help="chunks and bytes per namespace under a disk cache (read-only)"
    ).add_argument("dir", metavar="DIR")
    commands.add_parser("verify", help="check every chunk file, delete the bad ones, report").add_argument(
        "dir", metavar="DIR"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print("\n".join(info()))
        elif args.command == "disk-stats":
            print("\n".join(disk_stats(args.dir)))
        else:
            lines, deleted = verify(args.dir)
            print("\n".join(lines))
            return 1 if deleted else 0
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
