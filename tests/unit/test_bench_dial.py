"""bench.dial runs end to end on loopback and reports both modes (timings are not judged)."""

from __future__ import annotations

import json

from bench import dial


def test_dial_bench_reports_both_modes_and_a_ratio(capsys) -> None:
    assert dial.main(["--dials", "200", "--repeat", "1", "--concurrency", "16"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    per_mode = {r["mode"]: r for r in rows if r["figure"] == "dial_cpu"}
    assert set(per_mode) == {"proxyvpn", "asyncio-streams"}
    assert all(r["value"] > 0 and r["dials"] == 200 for r in per_mode.values())
    (summary,) = [r for r in rows if r["figure"] == "dial_cpu_median"]
    assert summary["ratio"] == round(summary["proxyvpn"] / summary["asyncio-streams"], 2)
