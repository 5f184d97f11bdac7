"""Tier faults are logged once per burst: a full disk writes one warning, not one per chunk,
and the first success after the burst says how many operations it cost."""

from __future__ import annotations

import logging

from lmcache_ext.tiers.disk import DiskTier


def test_a_burst_of_failed_disk_writes_is_one_warning_and_its_end_one_info_line(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmcache_ext")
    with DiskTier(tmp_path, 3 * 4096) as tier:  # a file of 2 pages fits; one of 4 does not
        for i in range(5):
            assert not tier.submit_write(bytes([i]) * 16, bytes(3 * 4096)).result()
        assert tier.submit_write(b"k" * 16, bytes(4096)).result()
        assert tier.submit_write(b"l" * 16, bytes(3 * 4096)).result() is False
        assert tier.stats()["writes_failed"] == {"too_large": 6}  # every fault is counted
    records = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lmcache_ext.tiers.disk"]
    assert len(records) == 3, records
    assert records[0][0] == "WARNING" and f"disk writes under {tmp_path} failing (too_large: " in records[0][1]
    assert records[1] == ("INFO", f"disk writes under {tmp_path} work again, after 5 faults")
    assert records[2][0] == "WARNING"  # a new burst
