"""The engine process's allocator settings (proxyvpn/aio/memory.py)."""

from __future__ import annotations

import gc
import json
import platform
import subprocess
import sys
from pathlib import Path

from proxyvpn.aio import memory

# A download's send queue in miniature: proxy reads of 120-260 KB (each allocates a
# 256 KiB buffer and shrinks it to what came, as recv() does), queued, the oldest half
# freed as the app acknowledges them. Run in a child so that this process's heap is not
# the one measured (or changed); prints the minor page faults the loop took.
REPO = Path(__file__).resolve().parents[2]
CHURN = """
import fcntl, json, os, resource, sys
from proxyvpn.aio import memory
applied = memory.tune_malloc() if sys.argv[1] == "tuned" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for one whole read
chunk = b"x" * 262_144
queue = []
before = faults()
for i in range(2000):
    os.write(w, chunk[: 120_000 + (i * 7919) % 140_000])
    queue.append(os.read(r, 262_144))
    if len(queue) > 16:
        del queue[:8]
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def churn(how: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHURN, how], capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"}, cwd=str(REPO))
    return json.loads(out.stdout)


def test_fixed_heap_limits_stop_the_page_faults_of_a_streaming_send_queue() -> None:
    default, tuned = churn("default"), churn("tuned")
    if platform.libc_ver()[0] != "glibc":
        assert tuned["applied"] is False  # musl: mallopt() is a stub; nothing to prove
        return
    assert tuned["applied"] is True
    # glibc's adaptive trim gives the heap back and faults it in again all along (~15
    # pages a read, 2026-12-07); with fixed limits only the queue's first fill faults
    # (17 reads of 64 pages).
    assert tuned["faults"] < 17 * 64 * 2, tuned
    assert default["faults"] > 10 * tuned["faults"], (default, tuned)


def test_a_users_malloc_variables_win() -> None:
    assert memory.tune_malloc({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
    assert memory.tune_malloc({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False


def test_gc_runs_less_often_and_skips_what_start_up_made() -> None:
    old = gc.get_threshold()
    try:
        memory.tune_gc()
        assert gc.get_threshold()[0] == memory.GC_THRESHOLD0
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)
