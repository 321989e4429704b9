"""Bad input: one clear line, a non-zero exit, and the host exactly as it was."""

from __future__ import annotations

import pytest
from nslib import assert_same_snapshot
from topology import PROXY_PORT, ROUTER4_C


def assert_one_line_error(result, message: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("proxyvpn: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proxy-url", "http//broken"], "no scheme"),
        (["--proxy-url", f"http://u@{ROUTER4_C}:{PROXY_PORT}", "--password-file", "/nope/pw"],
         "no such file"),
        (["--proxy-url", "http://no-such-host.invalid:3128"], "does not resolve"),
        (["--proxy-url", f"http://{ROUTER4_C}:9"], "unreachable"),
        (["--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}", "--tun-name", "lo"], "already in use"),
    ],
)
def test_bad_input_leaves_host_unchanged(lab, args, message):
    before = lab.client.snapshot()
    state = lab.workdir / "state"
    result = lab.proxyvpn("up", "--state-dir", str(state), "--connect-timeout", "2", *args)
    assert_one_line_error(result, message)
    assert_same_snapshot(before, lab.client.snapshot())


def test_second_up_is_refused_and_changes_nothing(lab):
    lab.start_vpn()
    before = lab.client.snapshot()
    result = lab.proxyvpn("up", "--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}",
                          "--state-dir", str(lab.vpn_state))
    assert_one_line_error(result, "already running")
    assert_same_snapshot(before, lab.client.snapshot())
    assert lab.vpn.poll() is None  # the first one is unharmed


def test_up_then_down_restores_everything(lab):
    before = lab.client.snapshot()
    lab.start_vpn()
    during = lab.client.snapshot()
    assert during != before and "proxyvpn" in during["nft"]
    result = lab.proxyvpn("down", "--state-dir", str(lab.vpn_state))
    assert result.returncode == 0, result.stderr
    assert lab.vpn.wait(15) == 0
    assert_same_snapshot(before, lab.client.snapshot())
    again = lab.proxyvpn("down", "--state-dir", str(lab.vpn_state))
    assert again.returncode == 0 and "not running" in again.stdout


def test_dry_run_as_unprivileged_user_changes_nothing(lab):
    before = lab.client.snapshot()
    result = lab.proxyvpn("up", "--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}", "--dry-run",
                          user="65534")
    assert result.returncode == 0, result.stderr
    assert "ip rule add" in result.stdout and "nft" in result.stdout
    json_result = lab.proxyvpn("up", "--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}",
                               "--dry-run", "--json", user="65534")
    assert json_result.returncode == 0 and json_result.stdout.lstrip().startswith("{")
    assert_same_snapshot(before, lab.client.snapshot())


def test_up_without_privileges_is_one_line(lab):
    before = lab.client.snapshot()
    result = lab.proxyvpn("up", "--proxy-url", f"http://{ROUTER4_C}:{PROXY_PORT}",
                          "--state-dir", str(lab.workdir / "st"), user="65534")
    assert_one_line_error(result, "CAP_NET_ADMIN")
    assert_same_snapshot(before, lab.client.snapshot())
