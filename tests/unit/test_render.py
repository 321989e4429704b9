"""Rendering of plans (dry-run commands, JSON) and the op <-> dict round trip. No root.

That the rendered nft text is accepted by `nft -c -f` and means the same as the JSON batch
is checked as root, inside namespaces, in tests/netns/test_apply.py.
"""

from __future__ import annotations

import json

import pytest
from test_plan import CASES, FACTS, config

from proxyvpn.plan import nft
from proxyvpn.plan.build import build_plan
from proxyvpn.plan.ops import (
    OP_KINDS,
    AddRoute,
    AddRule,
    CreateTun,
    DelAddress,
    DeleteIptables,
    DeleteLink,
    DeleteNftTable,
    DelRoute,
    DelRule,
    LinkUp,
    LoadIptables,
    LoadNftTable,
    SetAddress,
    SetSysctl,
    op_from_dict,
)
from proxyvpn.plan.render import plan_to_dict, plan_to_json, render_commands

SAMPLES = [
    LoadNftTable("inet", "proxyvpn", ({"add": {"table": {"family": "inet", "name": "x",
                                                         "elem": [1, {"a": [2]}]}}},), "text\n"),
    DeleteNftTable("inet", "proxyvpn"),
    LoadIptables(6, ("mangle/PROXYVPN",), ("mangle/OUTPUT/PROXYVPN",),
                 "*mangle\n-N PROXYVPN\nCOMMIT\n", ("mangle",)),
    DeleteIptables(4, ("mangle/PROXYVPN", "filter/PROXYVPN"),
                   ("mangle/OUTPUT/PROXYVPN", "filter/OUTPUT/PROXYVPN"), ()),
    CreateTun("tun0", 65535),
    DeleteLink("tun0"),
    LinkUp("tun0"),
    SetAddress("tun0", "10.255.255.1/30"),
    SetAddress("tun0", "fd70:7076::1/126"),
    DelAddress("tun0", "fd70:7076::1/126"),
    SetSysctl("net.ipv4.conf.tun0.rp_filter", "2", "1"),
    SetSysctl("net.ipv4.conf.tun0.rp_filter", "2", None),
    AddRoute(6, 7076, "tun0"),
    DelRoute(4, 7076, "tun0", "10.0.0.0/8"),
    AddRule(4, 0x7076, 7076, 7076),
    DelRule(6, 0x7076, 7076, 7076),
]


@pytest.mark.parametrize("op", SAMPLES, ids=lambda op: type(op).__name__)
def test_op_round_trip(op):
    data = op.to_dict()
    assert data["kind"] == type(op).__name__
    # Through real JSON text, as in the state file.
    again = op_from_dict(json.loads(json.dumps(data)))
    assert again == op
    assert again.command() == op.command()
    assert again.undo() == op.undo()


def test_every_kind_is_sampled():
    assert {type(op).__name__ for op in SAMPLES} == set(OP_KINDS)


def test_round_trip_of_every_planned_op():
    for cfg, facts in CASES.values():
        for op in build_plan(cfg, facts).ops:
            assert op_from_dict(json.loads(json.dumps(op.to_dict()))) == op


@pytest.mark.parametrize("data, message", [
    ({"kind": "FormatDisk"}, "unknown operation kind"),
    ({"name": "tun0"}, "unknown operation kind"),
    ({"kind": "CreateTun", "name": "tun0"}, "lacks field 'mtu'"),
])
def test_op_from_dict_rejects_bad_records(data, message):
    with pytest.raises(ValueError, match=message):
        op_from_dict(data)


@pytest.mark.parametrize("op, command", [
    (AddRule(4, 0x7076, 7076, 7076), "ip rule add fwmark 0x7076 lookup 7076 priority 7076"),
    (DelRule(6, 0x7076, 7076, 7076), "ip -6 rule del fwmark 0x7076 lookup 7076 priority 7076"),
    (AddRoute(6, 7076, "tun0"), "ip -6 route add default dev tun0 table 7076"),
    (AddRoute(4, 100, "tun0"), "ip route add default dev tun0 table 100"),
    (SetSysctl("net.ipv4.conf.tun0.rp_filter", "2", "0"), "sysctl -w net.ipv4.conf.tun0.rp_filter=2"),
    (SetAddress("tun0", "10.255.255.1/30"), "ip address add 10.255.255.1/30 dev tun0"),
    (SetAddress("tun0", "fd70:7076::1/126"), "ip -6 address add fd70:7076::1/126 dev tun0 nodad"),
    (DelAddress("tun0", "10.255.255.1/30"), "ip address del 10.255.255.1/30 dev tun0"),
    (CreateTun("tun0", 1500), "ip tuntap add dev tun0 mode tun vnet_hdr && ip link set dev tun0 mtu 1500 txqueuelen 10000"),
    (CreateTun("tun0", 1500, offload=False), "ip tuntap add dev tun0 mode tun && ip link set dev tun0 mtu 1500 txqueuelen 10000"),
    (LinkUp("tun0"), "ip link set dev tun0 up"),
    (DeleteLink("tun0"), "ip link delete dev tun0"),
    (DeleteNftTable("inet", "proxyvpn"), "nft delete table inet proxyvpn"),
    (LinkUp("we'ird"), "ip link set dev 'we'\"'\"'ird' up"),
])
def test_commands(op, command):
    assert op.command() == command


