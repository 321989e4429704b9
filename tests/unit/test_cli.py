"""The CLI surface: default subcommand, help, and one clear line for bad input."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from proxyvpn.cli import main

REFERENCE_FLAGS = ["--proxy-url", "--proxy-host", "--proxy-port", "--username", "--password",
                   "--password-file", "--proxy-ip", "--tun-name", "--tun-cidr", "--dns",
                   "--allow-dns", "--no-killswitch", "--state-dir", "--verbose", "--dry-run",
                   "--keep-logs", "--config", "--exclude", "--mtu", "--json"]


@pytest.fixture(autouse=True)
def hardened(monkeypatch):
    """harden_process calls, recorded instead of made: CliRunner runs the CLI inside
    pytest, which should stay dumpable and keep its core limit (test_privileges checks
    the real thing in child processes)."""
    from proxyvpn import privileges

    calls: list[bool] = []
    monkeypatch.setattr(privileges, "harden_process",
                        lambda *, limit_core=True: calls.append(limit_core))
    return calls


def run(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_help_lists_every_reference_flag():
    result = run("up", "--help")
    assert result.exit_code == 0
    for flag in REFERENCE_FLAGS:
        assert flag in result.output, flag


def test_top_level_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("up", "down", "status", "selftest", "demo"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-url", "proxy:3128"], "no scheme"),
        (["up", "--proxy-url", "socks5://p:1"], "not supported"),
        (["--proxy-url", "http://u@p:1", "--password-file", "/nonexistent/pw"], "no such file"),
        (["--proxy-url", "http://p:1", "--mtu", "100"], "--mtu"),
        (["up"], "no proxy given"),
        (["--proxy-url", "http://p:1", "--config", "/nonexistent.toml"], "no such file"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("proxyvpn: error:"), result.output
    assert message in lines[0]
    assert "Traceback" not in result.output


def test_unknown_flag_is_usage_error():
    result = CliRunner().invoke(main, ["up", "--no-such-flag"])
    assert result.exit_code == 2
    assert "No such option" in result.output


def test_env_proxy_url_is_used_and_cli_wins():
    env = {"PROXYVPN_PROXY_URL": "nonsense-from-env"}
    result = CliRunner().invoke(main, ["up"], env=env)
    assert result.exit_code == 2 and "no scheme" in result.output
    result = CliRunner().invoke(main, ["up", "--proxy-url", "socks5://cli:1"], env=env)
    assert "not supported" in result.output


def _fake_host(monkeypatch, *, resolvers=("192.0.2.53",)):
    """Facts without netlink or iptables: the dry run then depends on nothing local."""
    from proxyvpn.plan.facts import HostFacts
    from proxyvpn.system import facts, firewall

    def read_facts(config, **_):
        backend = firewall.resolve(config.firewall_backend)
        return HostFacts(resolvers=resolvers, proxy_ips=("192.0.2.10",),
                         links=frozenset({"lo"}), firewall=backend)

    monkeypatch.setattr(facts, "read_facts", read_facts)
    monkeypatch.setattr(firewall, "available", lambda b: True)


def test_firewall_backend_flag_in_dry_run(monkeypatch):
    _fake_host(monkeypatch)
    result = run("up", "--proxy-url", "http://192.0.2.10:3128", "--dry-run",
                 "--firewall-backend", "iptables")
    assert result.exit_code == 0, result.output
    assert "# firewall backend: iptables" in result.output
    assert "[#] iptables-restore --noflush <<'EOF'" in result.output
    assert "[#] ip6tables-restore --noflush <<'EOF'" in result.output
    result = run("up", "--proxy-url", "http://192.0.2.10:3128", "--dry-run", "--json")
    assert '"firewall": "libnftables"' in result.output
    assert "--firewall-backend" in run("up", "--help").output


def test_firewall_backend_from_config_file(monkeypatch, tmp_path):
    _fake_host(monkeypatch)
    conf = tmp_path / "pv.toml"
    conf.write_text('proxy-url = "http://192.0.2.10:3128"\nfirewall-backend = "nft-binary"\n')
    result = run("up", "--config", str(conf), "--dry-run")
    assert "# firewall backend: nft-binary" in result.output, result.output
    # The flag wins over the file.
    result = run("up", "--config", str(conf), "--dry-run", "--firewall-backend", "iptables")
    assert "# firewall backend: iptables" in result.output


def test_bad_firewall_backend_is_a_usage_error():
    result = CliRunner().invoke(main, ["up", "--proxy-url", "http://p:1",
                                       "--firewall-backend", "pf"])
    assert result.exit_code == 2 and "pf" in result.output


def test_verbose_prints_dns_bypass_and_warns_without_resolver(monkeypatch, caplog):
    # The log goes to the stderr of the first setup_logging(); read the records instead.
    _fake_host(monkeypatch)
    with caplog.at_level("DEBUG", logger="proxyvpn"):
        run("up", "--proxy-url", "http://192.0.2.10:3128", "--dry-run", "--verbose")
    assert "DNS bypass IPs: ['192.0.2.53']" in caplog.text
    caplog.clear()
    _fake_host(monkeypatch, resolvers=("127.0.0.53",))
    with caplog.at_level("INFO", logger="proxyvpn"):
        result = run("up", "--proxy-url", "http://192.0.2.10:3128", "--dry-run")
    assert "warning: killswitch on and no resolver reachable" in caplog.text
    assert "local stub 127.0.0.53" in caplog.text and "--allow-dns" in caplog.text
    assert "# warning: killswitch on and no resolver reachable" in result.output


def test_exec_refuses_when_nothing_runs(tmp_path):
    """A captured exec without a running `up` would talk directly: one line, exit 2,
    and no cgroup is created or entered."""
    result = CliRunner().invoke(main, ["exec", "--state-dir", str(tmp_path / "st"),
                                       "--exec-cgroup", "pvunit-never", "--", "true"])
    assert result.exit_code == 2
    assert "proxyvpn is not running" in result.output and "exec --direct" in result.output
    assert "Traceback" not in result.output


def _running_up(tmp_path, **state):
    """A state directory as a running `up` leaves it: the lock held, the journal written."""
    from proxyvpn.system.state import StateDir

    store = StateDir(tmp_path / "st")
    store.path.mkdir(mode=0o700, exist_ok=True)
    store.acquire()
    store.write({"version": 1, "pid": 1, "applied": [], **state})
    return store


@pytest.mark.parametrize("state, args, message", [
    ({"exec_cgroup": None}, [], "has no exec rules"),
    ({"exec_cgroup": None}, ["--direct"], "has no exec rules"),
    ({"exec_cgroup": "pvunit-a"}, ["--exec-cgroup", "pvunit-b"],
     "uses --exec-cgroup pvunit-a, not pvunit-b"),
])
def test_exec_refuses_an_up_that_would_not_select_it(tmp_path, state, args, message):
    store = _running_up(tmp_path, **state)
    try:
        result = CliRunner().invoke(main, ["exec", "--state-dir", str(store.path), *args,
                                           "--", "true"])
    finally:
        store.release()
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(("args", "limit_core"), [
    (["up", "--dry-run", "--proxy-url", "http://192.0.2.10:3128"], True),
    (["--dry-run", "--proxy-url", "http://192.0.2.10:3128"], True),
    (["status", "--state-dir", "/nonexistent/pv-unit"], True),
    (["exec", "--state-dir", "/nonexistent/pv-unit", "--", "true"], False),
])
def test_every_subcommand_hardens_the_process_first(monkeypatch, hardened, args, limit_core):
    _fake_host(monkeypatch)
    CliRunner().invoke(main, args)
    assert hardened == [limit_core]


def test_help_does_not_harden(hardened):
    assert run("--help").exit_code == 0 and hardened == []
