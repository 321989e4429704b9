"""bench.hotpath moves every byte it reports, both ways, with both packet paths (its
timings are not judged)."""

from __future__ import annotations

import json

import pytest

from bench import hotpath


@pytest.mark.parametrize("pure", [False, True])
def test_hotpath_moves_what_it_reports(capsys, pure) -> None:
    args = ["--mb", "20", "--repeat", "1"] + (["--pure-python"] if pure else [])
    assert hotpath.main(args) == 0
    rows = {r["figure"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"hotpath_down", "hotpath_up"}
    for row in rows.values():
        assert row["bytes"] >= 20 * 10**6 and row["value"] > 0
        assert row["impl"] == ("python" if pure else "c")
    down, up = rows["hotpath_down"], rows["hotpath_up"]
    # Download: 64 KiB segments out, one ACK in for each; upload: one ACK per batch of 4.
    assert down["packets_out"] >= down["bytes"] // 65_536
    assert up["packets_in"] >= up["bytes"] // 65_536 and up["packets_out"] * 4 >= up["packets_in"]
