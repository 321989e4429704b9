"""Replaying a journal (`proxyvpn down`, `up`'s clean_stale) only undoes ops proxyvpn's
planner can produce: the journal lives in a directory its user owns and `down` may run as
root, so a forged one must be refused whole, before anything is undone. No root needed:
the executor is stubbed."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_plan import CASES, FACTS, IPT_CASES, SEL_CASES, config

from proxyvpn.errors import UntrustedStateError
from proxyvpn.plan.build import build_plan
from proxyvpn.plan.journal import journal_ops, valid_ifname
from proxyvpn.system import apply
from proxyvpn.system.down import bring_down, clean_stale
from proxyvpn.system.state import StateDir

ALL_CASES = {**CASES, **IPT_CASES, **SEL_CASES,
             # The only plan with the disable_ipv6 sysctl, and a TUN name with a dot.
             "ipv6_default_disabled": (config(tun_name="pv.0"), dataclasses.replace(
                 FACTS, sysctls={**FACTS.sysctls, "net.ipv6.conf.default.disable_ipv6": "1"})),
             "rp_filter_unknown": (config(), dataclasses.replace(FACTS, sysctls={}))}


def recorded(plan) -> list[dict]:
    """The plan's ops as state.json holds them (through JSON, as `down` reads them)."""
    return json.loads(json.dumps([op.to_dict() for op in plan.ops]))


@pytest.mark.parametrize("case", sorted(ALL_CASES))
def test_every_planned_op_is_accepted(case):
    cfg, facts = ALL_CASES[case]
    plan = build_plan(cfg, facts)
    applied = recorded(plan)
    assert journal_ops(applied, cfg.tun_name) == plan.ops
    # Without state["tun"] the TUN is the journal's CreateTun.
    assert journal_ops(applied) == plan.ops
    # A crash leaves a prefix of the plan (write-ahead): every prefix replays too.
    for end in range(len(applied)):
        assert journal_ops(applied[:end], cfg.tun_name) == plan.ops[:end]


GENUINE = recorded(build_plan(*CASES["killswitch_on"]))
GENUINE_IPT = recorded(build_plan(*IPT_CASES["iptables_killswitch_on"]))

AUDITOR = [  # /tmp/audit-priv/sd/state.json
    {"kind": "LoadNftTable", "family": "inet", "name": "firewalld"},
    {"kind": "SetAddress", "dev": "eth0", "cidr": "192.168.1.10/24"},
    {"kind": "AddRoute", "family": 4, "table": 254, "dev": "eth0", "dst": "default"},
    {"kind": "AddRule", "family": 4, "fwmark": 0, "table": 255, "priority": 0},
    {"kind": "CreateTun", "name": "wg0", "mtu": 1500},
    {"kind": "LoadIptables", "family": 4, "chains": ["filter/DOCKER-USER"],
     "jumps": ["filter/FORWARD/DOCKER-USER"]},
    {"kind": "SetSysctl", "key": "net.ipv4.ip_forward", "value": "0", "previous": "1"},
    {"kind": "SetSysctl", "key": "kernel.core_pattern", "value": "x",
     "previous": "|/home/mallory/pwn"},
]

FORGED = [
    *AUDITOR,
    {"kind": "LoadNftTable", "family": "ip", "name": "proxyvpn"},
    {"kind": "LoadNftTable", "family": "inet", "name": "proxyvpn2"},
    {"kind": "LinkUp", "dev": "eth0"},
    {"kind": "SetAddress", "dev": "tun0", "cidr": "not an address"},
    {"kind": "AddRoute", "family": 4, "table": 7076, "dev": "eth0"},
    {"kind": "AddRoute", "family": 4, "table": 7076, "dev": "tun0", "dst": "10.0.0.0/8"},
    {"kind": "AddRoute", "family": 4, "table": 254, "dev": "tun0"},
    {"kind": "AddRoute", "family": True, "table": 7076, "dev": "tun0"},
    {"kind": "AddRule", "family": 4, "fwmark": 0x7076, "table": 254, "priority": 7076},
    {"kind": "AddRule", "family": 4, "fwmark": 0x7076, "table": 253, "priority": 7076},
    {"kind": "AddRule", "family": 4, "fwmark": 0x7076, "table": 7076, "priority": 32766},
    {"kind": "AddRule", "family": 4, "fwmark": 0x7076, "table": 7076, "priority": 32767},
    {"kind": "AddRule", "family": 4, "fwmark": 0x7076, "table": 7076, "priority": 0},
    {"kind": "AddRule", "family": 6, "fwmark": 0x7076, "table": 7077, "priority": 7076},
    {"kind": "AddRule", "family": 6, "fwmark": 0x1, "table": 7076, "priority": 7076},
    {"kind": "CreateTun", "name": "tun0", "mtu": "1500"},
    {"kind": "LoadIptables", "family": 4, "chains": ["filter/PROXYVPN"],
     "jumps": ["filter/FORWARD/DOCKER-USER"]},
    {"kind": "LoadIptables", "family": 4, "chains": ["filter/PROXYVPN"], "jumps": [],
     "new_tables": ["nat"]},
    {"kind": "LoadIptables", "family": 4, "chains": ["mangle/PROXYVPN"], "jumps": [],
     "new_tables": ["filter"]},
    {"kind": "LoadIptables", "family": 4, "chains": "filter/PROXYVPN", "jumps": []},
    {"kind": "SetSysctl", "key": "net.ipv4.conf.tun0.rp_filter", "value": "2",
     "previous": "|/home/mallory/pwn"},
    {"kind": "SetSysctl", "key": "net.ipv4.conf.tun0.rp_filter", "value": "2",
     "previous": 1},
    {"kind": "SetSysctl", "key": "net.ipv4.conf.tun0.rp_filter", "value": "7"},
    {"kind": "SetSysctl", "key": "net.ipv4.conf.all.rp_filter", "value": "2", "previous": "1"},
    {"kind": "SetSysctl", "key": "net.ipv4.conf.eth0.rp_filter", "value": "2",
     "previous": "1"},
    {"kind": "SetSysctl", "key": "net.ipv6.conf.tun0.disable_ipv6", "value": "0",
     "previous": "2"},
    {"kind": "SetSysctl", "key": "net.ipv6.conf.all.disable_ipv6", "value": "0",
     "previous": "1"},
    # Undo kinds are never recorded (their own undo is nothing, but they are not ours).
    {"kind": "DeleteLink", "name": "eth0"},
    {"kind": "DeleteNftTable", "family": "inet", "name": "firewalld"},
    {"kind": "DelRule", "family": 4, "fwmark": 0, "table": 254, "priority": 32766},
    {"kind": "NoSuchOp"},
    "not an object",
]


