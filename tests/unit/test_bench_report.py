"""bench/report.py: the medians of repeated rounds and the table built from them."""

from __future__ import annotations

from bench.report import markdown, medians


def row(figure: str, mode: str, value: float | None, rnd: int, **extra: object) -> dict:
    return {"figure": figure, "mode": mode, "value": value, "unit": "MB/s", "round": rnd, **extra}


def test_median_is_a_measured_value_and_keeps_every_round() -> None:
    rows = [row("bulk_down_1", "proxyvpn", v, i, seconds=i) for i, v in enumerate((700, 500, 900))]
    rows += [row("bulk_down_1", "direct", v, i) for i, v in enumerate((1000, 800))]
    out = {(r["figure"], r["mode"]): r for r in medians(rows)}
    pv = out[("bulk_down_1", "proxyvpn")]
    assert (pv["value"], pv["seconds"], pv["values"], pv["median_of"]) == (700, 0, [700, 500, 900], 3)
    assert out[("bulk_down_1", "direct")]["value"] == 800  # even count: the lower middle


def test_rounds_without_a_value_are_skipped_but_not_hidden() -> None:
    rows = [row("cps_64", "proxyvpn", None, 0, error="boom"), row("cps_64", "proxyvpn", 1500, 1)]
    (pv,) = medians(rows)
    assert (pv["value"], pv["values"], pv["median_of"]) == (1500, [None, 1500], 1)
    (only,) = medians([row("cps_64", "proxyvpn", None, 0, error="boom")])
    assert only["value"] is None and only["error"] == "boom"


def test_rows_without_a_figure_value_pass_through_and_the_table_shows_medians() -> None:
    diag = {"figure": "diagnostics", "mode": "proxyvpn", "packets_in": 5}
    rows = [diag, *(row("bulk_up_1", m, v, i) for i, (m, v) in
                    enumerate((("direct", 900), ("proxyvpn", 600), ("direct", 1100),
                               ("proxyvpn", 800), ("direct", 1000), ("proxyvpn", 700))))]
    agg = medians(rows)
    assert diag in agg
    table = markdown(agg, header=["# t"], mode_labels={"direct": "direct", "proxyvpn": "proxyvpn"})
    assert "| Bulk upload, 1 flow (↑) | MB/s | 1,000 | 700 | 0.70× |" in table


def test_a_growth_figure_gets_no_ratio() -> None:
    """RSS growth near zero (squid's, redsocks' -0.3 MiB) makes a ratio nonsense."""
    rows = [row("rss_cps", m, v, 0) for m, v in (("direct", 0.5), ("proxyvpn", 17.5),
                                                  ("redsocks", -0.3))]
    table = markdown(medians(rows), header=["# t"],
                     mode_labels={m: m for m in ("direct", "proxyvpn", "redsocks")})
    assert "| MiB | 0.5 | 17.5 | -0.3 | — | — |" in table
