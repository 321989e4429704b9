"""The benchmark suite runs end to end (short mode): every mode moves data and every figure
is reported. Timings are not judged here (bench/README.md: measured, not timed in tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from nslib import REPO


def root_namespace_state() -> str:
    """Links, rules, routes and nft ruleset of the namespace the test runs in."""
    cmds = (["ip", "-o", "link"], ["ip", "rule"], ["ip", "-6", "rule"],
            ["ip", "route", "show", "table", "all"], ["nft", "list", "ruleset"])
    return "\n".join(subprocess.run(c, capture_output=True, text=True).stdout for c in cmds)


@pytest.mark.timeout(300)
def test_bench_quick_runs_every_mode(tmp_path):
    before = root_namespace_state()
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "bulk,lat,cps", "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    got = {(r.get("mode"), r["figure"]): r for r in rows if "mode" in r}
    for mode in ("direct", "proxyvpn", "redsocks"):
        for figure in ("bulk_down_1", "bulk_up_1", "bulk_down_8", "bulk_up_8", "rr_p50",
                       "cps_64", "cpu_conn", "cpu_conn_all"):
            row = got.get((mode, figure))
            assert row and row.get("value"), (mode, figure, row)
    assert "| Bulk download, 1 flow" in result.stdout  # the markdown table
    for mode in ("direct", "proxyvpn", "redsocks"):  # the sum covers every process
        row = got[(mode, "cpu_conn_all")]
        assert row["value"] == pytest.approx(sum(row["cpu_us_per_conn"].values()), abs=0.5)
        assert row["value"] > got[(mode, "cpu_conn")]["value"]
    assert root_namespace_state() == before  # the lab was built in namespaces and removed
