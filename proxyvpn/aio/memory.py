"""How the engine process allocates: the cyclic collector's pace and the C heap's limits.

Both are set once, when the engine starts (:func:`tune`), and both trade a little memory
held for CPU not spent on every connection or proxy read.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
from collections.abc import Mapping

log = logging.getLogger("proxyvpn.engine")

GC_THRESHOLD0 = 50_000
"""Allocations between young-generation collections (CPython's default is 700). Every new
flow allocates a few hundred objects (connection, transport, protocol, buffers), so at the
default the cyclic collector ran many times per connection: 7.7% of proxyvpn's CPU in
`gc_collect_main` at 1,300 connections/s (py-spy, bench cps_64)."""

MMAP_THRESHOLD = 4 << 20
"""Allocations from this size up get their own mmap(); smaller ones come from the heap.
Above every buffer the data path allocates again and again: a proxy read (256 KiB), a TUN
packet (64 KiB), a tunnel's write backlog of a few MiB."""

TRIM_THRESHOLD = 16 << 20
"""Free memory at the top of the heap that glibc keeps before it gives it back with brk().

glibc adapts both limits to the largest block freed so far (a 256 KiB read: a trim
threshold of 512 KiB), so a download, whose send queue takes and frees a few MiB in
256 KiB blocks as the app acknowledges them, shrank the heap and grew it back page by
page: up to 19,000 page faults and 330 brk() calls a second at 1 GB/s, 4% of
proxyvpn's CPU (`perf record`, `perf stat -e page-faults`, bench lab). With fixed limits
the heap keeps what a transfer needs, and the faults are gone; the RSS after a download
did not change (~46 MiB). Setting either limit stops glibc's adapting of both."""

# mallopt() parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> None:
    """Freeze what start-up allocated and set the collector's and the heap's pace."""
    tune_gc()
    if not tune_malloc():
        log.debug("C heap limits left as they are (not glibc, or set by MALLOC_* variables)")


def tune_gc() -> None:
    """Freeze what start-up allocated (it lives until exit) and collect less often; flows
    still form reference cycles (protocol <-> transport), so the collector stays on."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD0, gen1, gen2)


def tune_malloc(environ: Mapping[str, str] | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds; False where that cannot be done or the
    environment already chose them (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_: a
    user's own setting wins)."""
    env = os.environ if environ is None else environ
    if "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # musl has mallopt() too, as a stub that changes nothing and returns 0.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
