"""The markdown summary: one row per figure, one column per mode, proxyvpn as ratios."""

from __future__ import annotations

from bench.suite import FIGURES


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


NO_RATIO = frozenset({"rss_cps"})
"""Figures that are differences (growth): one near zero makes any ratio meaningless."""


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{r:.2f}×" if r < 10 else f"{r:.0f}×"


def medians(results: list[dict]) -> list[dict]:
    """One row per (figure, mode) of repeated runs: the median value (of the runs that
    produced one; the lower middle of an even count, so it is a measured value), with
    every value kept in ``values``. Rows without a value pass through unchanged."""
    groups: dict[tuple[str, str], list[dict]] = {}
    out: list[dict] = []
    for row in results:
        if "value" not in row or "mode" not in row:
            out.append(row)
            continue
        groups.setdefault((row["figure"], row["mode"]), []).append(row)
    for rows in groups.values():
        measured = sorted((r for r in rows if r["value"] is not None), key=lambda r: r["value"])
        if not measured:
            out.append(rows[-1])
            continue
        mid = measured[(len(measured) - 1) // 2]
        out.append({**mid, "values": [r["value"] for r in rows], "median_of": len(measured)})
    return out


def markdown(results: list[dict], *, header: list[str], mode_labels: dict[str, str]) -> str:
    values: dict[tuple[str, str], float | None] = {}
    marks: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    for row in results:
        if "value" not in row:
            continue
        key = (row["figure"], row["mode"])
        values[key] = row["value"]
        target = row["figure"].removeprefix("rss_")
        if target.isdigit() and int(target) > 0 and row.get("flows", int(target)) < int(target):
            marks[key] = "†" * (len(notes) + 1)
            notes.append(f"{marks[key]} {mode_labels.get(row['mode'], row['mode'])}: only "
                         f"{row['flows']:,} of {int(target):,} flows opened "
                         f"({row.get('first_error') or 'see the JSON'}).")
        if row["figure"] == "rss_per_flow" and row.get("opened", 0) < row.get("idle_flows", 0):
            marks[key] = "†" * (len(notes) + 1)
            notes.append(f"{marks[key]} {mode_labels.get(row['mode'], row['mode'])}: per flow "
                         f"from the {row['opened']:,} flows that opened.")
        if row.get("value") is None and row.get("error"):
            marks[key] = "†" * (len(notes) + 1)
            notes.append(f"{marks[key]} {mode_labels.get(row['mode'], row['mode'])}, "
                         f"{row['figure']}: {row['error']}")
    lines = [*header, ""]
    cols = [m for m in ("direct", "proxyvpn", "redsocks") if m in mode_labels]
    head = ["Figure", "Unit", *[mode_labels[m] for m in cols]]
    if "proxyvpn" in cols and "direct" in cols:
        head.append("proxyvpn ÷ direct")
    if "proxyvpn" in cols and "redsocks" in cols:
        head.append("proxyvpn ÷ redsocks")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for fid, title, unit, higher in FIGURES:
        if not any((fid, m) in values for m in cols):
            continue
        arrow = "↑" if higher else "↓"
        cells = [f"{title} ({arrow})", unit]
        cells += [_fmt(values.get((fid, m))) + marks.get((fid, m), "") for m in cols]
        pv = None if fid in NO_RATIO else values.get((fid, "proxyvpn"))
        if "proxyvpn" in cols and "direct" in cols:
            cells.append(_ratio(pv, values.get((fid, "direct"))))
        if "proxyvpn" in cols and "redsocks" in cols:
            cells.append(_ratio(pv, values.get((fid, "redsocks"))))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "↑ higher is better, ↓ lower is better. Ratios are proxyvpn's value divided by the "
        "other mode's.",
        "CPU and RSS: proxyvpn's process, redsocks' process; the direct-CONNECT column is the "
        "proxy itself (the proxy-only baseline: there is no relay in that mode), except "
        "the \"every process\" line: proxy, relay, server and client together.",
        *notes,
    ]
    return "\n".join(lines)
