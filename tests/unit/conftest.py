"""The `interpreted` marker: tests that replace or subclass parts of the compiled stack;
the `collector_off` fixture."""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from proxyvpn import _compiled

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "interpreted: monkeypatches or subclasses a compiled class or function; "
        "in the compiled build it runs in a child with PROXYVPN_INTERPRETED=1")


def run_interpreted(*pytest_args: str, timeout: float) -> subprocess.CompletedProcess:
    """pytest ``pytest_args`` in a child that imports the compiled modules from source."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=REPO, env={**os.environ, _compiled.ENV: "1", "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def collector_off():
    """The cyclic garbage collector off for the test (after it collected what earlier
    tests left): whatever the test frees, reference counting freed."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    yield
    if enabled:
        gc.enable()


@pytest.fixture(name="run_interpreted")
def run_interpreted_fixture():
    """:func:`run_interpreted`, for tests (a conftest is not imported by name)."""
    return run_interpreted


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an `interpreted` test from the source, in a child, when the stack is compiled.

    Compiled methods cannot be replaced and compiled classes cannot be subclassed from
    Python; what such a test checks is the source's behaviour, which the compiled build
    shares. The test passes only if it passed in the child: it is never skipped.
    """
    if pyfuncitem.get_closest_marker("interpreted") is None or os.environ.get(_compiled.ENV) == "1":
        return None
    result = run_interpreted(pyfuncitem.nodeid, timeout=100)
    assert result.returncode == 0 and re.search(r"^1 passed in", result.stdout, re.M), \
        f"interpreted run of {pyfuncitem.nodeid} failed:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"
    return True
