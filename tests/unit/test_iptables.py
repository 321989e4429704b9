"""The iptables backend without a kernel: rule rendering (golden), op undo, backend choice,
iptables-save parsing. That iptables-restore accepts the documents and that they block
leaks is checked as root in tests/netns/test_apply.py and test_killswitch.py.

Golden files: tests/unit/golden/iptables_*.restore hold the restore documents of the
IPT_CASES of test_plan.py (the whole plans are in golden/iptables_*.json). Regenerate
after an intended change with PROXYVPN_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_plan import GOLDEN, IPT_CASES, IPT_FACTS, UPDATE, config

from proxyvpn.config import build_config
from proxyvpn.errors import ConfigError
from proxyvpn.plan import iptables
from proxyvpn.plan.build import build_plan
from proxyvpn.plan.ops import DeleteIptables, LoadIptables, op_from_dict
from proxyvpn.plan.render import plan_to_dict, render_commands
from proxyvpn.system import firewall
from proxyvpn.system.iptables import parse_save


def section(text: str, table: str) -> str:
    """One table's part of a restore document, from `*table` to its COMMIT."""
    return f"*{table}\n" + text.split(f"*{table}\n")[1].split("COMMIT\n")[0] + "COMMIT\n"


def ipt_ops(plan) -> list[LoadIptables]:
    return [op for op in plan.ops if isinstance(op, LoadIptables)]


@pytest.mark.parametrize("case", sorted(IPT_CASES))
def test_golden_restore_documents(case):
    plan = build_plan(*IPT_CASES[case])
    text = "".join(f"# {iptables.tool(op.family)}-restore --noflush\n{op.text}"
                   for op in ipt_ops(plan))
    path = GOLDEN / f"{case}.restore"
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with PROXYVPN_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"iptables rules for {case} changed"


def test_plan_order_and_no_nft():
    plan = build_plan(*IPT_CASES["iptables_killswitch_on"])
    kinds = [type(op).__name__ for op in plan.ops]
    # The firewall first (fail closed), one transaction per family; no nftables table.
    assert kinds[:3] == ["LoadIptables", "LoadIptables", "CreateTun"]
    assert "LoadNftTable" not in kinds
    v4, v6 = ipt_ops(plan)
    assert (v4.family, v6.family) == (4, 6)
    assert v4.chains == ("mangle/PROXYVPN", "mangle/PROXYVPN_POST", "filter/PROXYVPN")
    # The killswitch is committed before the capture (fail closed).
    assert v4.text.index("*filter") < v4.text.index("*mangle")
    assert v4.jumps == ("mangle/OUTPUT/PROXYVPN", "mangle/POSTROUTING/PROXYVPN_POST",
                        "filter/OUTPUT/PROXYVPN")
    # IPT_FACTS: only the IPv4 filter table existed before.
    assert v4.new_tables == ("mangle",) and v6.new_tables == ("filter", "mangle")
    assert plan.firewall == "iptables"


def test_capture_rules_mirror_the_nft_exceptions():
    text = ipt_ops(build_plan(*IPT_CASES["iptables_killswitch_on"]))[0].text
    mangle = section(text, "mangle")
    for rule in ("! -p tcp -j RETURN", "-m conntrack --ctdir REPLY -j RETURN",
                 "-m mark --mark 0x7077 -j RETURN", "-o lo -j RETURN", "-o tun0 -j RETURN",
                 "-d 169.254.0.0/16 -j RETURN", "-d 10.255.255.0/30 -j RETURN",
                 "-d 192.0.2.10 -j RETURN", "-d 192.0.2.53 -p tcp --dport 53 -j RETURN"):
        assert f"-A PROXYVPN {rule}\n" in mangle, rule
    lines = mangle.splitlines()
    # The mark is the last rule of the capture chain: every exception comes before it.
    capture = [line for line in lines if line.startswith("-A PROXYVPN ")]
    assert capture[-1] == "-A PROXYVPN -j MARK --set-mark 0x7076"
    assert "-A PROXYVPN_POST -m mark --mark 0x7076 ! -o tun0 -j DROP" in lines
    # Jumps go first in the built-in chains, after our chains are complete.
    assert lines[-3:] == ["-I OUTPUT 1 -j PROXYVPN", "-I POSTROUTING 1 -j PROXYVPN_POST",
                          "COMMIT"]


