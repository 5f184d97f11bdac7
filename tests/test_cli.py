"""``python -m lmcache_ext``: info, disk-stats and verify on real disk tiers, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmcache_ext import _C
from lmcache_ext.cli import main
from lmcache_ext.tiers.disk import DiskTier, chunk_path

NS_A, NS_B = bytes(range(16)), bytes(range(16, 32))


def write_chunks(root: Path, namespace: bytes, n: int, seed: int, size: int = 10_000) -> dict[bytes, bytes]:
    """`n` chunk files of random bytes under a tier at `root`; returns key -> payload."""
    rng = np.random.default_rng(seed)
    written = {}
    with DiskTier(root, 1 << 30, namespace=namespace) as tier:
        for _ in range(n):
            key, payload = rng.bytes(16), rng.bytes(size)
            assert tier.submit_write(key, payload).result()
            written[key] = payload
    return written


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_names_the_build_and_the_devices(capsys):
    rc, out, _ = run(capsys, "info")
    info = _C.build_info()
    assert rc == 0
    assert out.startswith(f"lmcache_ext {info['version']}, {'CUDA' if info['cuda'] else 'CPU'} build")
    if info["cuda"]:
        assert f"archs {info['cuda_archs']}" in out
    count = _C.cuda_device_count()
    assert ("CUDA devices: none" in out) == (count == 0) and out.count("cuda:") == count


def test_the_module_runs_as_a_command():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache_ext", "info"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("lmcache_ext "), proc.stderr


def test_disk_stats_counts_chunks_and_bytes_per_shard_and_namespace(tmp_path, capsys):
    write_chunks(tmp_path / "shard0", NS_A, 3, seed=1)
    write_chunks(tmp_path / "shard1", NS_A, 2, seed=2)
    write_chunks(tmp_path / "shard1", NS_B, 1, seed=3)  # an older cache's chunk, say
    (tmp_path / "shard1" / "ab" / "stray.tmp").write_bytes(b"x")
    rc, out, _ = run(capsys, "disk-stats", str(tmp_path))
    sizes = {
        r: sum(p.stat().st_size for p in (tmp_path / r).rglob("*") if len(p.name) == 32) for r in ("shard0", "shard1")
    }
    lines = out.splitlines()
    assert rc == 0
    assert (
        lines[0].startswith(f"{tmp_path / 'shard0'}: 3 chunks, ")
        and f"({sizes['shard0']} bytes); 0 other files" in lines[0]
    )
    assert lines[1] == f"  namespace {NS_A.hex()}: 3 chunks, {sizes['shard0'] / 1024:.1f} KiB"
    assert (
        lines[2].startswith(f"{tmp_path / 'shard1'}: 3 chunks, ")
        and f"({sizes['shard1']} bytes); 1 other files" in lines[2]
    )
    assert lines[3].startswith(f"  namespace {NS_A.hex()}: 2 chunks") and lines[4].startswith(
        f"  namespace {NS_B.hex()}: 1 chunks"
    )
    assert (tmp_path / "shard1" / "ab" / "stray.tmp").exists()  # read-only


def test_disk_stats_lists_the_shards_then_the_per_rank_directories_of_format_1(tmp_path, capsys):
    write_chunks(tmp_path / "rank0", NS_B, 1, seed=6)
    write_chunks(tmp_path / "shard10", NS_A, 1, seed=7)
    write_chunks(tmp_path / "shard2", NS_A, 2, seed=8)
    rc, out, _ = run(capsys, "disk-stats", str(tmp_path))
    roots = [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert rc == 0 and roots == [str(tmp_path / name) for name in ("shard2", "shard10", "rank0")]


def test_verify_deletes_bad_files_reports_them_and_keeps_the_good_ones(tmp_path, capsys):
    written = write_chunks(tmp_path, NS_A, 4, seed=4)
    keys = sorted(written)
    flipped, short = chunk_path(tmp_path, keys[0]), chunk_path(tmp_path, keys[1])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    os.truncate(short, short.stat().st_size - 10)
    (tmp_path / "00" / f"{keys[2].hex()}.3.tmp").write_bytes(b"half a write")
    rc, out, _ = run(capsys, "verify", str(tmp_path))
    assert rc == 1
    assert out.splitlines() == [
        f"{tmp_path}: 4 chunk files checked, 2 good, 2 bad and deleted; 1 temp or stray files deleted",
        "  bad (bad_payload_checksum): 1",
        "  bad (wrong_file_size): 1",
    ]
    assert not flipped.exists() and not short.exists()
    with DiskTier(tmp_path, 1 << 30, namespace=NS_A) as tier:
        for key in keys[2:]:
            out_buf = bytearray(len(written[key]))
            assert tier.read_into(key, out_buf) and bytes(out_buf) == written[key]
    rc, out, _ = run(capsys, "verify", str(tmp_path))
    assert rc == 0 and "2 chunk files checked, 2 good, 0 bad" in out


def test_verify_refuses_a_directory_a_running_cache_holds(tmp_path, capsys):
    write_chunks(tmp_path, NS_A, 1, seed=5)
    with DiskTier(tmp_path, 1 << 30, namespace=NS_A):
        rc, out, err = run(capsys, "verify", str(tmp_path))
    assert rc == 2 and not out
    assert f"root = '{tmp_path}' is in use by another DiskTier" in err


@pytest.mark.parametrize("command", ["disk-stats", "verify"])
def test_a_dir_that_is_no_disk_cache_is_named_with_what_was_expected(tmp_path, capsys, command):
    rc, _, err = run(capsys, command, str(tmp_path / "missing"))
    assert rc == 2 and f"DIR = '{tmp_path / 'missing'}' is not a directory: expected a disk cache's directory" in err
    (tmp_path / "shard0").mkdir()
    rc, _, err = run(capsys, command, str(tmp_path))
    assert rc == 2 and f"DIR = '{tmp_path}' holds no disk cache: expected the local_disk directory" in err
    with pytest.raises(SystemExit) as exit_info:
        main([command])
    assert exit_info.value.code == 2 and "the following arguments are required: DIR" in capsys.readouterr().err
