"""Sample proxyvpn with py-spy during a test and summarise where its time goes.

`--profile DIR` wraps the proxyvpn mode's single-flow bulk, latency (rr) and connection-rate
(cps_64) tests in `py-spy record --format raw` (collapsed stacks) and writes DIR/<test>.txt,
an SVG flame graph rendered from it when py-spy can, and DIR/<test>.top.txt: the functions
with the most samples on-CPU as the leaf (self) and anywhere on the stack (inclusive).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """'recv_into (asyncio/selector_events.py:123)' -> 'recv_into (asyncio/selector_events.py)'."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def _is_python(frame: str) -> bool:
    return ".py)" in frame or "<frozen" in frame or "(<string>)" in frame


def summarise(raw: Path, top: int = 25) -> str:
    """Hot spots from py-spy's collapsed stacks: leaf frames (native ones included), the
    innermost Python function with the native code it was in, and inclusive shares."""
    leaf: Counter[str] = Counter()
    py_leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        stack, count = m.group(1), int(m.group(2))
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if "(" in f] or frames  # drop the thread-name frame
        if not frames:
            continue
        total += count
        leaf[frames[-1]] += count
        py = [f for f in frames if _is_python(f)]
        if py:
            native_tail = frames[frames.index(py[-1]) + 1:] if py[-1] in frames else []
            where = py[-1] + (f"  ->  {native_tail[-1]}" if native_tail else "")
            py_leaf[where] += count
        for name in set(frames):
            incl[name] += count
    if not total:
        return "no samples\n"

    def block(title: str, counter: Counter[str], keep=lambda name, c: True) -> list[str]:
        rows = [(n, c) for n, c in counter.most_common() if keep(n, c)][:top]
        return ["", title, *[f"  {100 * c / total:5.1f}%  {n}" for n, c in rows]]

    out = [f"{total} samples (on-CPU; py-spy leaves idle samples out)"]
    out += block(f"top {top} leaf frames (self time, native frames included):", leaf)
    out += block(f"top {top} innermost Python function  ->  native leaf it was in:", py_leaf)
    out += block(f"top {top} inclusive, proxyvpn and asyncio code (the trunk every sample "
                 "shares is left out):", incl,
                 lambda n, c: c < 0.98 * total and ("proxyvpn/" in n or "asyncio/" in n))
    return "\n".join(out) + "\n"


def make_profiler(pid_of: Callable[[], int], outdir: Path, *, native: bool = True,
                  rate: int = 250) -> Callable[[str], contextlib.AbstractContextManager]:
    py_spy = find_py_spy()
    if not py_spy:
        raise SystemExit("bench: --profile needs py-spy (.venv/bin/pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def profile(label: str) -> Iterator[None]:
        raw = outdir / f"{label}.txt"
        argv = [py_spy, "record", "--pid", str(pid_of()), "--rate", str(rate), "--format", "raw",
                "--output", str(raw), "--nonblocking"]
        if native:
            argv.remove("--nonblocking")  # native unwinding needs the process paused
            argv.append("--native")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            yield
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                _, err = proc.communicate()
            if raw.exists():
                summary = summarise(raw)
                (outdir / f"{label}.top.txt").write_text(summary)
                _flamegraph(raw, outdir / f"{label}.svg")
            else:
                (outdir / f"{label}.top.txt").write_text(f"py-spy failed:\n{err}\n")

    return profile


def _flamegraph(raw: Path, svg: Path) -> None:
    """Render the collapsed stacks with flamegraph.pl if it is installed (optional)."""
    tool = shutil.which("flamegraph.pl") or shutil.which("flamegraph")
    if not tool:
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError), open(svg, "w") as fh:
        subprocess.run([tool, str(raw)], stdout=fh, check=True, timeout=60)