@pytest.mark.parametrize("forged", FORGED, ids=lambda op: json.dumps(op)[:60])
@pytest.mark.parametrize("genuine", [GENUINE, GENUINE_IPT], ids=["nft", "iptables"])
def test_forged_op_is_refused(forged, genuine):
    for position in (0, len(genuine) // 2, len(genuine)):
        applied = [*genuine[:position], forged, *genuine[position:]]
        with pytest.raises(ValueError, match="^operation|several"):
            journal_ops(applied, "tun0")


@pytest.mark.parametrize("tun", ["eth0.100/../x", "", "a" * 16, "tun+", "tun*", "..", "t 0",
                                 7, ["tun0"]])
def test_recorded_tun_must_be_a_valid_interface_name(tun):
    assert not valid_ifname(tun)
    with pytest.raises(ValueError, match="valid interface name"):
        journal_ops([{"kind": "CreateTun", "name": tun, "mtu": 1500}], None)
    with pytest.raises(ValueError):
        journal_ops(GENUINE, tun)


def test_tun_must_match_the_recorded_one():
    with pytest.raises(ValueError, match="is not the TUN 'wg0'"):
        journal_ops(GENUINE, "wg0")
    # The auditor's journal has no "tun": its CreateTun says wg0, its address eth0.
    with pytest.raises(ValueError, match="not inet proxyvpn"):
        journal_ops(AUDITOR)
    with pytest.raises(ValueError, match="device 'eth0' is not the TUN 'wg0'"):
        journal_ops(AUDITOR[1:2] + AUDITOR[4:5])


@pytest.mark.parametrize("applied", [None, {"kind": "CreateTun"}, "[]", 3])
def test_applied_must_be_a_list(applied):
    with pytest.raises(ValueError, match="not a list"):
        journal_ops(applied, "tun0")


# ---------------------------------------------------------------- nothing is undone


@pytest.fixture
def executed(monkeypatch):
    """The ops the executor was asked to run (none touches the system)."""
    ran: list = []
    monkeypatch.setattr(apply._Executor, "run", lambda self, op: ran.append(op))
    monkeypatch.setattr(apply._Executor, "close", lambda self: None)
    return ran


def journal(state_dir, applied, **extra) -> StateDir:
    store = StateDir(state_dir)
    store.write({"version": 1, "pid": 999999, "proxy": "http://alice:***@proxy.example:3128",
                 "applied": applied, **extra})
    return store


def test_undo_ops_refuses_before_undoing_anything(executed):
    with pytest.raises(UntrustedStateError):
        apply.undo_ops([*GENUINE, *AUDITOR], "tun0")
    assert executed == []


@pytest.mark.parametrize("forged", AUDITOR, ids=lambda op: op["kind"])
def test_down_refuses_a_forged_journal_and_keeps_it(tmp_path, executed, forged):
    # The forged op last: the undo runs in reverse, so it would be the first to run.
    store = journal(tmp_path, [*GENUINE, forged], tun="tun0")
    before = store.state_file.read_bytes()
    with pytest.raises(UntrustedStateError) as info:
        bring_down(tmp_path)
    assert executed == []
    assert store.state_file.read_bytes() == before
    message = str(info.value)
    assert "\n" not in message and "***" not in message and "alice" not in message
    assert str(store.state_file) in message and "nothing was undone" in message


def test_clean_stale_refuses_a_forged_journal(tmp_path, executed):
    store = journal(tmp_path, AUDITOR, tun="wg0")
    with pytest.raises(UntrustedStateError):
        clean_stale(tmp_path)
    assert executed == []
    assert store.state_file.exists()
    # `up` holds the lock when it calls clean_stale: same refusal.
    store.acquire()
    with pytest.raises(UntrustedStateError):
        clean_stale(tmp_path)
    assert executed == [] and store.state_file.exists()


def test_down_undoes_a_genuine_journal(tmp_path, executed):
    plan = build_plan(*ALL_CASES["ipv6_default_disabled"])
    store = journal(tmp_path, recorded(plan), tun="pv.0")
    assert bring_down(tmp_path).startswith("cleaned up after a proxyvpn")
    expected = [u for u in (op.undo() for op in reversed(plan.ops)) if u is not None]
    assert executed == expected
    assert not store.state_file.exists()
