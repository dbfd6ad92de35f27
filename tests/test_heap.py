"""The daemons' heap settings (twinmesh.heap)."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's mallopt only")
def test_keep_heap_is_accepted_and_buffers_still_work() -> None:
    # In a child: the settings last for the whole process.
    code = ("from twinmesh.heap import keep_heap\n"
            "assert keep_heap() is True\n"
            "blocks = [bytes(65536 * n) for n in range(1, 80)]\n"
            "assert sum(map(len, blocks)) == 65536 * 79 * 40\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