def test_killswitch_rules_v4_and_v6():
    v4, v6 = ipt_ops(build_plan(*IPT_CASES["iptables_killswitch_on"]))
    f4 = section(v4.text, "filter").splitlines()[1:]
    assert f4[:4] == ["-N PROXYVPN", "-A PROXYVPN -o lo -j RETURN",
                      "-A PROXYVPN -m mark --mark 0x7076 -j RETURN",
                      "-A PROXYVPN -o tun0 -j RETURN"]
    for rule in ("-d 192.0.2.10 -p tcp --dport 3128 -j RETURN",
                 "-d 192.0.2.53 -p udp --dport 53 -j RETURN",
                 "-d 192.0.2.53 -p tcp --dport 53 -j RETURN",
                 "-p udp --sport 68 --dport 67 -j RETURN"):
        assert f"-A PROXYVPN {rule}" in f4, rule
    assert f4[-4:] == ["-A PROXYVPN -p tcp -j REJECT --reject-with tcp-reset",
                       "-A PROXYVPN -j REJECT --reject-with icmp-admin-prohibited",
                       "-I OUTPUT 1 -j PROXYVPN", "COMMIT"]
    f6 = section(v6.text, "filter").splitlines()[1:]
    for rule in ("-d ff02::1:2 -p udp --sport 546 --dport 547 -j RETURN",
                 "-p ipv6-icmp --icmpv6-type 135 -j RETURN",
                 "-d ff02::/16 -p ipv6-icmp --icmpv6-type 143 -j RETURN",
                 "-j REJECT --reject-with icmp6-adm-prohibited"):
        assert f"-A PROXYVPN {rule}" in f6, rule
    # Neither the IPv4 proxy nor the IPv4 resolver appears in ip6tables rules.
    assert "192.0.2." not in v6.text


def test_ipv6_off_still_blocks_ipv6():
    ops = ipt_ops(build_plan(*IPT_CASES["iptables_ipv6_off"]))
    v6 = next(op for op in ops if op.family == 6)
    assert v6.chains == ("filter/PROXYVPN",)  # no capture, but the killswitch
    assert "MARK" not in v6.text and "-j REJECT --reject-with icmp6-adm-prohibited" in v6.text


def test_no_killswitch_has_capture_only():
    ops = ipt_ops(build_plan(*IPT_CASES["iptables_killswitch_off"]))
    assert [op.chains for op in ops] == [("mangle/PROXYVPN",), ("mangle/PROXYVPN",)]
    assert all("*filter" not in op.text and "REJECT" not in op.text for op in ops)
    # Without IPv6 capture as well, ip6tables has nothing to do at all.
    plan = build_plan(config(killswitch=False, ipv6=False), IPT_FACTS)
    assert [op.family for op in ipt_ops(plan)] == [4]


def test_excludes_are_collapsed_and_split_by_family():
    v4, v6 = ipt_ops(build_plan(*IPT_CASES["iptables_excludes_two_proxy_ips"]))
    assert "-A PROXYVPN -d 10.0.0.0/8 -j RETURN" in v4.text
    assert "10.1.0.0/16" not in v4.text  # inside 10.0.0.0/8
    assert "-A PROXYVPN -d 2001:db8:1::/48 -j RETURN" in v6.text
    assert "-A PROXYVPN -d 2001:db8::7 -p tcp --dport 3128 -j RETURN" in v6.text
    assert "-A PROXYVPN -d 2620:fe::fe -p udp --dport 53 -j RETURN" in v6.text
    assert "-o pvpn0" in v4.text and "--set-mark 0x1" in v4.text
    # Facts unknown (dry run without privileges): claim no table as ours.
    assert v4.new_tables == () and v6.new_tables == ()


def test_undo_removes_exactly_ours_and_round_trips():
    for op in ipt_ops(build_plan(*IPT_CASES["iptables_killswitch_on"])):
        undo = op.undo()
        assert undo == DeleteIptables(op.family, op.chains, op.jumps, op.new_tables)
        assert op_from_dict(json.loads(json.dumps(undo.to_dict()))) == undo
        assert op_from_dict(json.loads(json.dumps(op.to_dict()))) == op
        text = undo.command()
        assert text.startswith(f"{iptables.tool(op.family)}-restore --noflush <<'EOF'\n")
        body = text.splitlines()[1:-1]
        assert "-D OUTPUT -j PROXYVPN" in body and "-X PROXYVPN" in body
        # Only our chains are flushed; never a built-in chain, never a whole table.
        assert all(not line.startswith("-F") or line.split()[1].startswith("PROXYVPN")
                   for line in body)


def test_dry_run_shows_restore_commands_and_json():
    plan = build_plan(*IPT_CASES["iptables_killswitch_on"])
    out = render_commands(plan)
    assert "# firewall backend: iptables" in out
    assert "[#] iptables-restore --noflush <<'EOF'" in out
    assert "[#] ip6tables-restore --noflush <<'EOF'" in out
    assert "nft" not in out
    data = plan_to_dict(plan)
    assert data["firewall"] == "iptables"
    assert data["ops"][0]["kind"] == "LoadIptables"
    assert data["ops"][0]["undo"]["kind"] == "DeleteIptables"


