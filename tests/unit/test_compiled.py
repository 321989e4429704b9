"""The stack's compiled build (mypyc, proxyvpn/_compiled.py) and its interpreted source.

The suite runs against what dev.sh and install.sh build, the compiled modules; the
source must keep working on its own too (a build without mypy, PROXYVPN_INTERPRETED=1),
so the stack's unit tests run once more here with the compiled modules switched off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxyvpn import _compiled

REPO = Path(__file__).resolve().parents[2]
STACK_TESTS = ["test_tcp.py", "test_tcp_fuzz.py", "test_engine.py", "test_sendbuf.py",
               "test_seq.py", "test_pcap.py", "test_dial.py", "test_transport.py"]


def _loaded(env: dict[str, str]) -> dict[str, bool]:
    """:func:`_compiled.loaded` in a fresh interpreter with ``env``."""
    code = "import json; from proxyvpn import _compiled as c; print(json.dumps(c.loaded()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return json.loads(out)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != _compiled.ENV}
    return {**env, "PYTHONPATH": str(REPO), **extra}


@pytest.mark.skipif(os.environ.get(_compiled.ENV) == "1", reason="asked to run interpreted")
def test_the_suite_runs_the_compiled_stack():
    """dev.sh builds every module of COMPILED: a build that silently fell back to the
    source would leave the suite testing something users do not run."""
    assert _compiled.loaded() == dict.fromkeys(_compiled.COMPILED, True)


def test_interpreted_switch_loads_every_module_from_its_source():
    assert _loaded(_env()) == dict.fromkeys(_compiled.COMPILED, True)
    assert _loaded(_env(PROXYVPN_INTERPRETED="1")) == dict.fromkeys(_compiled.COMPILED, False)


def test_the_stack_passes_its_unit_tests_interpreted(run_interpreted):
    result = run_interpreted("-x", *(str(REPO / "tests" / "unit" / name) for name in STACK_TESTS),
                             timeout=110)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
