"""Rendering a Plan for humans (wg-quick style `[#] command` lines) and machines (JSON)."""

from __future__ import annotations

import dataclasses
import json

from proxyvpn.plan.build import Plan

JSON_VERSION = 1
"""Version of the --json document layout."""


def render_commands(plan: Plan) -> str:
    """The plan as the shell commands it is equivalent to, one `[#]` line per operation
    (the nftables ruleset as a heredoc), preceded by comments with the inputs."""
    lines = [
        "# proxyvpn plan (dry run: nothing was changed)",
        f"# proxy addresses: {', '.join(plan.proxy_ips) or '(none)'}",
        f"# DNS bypass: {', '.join(plan.dns_bypass) or '(none)'}",
        f"# firewall backend: {plan.firewall}",
    ]
    lines += selection_lines(plan)
    lines += [f"# warning: {w}" for w in plan.warnings]
    lines += [f"[#] {op.command()}" for op in plan.ops]
    return "\n".join(lines) + "\n"


def selection_lines(plan: Plan) -> list[str]:
    """Comment lines saying whose traffic is captured (the rules are in the nft text)."""
    sel = plan.selection
    if sel is None:
        return ["# selection: the whole host"]
    parts = []
    for label, values in (("only uid", sel.only_uids), ("only gid", sel.only_gids),
                          ("only cgroup", sel.only_cgroups), ("skip uid", sel.skip_uids),
                          ("skip gid", sel.skip_gids), ("skip cgroup", sel.skip_cgroups)):
        if values:
            parts.append(f"{label} {', '.join(map(str, values))}")
    lines = [f"# selection: {'; '.join(parts) if parts else 'the whole host'}"]
    if sel.exec_cgroup:
        root = (plan.cgroup2 or "").rstrip("/")
        lines.append(f"# proxyvpn exec cgroups: {root}/{sel.exec_cgroup}/capture (captured), "
                     f"{root}/{sel.exec_cgroup}/direct (left alone)")
    if sel.watches_cgroups:
        lines.append(f"# cgroup watcher: {len(plan.cgroups_held)} cgroup(s) selected now; "
                     "new ones are added while up runs")
    return lines


def plan_to_dict(plan: Plan) -> dict:
    """The plan as JSON-ready data: each op with its kind, fields and undo."""
    ops = []
    for op in plan.ops:
        undo = op.undo()
        ops.append({**op.to_dict(), "undo": undo.to_dict() if undo is not None else None})
    return {
        "version": JSON_VERSION,
        "ops": ops,
        "dns_bypass": list(plan.dns_bypass),
        "proxy_ips": list(plan.proxy_ips),
        "warnings": list(plan.warnings),
        "firewall": plan.firewall,
        "selection": None if plan.selection is None else {
            **dataclasses.asdict(plan.selection),
            "cgroup2": plan.cgroup2,
            "cgroups": [{"path": p, "id": i} for p, i in plan.cgroups_held],
        },
    }


def plan_to_json(plan: Plan) -> str:
    """Stable JSON (sorted keys, two-space indent, trailing newline) for --dry-run --json."""
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"
