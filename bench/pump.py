"""Build the C traffic programs (bench/pump.c) for this run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("pump.c")


def build(outdir: Path) -> Path:
    """Compile pump.c into outdir (readable by every namespace's processes)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("bench: a C compiler (cc/gcc) is needed to build bench/pump.c")
    out = outdir / "pump"
    subprocess.run([cc, "-O2", "-pthread", "-Wall", "-o", str(out), str(SOURCE)],
                   check=True, capture_output=True, text=True)
    os.chmod(out, 0o755)
    return out
