"""The system layer against a real kernel, inside throwaway network namespaces only.

Every change is made by tests/netns/apply_driver.py (or `nft`) run with `ip netns exec`;
each test compares Netns.snapshot() before and after. State dirs are per-test tmp dirs.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nslib import REPO, Netns, veth

DRIVER = Path(__file__).with_name("apply_driver.py")
PY = sys.executable
PROXY_URL = "http://user:s3cret@192.0.2.10:3128"

sys.path.insert(0, str(REPO / "tests" / "unit"))


# ---------------------------------------------------------------- helpers


def drive(ns: Netns, mode: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the driver to completion inside `ns`."""
    return ns.run(PY, str(DRIVER), mode, *args, check=False, timeout=60, env=env)


class Up:
    """A driver in `apply` mode, holding the plan applied until told to tear down."""

    def __init__(self, ns: Netns, state_dir: Path, *args: str, log: Path) -> None:
        self.log = log
        with open(log, "w") as err:  # the child keeps its own copy of the fd
            self.proc = ns.popen(PY, str(DRIVER), "apply", "--state-dir", str(state_dir),
                                 *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err)
        self.first = self.proc.stdout.readline().strip()

    @property
    def applied(self) -> bool:
        return self.first.startswith("APPLIED ")

    def info(self) -> dict:
        assert self.applied, f"driver failed: {self.first!r}\n{self.log.read_text()}"
        return json.loads(self.first.split(" ", 1)[1])

    def down(self) -> list[str]:
        out, _ = self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0, f"{out}\n{self.log.read_text()}"
        line = out.strip().splitlines()[-1]
        assert line.startswith("DOWN "), out
        return json.loads(line[5:])

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def up(ns: Netns, tmp_path: Path, *args: str, state: str = "state") -> Up:
    return Up(ns, tmp_path / state, "--proxy-url", PROXY_URL, *args,
              log=tmp_path / f"driver-{os.urandom(3).hex()}.log")


def text(ns: Netns, *cmd: str) -> str:
    return ns.run(*cmd).stdout


