"""CPU time and memory of processes, read from /proc (no dependency)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may contain spaces and parentheses: split after the last ")".
    return data[data.rindex(")") + 2:].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def tree(pid: int) -> list[int]:
    """pid and all its descendants (still alive)."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """utime + stime (all threads) of pid, plus its live descendants if asked."""
    total = 0
    for p in tree(pid) if descendants else [pid]:
        fields = _stat_fields(p)
        if fields:
            total += int(fields[11]) + int(fields[12])  # stat fields 14 and 15
    return total / CLK_TCK


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of one process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def tree_rss_bytes(pid: int) -> int:
    """RSS summed over pid and its descendants (shared pages counted in each)."""
    return sum(rss_bytes(p) for p in tree(pid))
