"""The build of our CPU kernels gets past a lock file left by a build that was killed."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from tandem.engine.cpu_kernels import wait_for_build_lock


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    old = time.time() - 1000
    os.utime(lock, (old, old))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tandem.engine"):
        wait_for_build_lock(tmp_path)
    assert not lock.exists() and time.monotonic() - start < 1.0
    assert "did not finish" in caplog.text


def test_a_build_under_way_is_waited_for(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()  # the other build finishes
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tandem.engine"):
        wait_for_build_lock(tmp_path, poll_s=0.05)
    assert time.monotonic() - start >= 0.3
    assert "waiting up to" in caplog.text and "did not finish" not in caplog.text


def test_a_lock_is_removed_once_it_outlives_any_build(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    start = time.monotonic()
    wait_for_build_lock(tmp_path, stale_s=0.3, poll_s=0.05)
    assert not lock.exists() and 0.25 <= time.monotonic() - start < 2.0


def test_no_lock_no_wait(tmp_path: Path) -> None:
    start = time.monotonic()
    wait_for_build_lock(tmp_path)
    assert time.monotonic() - start < 0.1