def probe(ns: Netns, host: str, port: int, timeout: float = 0.5, mark: int = 0) -> str:
    """Connect from inside `ns` (with SO_MARK `mark`): "ok", "refused" (RST) or "timeout"."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(float(sys.argv[3]))\n"
        "m=int(sys.argv[4])\n"
        "m and s.setsockopt(socket.SOL_SOCKET, 36, m)\n"  # SO_MARK
        "try:\n s.connect((sys.argv[1], int(sys.argv[2]))); print('ok')\n"
        "except ConnectionRefusedError: print('refused')\n"
        "except TimeoutError: print('timeout')\n"
        "except OSError as e: print('error', e.errno)\n"
    )
    return ns.run(PY, "-c", code, host, str(port), str(timeout), str(mark)).stdout.strip()


def assert_same(before: dict, after: dict) -> None:
    for key in before:
        assert after[key] == before[key], f"{key} differs:\n--- before\n{before[key]}\n--- after\n{after[key]}"


# ---------------------------------------------------------------- (1) apply + teardown


def test_apply_then_teardown_restores_everything(ns, tmp_path):
    ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1")
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--exclude", "10.9.0.0/16", "--allow-dns", "192.0.2.53")
    info = vpn.info()
    assert info["tun"] == "tun0" and info["fd"] > 2

    assert "7076:\tfrom all fwmark 0x7076 lookup 7076" in text(ns, "ip", "rule")
    assert "7076:\tfrom all fwmark 0x7076 lookup 7076" in text(ns, "ip", "-6", "rule")
    assert text(ns, "ip", "route", "show", "table", "7076").startswith("default dev tun0 ")
    assert text(ns, "ip", "-6", "route", "show", "table", "7076").startswith("default dev tun0 ")
    link = text(ns, "ip", "-d", "link", "show", "tun0")
    assert "mtu 65535" in link and ",UP," in link
    # Not persistent: it lives with our fd. (vnet_hdr is on with TUN offload, off without.)
    assert "tun type tun pi off vnet_hdr " in link and " persist off" in link
    addrs = text(ns, "ip", "addr", "show", "dev", "tun0")
    assert "inet 10.255.255.1/30" in addrs and "inet6 fd70:7076::1/126" in addrs
    assert text(ns, "cat", "/proc/sys/net/ipv4/conf/tun0/rp_filter").strip() == "2"
    table = text(ns, "nft", "list", "table", "inet", "proxyvpn")
    for needle in ("chain capture", "type route hook output priority mangle",
                   "chain killswitch", "meta mark set 0x00007076",
                   "ip daddr @proxy4 tcp dport 3128 accept", "elements = { 192.0.2.10 }",
                   "elements = { 10.9.0.0/16 }", "reject with icmpx admin-prohibited"):
        assert needle in table, needle
    # dns4 also holds the host's own resolvers (resolv.conf is shared with the namespace).
    assert "192.0.2.53" in table.split("set dns4")[1].split("}")[0]

    # The journal: every op recorded in order, no secret, private file.
    state_dir = tmp_path / "state"
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    state_file = state_dir / "state.json"
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    raw = state_file.read_text()
    assert "s3cret" not in raw
    state = json.loads(raw)
    assert state["version"] == 1 and state["pid"] == vpn.proc.pid
    assert state["proxy"] == "http://user:***@192.0.2.10:3128" and state["tun"] == "tun0"
    assert [op["kind"] for op in state["applied"]] == [
        "LoadNftTable", "CreateTun", "SetAddress", "SetAddress", "LinkUp", "SetSysctl",
        "AddRoute", "AddRoute", "AddRule", "AddRule"]
    log = vpn.log.read_text()
    assert "[#] ip rule add fwmark 0x7076 lookup 7076 priority 7076" in log

    assert vpn.down() == []
    assert "[#] ip rule del fwmark 0x7076 lookup 7076 priority 7076" in vpn.log.read_text()
    assert_same(before, ns.snapshot())
    assert not state_file.exists() and not (state_dir / "lock").exists()


def test_keep_logs_retires_the_journal(ns, tmp_path):
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--keep", "--no-killswitch", "--no-ipv6")
    vpn.info()
    assert "chain killswitch" not in text(ns, "nft", "list", "table", "inet", "proxyvpn")
    assert ns.run("ip", "-6", "route", "show", "table", "7076", check=False).stdout == ""
    assert vpn.down() == []
    assert_same(before, ns.snapshot())
    last = json.loads((tmp_path / "state" / "state.last.json").read_text())
    assert len(last["applied"]) == 7
    # A retired journal is history, not changes in place: `down` has nothing to do.
    assert drive(ns, "down", "--state-dir", str(tmp_path / "state")).stdout.strip() == \
        "MSG proxyvpn is not running"


# ---------------------------------------------------------------- (2) crash, fail closed, down


@pytest.fixture
def server():
    """A second namespace holding the proxy address and a destination, both listening."""
    with Netns.create("pvsrv") as created:
        yield created


def listen(srv: Netns, *endpoints: tuple[str, int]) -> None:
    code = (
        "import socket,sys,threading\n"
        "def serve(h,p):\n"
        " s=socket.create_server((h,p))\n"
        " while True: s.accept()[0].close()\n"
        "eps=[a.rsplit(':',1) for a in sys.argv[1:]]\n"
        "[threading.Thread(target=serve,args=(h,int(p))).start() for h,p in eps]\n"
        "print('ready',flush=True)\n"
    )
    proc = srv.popen(PY, "-c", code, *(f"{h}:{p}" for h, p in endpoints))
    assert proc.stdout.readline().strip() == "ready"


def test_kill9_fails_closed_and_down_restores(ns, server, tmp_path):
    for each in (ns, server):
        # Link-local addresses must not finish DAD (adding a route) between snapshots.
        each.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    veth(ns, ["192.0.2.2/24"], server, ["192.0.2.10/24", "192.0.2.20/24"])
    listen(server, ("192.0.2.10", 3128), ("192.0.2.20", 80))
    assert probe(ns, "192.0.2.20", 80) == "ok"
    before = ns.snapshot()

    vpn = up(ns, tmp_path)
    vpn.info()
    # Applied: the proxy is reachable; other TCP is captured into the TUN (nobody serves
    # it here, so the connection hangs instead of reaching the listening server).
    assert probe(ns, "192.0.2.10", 3128) == "ok"
    assert probe(ns, "192.0.2.20", 80) == "timeout"
    # Bypass-marked (relay) sockets are not captured, and may only reach the proxy.
    assert probe(ns, "192.0.2.10", 3128, mark=0x7077) == "ok"
    assert probe(ns, "192.0.2.20", 80, mark=0x7077) == "refused"  # the killswitch's RST

    vpn.kill9()
    # The TUN died with the process, but the killswitch and the rules stay: fail closed.
    assert "tun0" not in text(ns, "ip", "link")
    assert "fwmark 0x7076 lookup 7076" in text(ns, "ip", "rule")
    assert "chain killswitch" in text(ns, "nft", "list", "table", "inet", "proxyvpn")
    # Captured packets now route out of the veth, and killswitch_post drops them there.
    assert probe(ns, "192.0.2.20", 80) == "timeout"
    guard = text(ns, "nft", "list", "chain", "inet", "proxyvpn", "killswitch_post")
    assert "counter packets 0 " not in guard, guard
    assert probe(ns, "192.0.2.20", 80, mark=0x7077) == "refused"
    assert probe(ns, "192.0.2.10", 3128) == "ok"
    assert (tmp_path / "state" / "state.json").exists()

    result = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert result.stdout.strip() == (
        f"MSG cleaned up after a proxyvpn that was not running (pid {vpn.proc.pid})"), result
    assert_same(before, ns.snapshot())
    assert probe(ns, "192.0.2.20", 80) == "ok"
    assert not (tmp_path / "state" / "state.json").exists()
    again = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert again.stdout.strip() == "MSG proxyvpn is not running"


def test_down_after_a_crash_leaves_a_tun_someone_else_made_since(ns, tmp_path):
    """Ours went away with the process; a TUN of the same name now (another VPN took
    tun0 while the killswitch held) is not ours: `down` restores the rest and leaves
    that link, its address and its sysctls alone -- even the address we had used."""
    # Our TUN's rp_filter then has a "previous" value (0) that an undo would write back;
    # with 2 inherited (systemd's default) the undo leaves rp_filter alone anyway.
    ns.run("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0")
    before = ns.snapshot()
    vpn = up(ns, tmp_path)
    vpn.info()
    vpn.kill9()
    assert "tun0" not in text(ns, "ip", "link")
    ns.run("ip", "tuntap", "add", "dev", "tun0", "mode", "tun")
    ns.run("ip", "address", "add", "10.255.255.1/30", "dev", "tun0")
    ns.run("ip", "link", "set", "tun0", "up")
    theirs = "1"  # not the 0 our undo would restore
    ns.run("sysctl", "-qw", f"net.ipv4.conf.tun0.rp_filter={theirs}")
    foreign = text(ns, "ip", "address", "show", "dev", "tun0")

    result = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result
    assert text(ns, "ip", "address", "show", "dev", "tun0") == foreign
    assert text(ns, "cat", "/proc/sys/net/ipv4/conf/tun0/rp_filter").strip() == theirs
    assert "a TUN named tun0 exists, but it is not the one proxyvpn made" in result.stderr, \
        result.stderr
    assert not (tmp_path / "state" / "state.json").exists()
    ns.run("ip", "tuntap", "del", "dev", "tun0", "mode", "tun")
    assert_same(before, ns.snapshot())  # everything else of ours was undone


def test_down_stops_a_live_instance(ns, tmp_path):
    before = ns.snapshot()
    vpn = up(ns, tmp_path)
    vpn.info()
    result = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert result.stdout.strip() == f"MSG stopped proxyvpn (pid {vpn.proc.pid})", result
    out, _ = vpn.proc.communicate(timeout=10)
    assert vpn.proc.returncode == 0 and out.strip().endswith("DOWN []")
    assert_same(before, ns.snapshot())


@pytest.mark.parametrize("record_tun", [True, False], ids=["tun-recorded", "tun-from-CreateTun"])
def test_down_refuses_a_journal_whose_tun_is_another_kind_of_link(ns, tmp_path, record_tun):
    """The journal is the user's to write; one consistent with a "TUN" named like a real
    link would have `down` delete that link. Ours dies with its process, so a link of that
    name that is not a TUN means the journal lies: refused, nothing undone."""
    ns.run("ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p")
    ns.run("ip", "address", "add", "192.0.2.77/24", "dev", "eth9")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal = {"version": 1, "pid": 999999, "tun": "eth9", "applied": [
        {"kind": "CreateTun", "name": "eth9", "mtu": 1500},
        {"kind": "SetAddress", "dev": "eth9", "cidr": "192.0.2.77/24"},
    ]}
    if not record_tun:  # the ops are then checked against their CreateTun's name
        del journal["tun"]
    (state / "state.json").write_text(json.dumps(journal))
    (state / "state.json").chmod(0o600)
    result = ns.run("env", f"PYTHONPATH={REPO}", PY, "-m", "proxyvpn", "down", "--state-dir",
                    str(state), check=False)
    assert result.returncode != 0 and "is a veth link here" in result.stderr, result
    assert "192.0.2.77/24" in text(ns, "ip", "address", "show", "dev", "eth9")
    assert (state / "state.json").exists()


# ---------------------------------------------------------------- (3) failures


def test_tun_name_taken_is_refused_at_plan_time(ns, tmp_path):
    ns.run("ip", "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p")
    before = ns.snapshot()
    vpn = up(ns, tmp_path)
    assert vpn.first.startswith("ERR ConfigError TUN name 'tun0' is already in use"), vpn.first
    assert_same(before, ns.snapshot())


def test_tun_name_taken_is_refused_at_apply_time_and_rolled_back(ns, tmp_path):
    """Even when the plan did not know (a race), open_tun refuses an existing link: the
    nft table applied before it is rolled back."""
    ns.run("ip", "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p")
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--fake-free-links")
    assert vpn.first.startswith(
        "ERR ApplyError failed to apply `ip tuntap add dev tun0 mode tun"), vpn.first
    assert "already exists" in vpn.first
    assert "[#] nft delete table inet proxyvpn" in vpn.log.read_text()
    assert_same(before, ns.snapshot())
    assert not (tmp_path / "state" / "state.json").exists()


def test_failure_midway_rolls_back(ns, tmp_path):
    """The kernel refuses the TUN's IPv6 address (IPv6 disabled on new links) after the
    table, the TUN and its IPv4 address exist: all of it is undone."""
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--fake-ipv6-default-enabled")
    assert vpn.first.startswith(
        "ERR ApplyError failed to apply `ip -6 address add fd70:7076::1/126 dev tun0 nodad`"), \
        vpn.first
    log = vpn.log.read_text()
    assert "[#] ip address del 10.255.255.1/30 dev tun0" in log
    assert "[#] nft delete table inet proxyvpn" in log
    assert_same(before, ns.snapshot())
    assert not (tmp_path / "state" / "state.json").exists()
    # Without the lie, the planner enables IPv6 on the TUN only and the plan applies.
    vpn = up(ns, tmp_path)
    vpn.info()
    assert text(ns, "cat", "/proc/sys/net/ipv6/conf/tun0/disable_ipv6").strip() == "0"
    assert vpn.down() == []
    assert_same(before, ns.snapshot())


def test_preexisting_identical_rule_is_not_ours_to_delete(ns, tmp_path):
    ns.run("ip", "rule", "add", "fwmark", "0x7076", "lookup", "7076", "priority", "7076")
    before = ns.snapshot()
    vpn = up(ns, tmp_path)
    assert vpn.first.startswith("ERR ApplyError failed to apply `ip rule add fwmark 0x7076"), \
        vpn.first
    assert "File exists" in vpn.first
    assert_same(before, ns.snapshot())  # the user's rule survived the rollback


def test_foreign_nft_table_is_never_merged_into_or_deleted(ns, tmp_path):
    ns.run("nft", "add table inet proxyvpn; add chain inet proxyvpn mine")
    before = ns.snapshot()
    vpn = up(ns, tmp_path)
    assert vpn.first.startswith("ERR ApplyError failed to apply `nft -f - (table inet proxyvpn"), \
        vpn.first
    assert "already exists" in vpn.first and "nft delete table inet proxyvpn" in vpn.first
    assert_same(before, ns.snapshot())


# ---------------------------------------------------------------- (4) one instance per state dir


def test_second_instance_refused_and_stale_state_cleaned(ns, tmp_path):
    before = ns.snapshot()
    first = up(ns, tmp_path)
    first.info()
    during = ns.snapshot()
    second = up(ns, tmp_path, "--tun", "pv1", "--table", "100", "--priority", "100")
    assert second.first.startswith(
        f"ERR AlreadyRunningError proxyvpn is already running (pid {first.proc.pid}"), second.first
    assert_same(during, ns.snapshot())

    first.kill9()
    result = drive(ns, "clean", "--state-dir", str(tmp_path / "state"))
    assert result.stdout.strip() == (
        f"MSG cleaned up after a proxyvpn that was not running (pid {first.proc.pid})"), result
    assert_same(before, ns.snapshot())
    assert drive(ns, "clean", "--state-dir", str(tmp_path / "state")).stdout.strip() == "MSG None"


def test_up_after_a_crash_cleans_then_applies(ns, tmp_path):
    before = ns.snapshot()
    first = up(ns, tmp_path)
    first.info()
    first.kill9()
    # The leftover rule and table must neither block the plan nor be duplicated.
    second = up(ns, tmp_path)
    second.info()
    assert text(ns, "ip", "rule").count("fwmark 0x7076") == 1
    assert "not running" in second.log.read_text()  # clean_stale warned
    assert second.down() == []
    assert_same(before, ns.snapshot())


# ---------------------------------------------------------------- (5) dry run as nobody


def _python_for_nobody() -> str | None:
    for candidate in (PY, "/usr/bin/python3"):
        probe_cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     candidate, "-c", "import sys; print(sys.version_info[:2])"]
        done = subprocess.run(probe_cmd, capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    return None


def test_dry_run_as_nobody_changes_nothing(ns):
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter runnable as nobody")
    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    before = ns.snapshot()
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *site])}
    result = ns.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python,
                    "-c", "import os; print(open('/proc/self/status').read())", env=env)
    assert "CapEff:\t0000000000000000" in result.stdout and "Uid:\t65534" in result.stdout
    result = ns.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python,
                    str(DRIVER), "plan", env=env, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[#] nft -f - <<'EOF'" in out
    assert "[#] ip rule add fwmark 0x7076 lookup 7076 priority 7076" in out
    assert "[#] ip tuntap add dev tun0 mode tun" in out
    assert "s3cret" not in out
    assert_same(before, ns.snapshot())


# ---------------------------------------------------------------- rendered nft text


def test_rendered_text_passes_nft_check_and_matches_the_json(ns, tmp_path):
    """For every golden case: `nft -c -f` accepts the dry-run text without changing
    anything, and loading the text gives exactly the table the JSON batch gives."""
    from test_plan import CASES

    from proxyvpn.plan.build import build_plan

    for case, (cfg, facts) in sorted(CASES.items()):
        op = build_plan(cfg, facts).ops[0]
        text_file = tmp_path / f"{case}.nft"
        json_file = tmp_path / f"{case}.json"
        text_file.write_text(op.text)
        json_file.write_text(json.dumps(list(op.ruleset)))

        check = ns.run("nft", "-c", "-f", str(text_file), check=False)
        assert check.returncode == 0, f"{case}: {check.stderr}"
        assert ns.run("nft", "list", "ruleset").stdout == "", case

        ns.run(PY, "-c", (
            "import json,sys; sys.path.insert(0, sys.argv[2]);"
            "from proxyvpn.system import nft;"
            "nft.load(json.load(open(sys.argv[1])));"
            "nft.verify('inet', 'proxyvpn', ['capture'])"), str(json_file), str(REPO))
        from_json = text(ns, "nft", "list", "table", "inet", "proxyvpn")
        ns.run("nft", "delete", "table", "inet", "proxyvpn")
        ns.run("nft", "-f", str(text_file))
        from_text = text(ns, "nft", "list", "table", "inet", "proxyvpn")
        ns.run("nft", "delete", "table", "inet", "proxyvpn")
        assert from_json == from_text, case
        assert ("chain killswitch" in from_json) == cfg.killswitch


def test_nft_binary_fallback(ns, tmp_path):
    """Without the libnftables module the `nft -j -f -` path loads, verifies, deletes."""
    from test_plan import CASES

    from proxyvpn.plan.build import build_plan

    op = build_plan(*CASES["killswitch_on"]).ops[0]
    json_file = tmp_path / "ruleset.json"
    json_file.write_text(json.dumps(list(op.ruleset)))
    result = ns.run(PY, "-c", (
        "import json,sys; sys.path.insert(0, sys.argv[2]);"
        "sys.modules['nftables'] = None;"  # makes `import nftables` fail
        "from proxyvpn.system import nft;"
        "assert nft.backend().name == 'nft', nft.backend().name;"
        "nft.load(json.load(open(sys.argv[1])));"
        "nft.verify('inet', 'proxyvpn', ['capture', 'killswitch', 'killswitch_post']);"
        "print(nft.table_exists('inet', 'proxyvpn'), nft.delete_table('inet', 'proxyvpn'),"
        "      nft.delete_table('inet', 'proxyvpn'), nft.table_exists('inet', 'proxyvpn'))"),
        str(json_file), str(REPO))
    assert result.stdout.split() == ["True", "True", "False", "False"]
    assert ns.run("nft", "list", "ruleset").stdout == ""



# ---------------------------------------------------------------- the iptables backend


def test_iptables_apply_then_teardown_restores_everything(ns, tmp_path):
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--firewall-backend", "iptables", "--exclude", "10.9.0.0/16")
    vpn.info()
    assert "table inet proxyvpn" not in text(ns, "nft", "list", "ruleset")
    save4, save6 = text(ns, "iptables-save"), text(ns, "ip6tables-save")
    for save in (save4, save6):
        for needle in (":PROXYVPN - [0:0]", ":PROXYVPN_POST - [0:0]", "-A OUTPUT -j PROXYVPN",
                       "-A POSTROUTING -j PROXYVPN_POST",
                       "-A PROXYVPN -j MARK --set-xmark 0x7076/0xffffffff",
                       "-A PROXYVPN -p tcp -j REJECT --reject-with tcp-reset"):
            assert needle in save, needle
    assert "-A PROXYVPN -d 10.9.0.0/16 -j RETURN" in save4
    assert "-A PROXYVPN -d 192.0.2.10/32 -p tcp -m tcp --dport 3128 -j RETURN" in save4
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["firewall"] == "iptables"
    assert [op["kind"] for op in state["applied"]][:3] == ["LoadIptables", "LoadIptables",
                                                           "CreateTun"]
    assert "[#] ip6tables-restore --noflush <<'EOF'" in vpn.log.read_text()
    assert vpn.down() == []
    # The tables iptables-nft created for our chains are gone again too.
    assert_same(before, ns.snapshot())


@pytest.mark.parametrize("backend", ["libnftables", "iptables"])
def test_kill9_fails_closed_and_down_restores_per_backend(ns, server, tmp_path, backend):
    for each in (ns, server):
        each.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    veth(ns, ["192.0.2.2/24"], server, ["192.0.2.10/24", "192.0.2.20/24"])
    listen(server, ("192.0.2.10", 3128), ("192.0.2.20", 80))
    # A rule of somebody else's in the same built-in chain must survive everything.
    ns.run("iptables", "-A", "OUTPUT", "-d", "198.51.100.1", "-j", "ACCEPT")
    before = ns.snapshot()

    vpn = up(ns, tmp_path, "--firewall-backend", backend)
    vpn.info()
    assert probe(ns, "192.0.2.10", 3128) == "ok"
    assert probe(ns, "192.0.2.20", 80) == "timeout"  # captured into the TUN
    assert probe(ns, "192.0.2.20", 80, mark=0x7077) == "refused"  # the killswitch's RST
    vpn.kill9()
    assert "tun0" not in text(ns, "ip", "link")
    # Fail closed: the mark and the rule remain, the guard drops what would leave directly.
    assert probe(ns, "192.0.2.20", 80) == "timeout"
    assert probe(ns, "192.0.2.20", 80, mark=0x7077) == "refused"
    assert probe(ns, "192.0.2.10", 3128) == "ok"
    if backend == "iptables":
        guard = text(ns, "iptables", "-t", "mangle", "-v", "-x", "-n", "-L", "PROXYVPN_POST")
        assert int(guard.splitlines()[2].split()[0]) > 0, guard
    result = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert result.stdout.strip().startswith("MSG cleaned up after a proxyvpn"), result
    assert_same(before, ns.snapshot())
    assert probe(ns, "192.0.2.20", 80) == "ok"
    again = drive(ns, "down", "--state-dir", str(tmp_path / "state"))
    assert again.stdout.strip() == "MSG proxyvpn is not running"


def test_foreign_iptables_chain_is_never_merged_into_or_deleted(ns, tmp_path):
    """A PROXYVPN chain that is not ours (here only in ip6tables' filter table): the IPv6
    transaction fails as a whole, the IPv4 one already applied is rolled back."""
    ns.run("ip6tables", "-N", "PROXYVPN")
    ns.run("ip6tables", "-A", "PROXYVPN", "-j", "RETURN")
    before = ns.snapshot()
    vpn = up(ns, tmp_path, "--firewall-backend", "iptables")
    assert vpn.first.startswith("ERR ApplyError failed to apply `ip6tables-restore --noflush"), \
        vpn.first
    assert "already exist" in vpn.first, vpn.first
    assert "[#] iptables-restore --noflush <<'EOF'" in vpn.log.read_text()  # the undo of v4
    assert_same(before, ns.snapshot())
    assert not (tmp_path / "state" / "state.json").exists()


def test_rendered_iptables_documents_load_and_remove_cleanly(ns, tmp_path):
    """Every golden iptables case: iptables-restore accepts the documents, they create
    exactly the chains and jumps the op names, and the removal leaves the ruleset empty."""
    from test_plan import IPT_CASES

    from proxyvpn.plan.build import build_plan
    from proxyvpn.plan.ops import LoadIptables

    before = ns.snapshot()
    for case, (cfg, facts) in sorted(IPT_CASES.items()):
        for op in build_plan(cfg, facts).ops:
            if not isinstance(op, LoadIptables):
                continue
            # new_tables as `up` would plan it in this empty namespace: all of them.
            tables = tuple(sorted({c.split("/")[0] for c in op.chains}))
            code = ("import json,sys; sys.path.insert(0, sys.argv[2]);"
                    "from proxyvpn.system import iptables as i; o=json.load(open(sys.argv[1]));"
                    "i.load(o['family'], o['text'], tuple(o['chains']), tuple(o['jumps']));"
                    "print(i.remove(o['family'], tuple(o['chains']), tuple(o['jumps']),"
                    " tuple(o['tables'])),"
                    " i.remove(o['family'], tuple(o['chains']), tuple(o['jumps'])))")
            spec = tmp_path / f"{case}-{op.family}.json"
            spec.write_text(json.dumps({"family": op.family, "text": op.text, "chains": op.chains,
                                "jumps": op.jumps, "tables": tables}))
            result = ns.run(PY, "-c", code, str(spec), str(REPO))
            assert result.stdout.split() == ["True", "False"], (case, result.stderr)
        assert_same(before, ns.snapshot())



def test_iptables_killswitch_leaves_the_hosts_own_output_rules_in_force(ns, tmp_path):
    """What our chain allows RETURNs to OUTPUT: a host rule after our jump (as ufw or
    firewalld would add) still rejects loopback traffic it wants rejected; with ACCEPT it
    would be skipped."""
    listen(ns, ("127.0.0.1", 7070))
    assert probe(ns, "127.0.0.1", 7070) == "ok"
    ns.run("iptables", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", "7070",
           "-j", "REJECT", "--reject-with", "tcp-reset")
    vpn = up(ns, tmp_path, "--firewall-backend", "iptables")
    vpn.info()
    assert text(ns, "iptables", "-S", "OUTPUT").splitlines()[1] == "-A OUTPUT -j PROXYVPN"
    assert probe(ns, "127.0.0.1", 7070) == "refused"  # the host's rule, not ours, decided
    assert vpn.down() == []
    ns.run("iptables", "-D", "OUTPUT", "-o", "lo", "-p", "tcp", "--dport", "7070",
           "-j", "REJECT", "--reject-with", "tcp-reset")
    assert probe(ns, "127.0.0.1", 7070) == "ok"


@pytest.mark.parametrize("after", ["[#] nft", "[#] ip link set", "up:"])
def test_sigterm_at_any_moment_of_up_rolls_back_cleanly(lab, after):
    """SIGTERM (what `proxyvpn down` and systemd send) while the plan is being applied, or
    just before the engine installed its handler, undoes everything and exits 0 -- it
    must not kill the process with the firewall and routes left in place."""
    import signal
    import time

    from nslib import assert_same_snapshot

    before = lab.client.snapshot()
    vpn = lab.start_vpn(wait=False)
    deadline = time.monotonic() + 20
    while after not in lab.vpn_log() and vpn.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert after in lab.vpn_log(), lab.vpn_log()
    vpn.send_signal(signal.SIGTERM)
    assert vpn.wait(20) in (0, 130), lab.vpn_log()
    assert "Traceback" not in lab.vpn_log(), lab.vpn_log()
    lab.vpn = None
    assert_same_snapshot(before, lab.client.snapshot())
