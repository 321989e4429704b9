"""`proxyvpn demo` works end to end and leaves no namespace behind, also on Ctrl+C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nslib import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_demo_runs_end_to_end_and_cleans_up():
    before = namespaces()
    result = subprocess.run([sys.executable, "-m", "proxyvpn", "demo"], capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello from the server namespace" in result.stdout
    assert "CONNECT 10.99.2.2:8080 200" in result.stdout  # the proxy saw the request
    assert "direct TCP: blocked" in result.stdout and "direct UDP: blocked" in result.stdout
    assert "demo OK" in result.stdout
    assert namespaces() == before


def test_demo_cleans_up_on_ctrl_c():
    before = namespaces()
    proc = subprocess.Popen([sys.executable, "-m", "proxyvpn", "demo", "--keep"], env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 90
    output = ""
    while "Press Enter" not in output:  # the demo is fully up and waiting
        assert time.monotonic() < deadline and proc.poll() is None, output
        output += proc.stdout.read(1)
    assert namespaces() - before, "demo namespaces should exist while it runs"
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, output + rest
    assert namespaces() == before