# ---------------------------------------------------------------- choosing the backend


@pytest.mark.parametrize("have, requested, want", [
    ({"libnftables", "nft-binary", "iptables"}, "auto", "libnftables"),
    ({"nft-binary", "iptables"}, "auto", "nft-binary"),
    ({"iptables"}, "auto", "iptables"),
    ({"nft-binary", "iptables"}, "nft", "nft-binary"),
    ({"libnftables", "nft-binary", "iptables"}, "iptables", "iptables"),
    ({"libnftables", "nft-binary"}, "nft-binary", "nft-binary"),
])
def test_resolve(monkeypatch, have, requested, want):
    monkeypatch.setattr(firewall, "available", lambda b: b in have)
    assert firewall.resolve(requested) == want


@pytest.mark.parametrize("have, requested, message", [
    (set(), "auto", "install the libnftables Python module .* or the nft binary .* or "
                    "iptables-nft-restore .* iptables-legacy cannot be used"),
    ({"libnftables"}, "iptables", "--firewall-backend iptables: not available"),
    ({"iptables"}, "nft", "--firewall-backend nft: not available"),
])
def test_resolve_refuses_what_is_missing(monkeypatch, have, requested, message):
    monkeypatch.setattr(firewall, "available", lambda b: b in have)
    with pytest.raises(ConfigError, match=message):
        firewall.resolve(requested)


def _fake_tools(tmp_path, flavour: str, names: tuple[str, ...]) -> None:
    for name in names:
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\necho '{name} v1.8.9 ({flavour})'\n")
        tool.chmod(0o755)


def test_iptables_legacy_is_not_used(monkeypatch, tmp_path):
    """iptables-legacy needs CAP_NET_RAW, which `up` drops: only the nf_tables flavour,
    under its own name or as plain iptables-restore, counts as the iptables backend."""
    def which(name: str) -> str | None:
        path = tmp_path / name.rsplit("/", 1)[-1]
        return str(path) if path.exists() else None

    monkeypatch.setattr(firewall.shutil, "which", which)
    _fake_tools(tmp_path, "legacy", ("iptables-restore", "ip6tables-restore"))
    assert firewall.iptables_binaries() is None
    _fake_tools(tmp_path, "nf_tables", ("iptables-restore", "ip6tables-restore"))
    assert firewall.iptables_binaries() == (str(tmp_path / "iptables-restore"),
                                            str(tmp_path / "ip6tables-restore"))
    _fake_tools(tmp_path, "legacy", ("iptables-restore",))
    _fake_tools(tmp_path, "nf_tables", ("iptables-nft-restore", "ip6tables-nft-restore"))
    assert firewall.iptables_binaries() == (str(tmp_path / "iptables-nft-restore"),
                                            str(tmp_path / "ip6tables-nft-restore"))


def test_config_key_and_validation():
    cfg = build_config({"proxy_url": "http://p:1", "firewall_backend": "IPTables"})
    assert cfg.firewall_backend == "iptables"
    assert build_config({"proxy_url": "http://p:1"}).firewall_backend == "auto"
    with pytest.raises(ConfigError, match="--firewall-backend: 'pf' is not one of"):
        build_config({"proxy_url": "http://p:1", "firewall_backend": "pf"})


def test_nft_backends_plan_the_same_table():
    cfg, facts = IPT_CASES["iptables_killswitch_on"]
    lib = build_plan(cfg, dataclasses.replace(facts, firewall="libnftables"))
    binary = build_plan(cfg, dataclasses.replace(facts, firewall="nft-binary"))
    assert lib.ops == binary.ops and binary.firewall == "nft-binary"


# ---------------------------------------------------------------- reading iptables-save


SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Dec  3 06:45:34 2026
*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [12:720]
:PROXYVPN - [0:0]
-A OUTPUT -j PROXYVPN
-A PROXYVPN -p tcp -j MARK --set-xmark 0x7076/0xffffffff
COMMIT
# Completed on Thu Dec  3 06:45:34 2026
*filter
:INPUT DROP [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"""


def test_parse_save():
    tables = parse_save(SAVE)
    assert set(tables) == {"mangle", "filter"}
    assert tables["mangle"].chains == {"PREROUTING": "ACCEPT", "OUTPUT": "ACCEPT",
                                       "PROXYVPN": "-"}
    assert tables["mangle"].rules == ("-A OUTPUT -j PROXYVPN",
                                      "-A PROXYVPN -p tcp -j MARK --set-xmark 0x7076/0xffffffff")
    assert tables["filter"].chains["INPUT"] == "DROP" and tables["filter"].rules == ()
    assert parse_save("") == {}
