"""The CLI surface: default subcommand, help, and one clear line for bad input."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from proxyvpn.cli import main

REFERENCE_FLAGS = ["--proxy-url", "--proxy-host", "--proxy-port", "--username", "--password",
                   "--password-file", "--proxy-ip", "--tun-name", "--tun-cidr", "--dns",
                   "--allow-dns", "--no-killswitch", "--state-dir", "--verbose", "--dry-run",
                   "--keep-logs", "--config", "--exclude", "--mtu", "--json"]


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