def test_nft_op_renders_a_heredoc_and_a_short_summary():
    op = build_plan(*CASES["killswitch_on"]).ops[0]
    lines = op.command().splitlines()
    assert lines[0] == "nft -f - <<'EOF'" and lines[-1] == "EOF"
    assert lines[1] == "create table inet proxyvpn"
    assert "\n" not in op.summary() and "table inet proxyvpn" in op.summary()


def test_render_commands_wg_quick_style():
    plan = build_plan(*CASES["killswitch_on"])
    out = render_commands(plan)
    assert out.endswith("\n")
    cmd_lines = [line for line in out.splitlines() if line.startswith("[#] ")]
    assert len(cmd_lines) == len(plan.ops)
    assert cmd_lines[0] == "[#] nft -f - <<'EOF'"
    assert cmd_lines[-2:] == ["[#] ip rule add fwmark 0x7076 lookup 7076 priority 7076",
                              "[#] ip -6 rule add fwmark 0x7076 lookup 7076 priority 7076"]
    assert "# proxy addresses: 192.0.2.10" in out
    assert "# DNS bypass: 192.0.2.53" in out


def test_render_shows_warnings():
    import dataclasses

    plan = build_plan(config(), dataclasses.replace(FACTS, resolvers=("127.0.0.53",)))
    assert "# warning: killswitch on and no resolver reachable" in render_commands(plan)


def test_plan_json_is_stable_and_complete():
    plan = build_plan(*CASES["https_two_proxy_ips"])
    text = plan_to_json(plan)
    assert text == plan_to_json(plan)
    data = json.loads(text)
    assert data == plan_to_dict(plan)
    assert list(data) == sorted(data)
    assert data["proxy_ips"] == ["198.51.100.7", "2001:db8::7"]
    assert data["dns_bypass"] == ["192.0.2.53"]
    assert [op["kind"] for op in data["ops"]] == [type(op).__name__ for op in plan.ops]
    rule = data["ops"][-1]
    assert rule["undo"] == {"kind": "DelRule", "family": 6, "fwmark": 1, "table": 100,
                            "priority": 90}
    assert data["ops"][4]["undo"] is None  # LinkUp


def test_json_and_text_come_from_one_model():
    """Every rule of the JSON batch appears, in order, as a line of the text."""
    cfg, facts = CASES["excludes_allow_dns"]
    plan = build_plan(cfg, facts)
    op = plan.ops[0]
    sets, chains = nft.build_model(cfg, plan.proxy_ips, plan.dns_bypass)
    json_rules = [c["add"]["rule"] for c in op.ruleset if "rule" in c.get("add", {})]
    text_rules = [r for ch in chains for r in ch.rules]
    assert [r["expr"] for r in json_rules] == [[s.json for s in r] for r in text_rules]
    body = op.text
    positions = [body.index("\t\t" + " ".join(s.text for s in r) + "\n") for r in text_rules]
    assert positions == sorted(positions)
    assert [s.name for s in sets] == ["proxy4", "proxy6", "dns4", "dns6", "exclude4", "exclude6"]


def test_empty_sets_have_no_element_command():
    cfg = config(proxy_ip=["192.0.2.10"])
    ruleset = nft.build_ruleset(cfg, ["192.0.2.10"], [])
    elements = [c["add"]["element"]["name"] for c in ruleset if "element" in c.get("add", {})]
    assert elements == ["proxy4"]
    assert not any("delete" in c or "flush" in c for c in ruleset)
    assert ruleset[1] == {"create": {"table": {"family": "inet", "name": "proxyvpn"}}}


def test_killswitch_off_has_no_killswitch_chain():
    plan = build_plan(*CASES["killswitch_off"])
    chains = [c["add"]["chain"]["name"] for c in plan.ops[0].ruleset if "chain" in c.get("add", {})]
    assert chains == ["capture"]
    assert "killswitch" not in plan.ops[0].text
