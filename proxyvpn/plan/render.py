"""Rendering a Plan for humans (wg-quick style `[#] command` lines) and machines (JSON)."""

from __future__ import annotations

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
    lines += [f"# warning: {w}" for w in plan.warnings]
    lines += [f"[#] {op.command()}" for op in plan.ops]
    return "\n".join(lines) + "\n"


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
    }


def plan_to_json(plan: Plan) -> str:
    """Stable JSON (sorted keys, two-space indent, trailing newline) for --dry-run --json."""
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"
