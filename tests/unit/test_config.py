"""Proxy URL and configuration parsing: good and bad inputs, and precedence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxyvpn.config import (
    DEFAULT_TUN_CIDR,
    Config,
    ProxySpec,
    build_config,
    load_config_file,
    merge_settings,
    parse_proxy_url,
    read_password_file,
)
from proxyvpn.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy:8080", ProxySpec("http", "proxy", 8080)),
        ("http://proxy", ProxySpec("http", "proxy", 3128)),
        ("https://proxy.example.com", ProxySpec("https", "proxy.example.com", 443)),
        ("HTTP://Proxy:1", ProxySpec("http", "proxy", 1)),
        ("http://alice:secret@192.0.2.10:8080", ProxySpec("http", "192.0.2.10", 8080, "alice", "secret")),
        ("http://al%40ice:p%3Ass%2Fw%25@h:3", ProxySpec("http", "h", 3, "al@ice", "p:ss/w%")),
        ("http://alice@h:3", ProxySpec("http", "h", 3, "alice", None)),
        ("http://alice:@h:3", ProxySpec("http", "h", 3, "alice", "")),
        ("http://[2001:db8::1]:3128", ProxySpec("http", "2001:db8::1", 3128)),
        ("http://u:p@[::1]", ProxySpec("http", "::1", 3128, "u", "p")),
        ("http://proxy:8080/", ProxySpec("http", "proxy", 8080)),
    ],
)
def test_parse_proxy_url_good(url, expected):
    assert parse_proxy_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("proxy:3128", "no scheme"),
        ("socks5://proxy:1080", "not supported"),
        ("ftp://proxy", "not supported"),
        ("http://", "no host"),
        ("http://:3128", "no host"),
        ("http://proxy:99999", "malformed"),
        ("http://proxy:abc", "malformed"),
        ("http://proxy:0", "between 1 and 65535"),
        ("http://proxy:3128/path", "path"),
        ("http://proxy:3128?x=1", "path"),
        ("http://[not-an-ip]:3128", "does not appear to be an IPv4 or IPv6"),
        ("http://bad host:3128", "not a valid host"),
        ("http://a..b:3128", "not a valid host"),
    ],
)
def test_parse_proxy_url_bad(url, message):
    with pytest.raises(ConfigError, match=message):
        parse_proxy_url(url)


def test_error_never_shows_password():
    with pytest.raises(ConfigError) as info:
        parse_proxy_url("http://alice:topsecret@proxy:badport")
    assert "topsecret" not in str(info.value)


PASSWORD_HEAD, PASSWORD_TAIL = "Sekr1tHead", "Tail9Sekr1t"
"""Both halves of a password split by a special character: neither may show in an error
(the part before a / ? # is what urllib quotes when it fails on the "port")."""


@pytest.mark.parametrize("special", ["?", "/", "#", "@", ":", "[", "]", "%", " ", "?/#@:", "1/"])
@pytest.mark.parametrize("template", [
    "http://alice:{pw}@proxy.example:3128",   # the auditor's case with ?, / or #
    "http://alice:{pw}@proxy.example:99999",  # a port out of range
    "http://alice:{pw}@proxy.example:abc",    # a port that is no number
    "http://alice:{pw}@proxy.example:3128/x",  # a path
    "http://alice:{pw}@pro xy:3128",          # a bad host
    "http://alice:{pw}@[not-an-ip]:3128",     # a bad IPv6 literal
    "http://alice:{pw}@",                     # no host
    "alice:{pw}@proxy.example:3128",          # no scheme
    "socks5://alice:{pw}@proxy.example:1080",  # unsupported scheme
    " http://alice:{pw}@proxy.example:3128 ",
])
def test_no_url_error_shows_any_part_of_the_password(template, special):
    password = f"{PASSWORD_HEAD}{special}{PASSWORD_TAIL}"
    url = template.format(pw=password)
    try:
        spec = parse_proxy_url(url)
    except ConfigError as exc:
        message = str(exc)
        assert PASSWORD_HEAD not in message and PASSWORD_TAIL not in message, message
        assert "\n" not in message
    else:  # only a password urllib splits correctly may parse
        assert spec.password == password


def test_auditor_url_says_what_is_wrong_without_the_password():
    with pytest.raises(ConfigError) as info:
        parse_proxy_url("http://alice:hunter2?x@proxy.example:3128")
    message = str(info.value)
    assert "hunter2" not in message
    assert "alice:***@proxy.example:3128" in message and "port is not a number" in message
    assert "percent-encode" in message


def test_display_masks_password_and_repr_hides_it():
    spec = parse_proxy_url("http://alice:topsecret@[::1]:3128")
    assert spec.display() == "http://alice:***@[::1]:3128"
    assert "topsecret" not in repr(spec)
    assert "topsecret" not in repr(build_config({"proxy_url": "http://alice:topsecret@h"}))


def test_defaults():
    config = build_config({"proxy_url": "http://h"})
    assert isinstance(config, Config)
    assert config.tun_name == "tun0" and config.tun_cidr == DEFAULT_TUN_CIDR
    assert config.killswitch and config.ipv6 and config.mtu == 65535
    assert config.busy_poll is None  # aio.busypoll.window_seconds picks it per machine


def test_separate_host_port_user_password_file(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\nignored\n")
    config = build_config({"proxy_host": "proxy.example.com", "proxy_port": 8080,
                           "username": "bob", "password_file": str(secret)})
    assert config.proxy == ProxySpec("http", "proxy.example.com", 8080, "bob", "hunter2")


def test_password_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_password_file(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_password_file(empty)
    with pytest.raises(ConfigError, match="is a directory"):
        read_password_file(tmp_path)


def test_password_without_user_is_an_error():
    with pytest.raises(ConfigError, match="no username"):
        build_config({"proxy_url": "http://h", "password": "x"})


def test_password_on_argv_warns():
    warnings: list[str] = []
    build_config({"proxy_url": "http://u@h", "password": "x", "_password_from_argv": True},
                 warnings=warnings)
    assert any("process list" in w for w in warnings)
    warnings.clear()
    build_config({"proxy_url": "http://u:p@h", "_proxy_url_from_argv": True}, warnings=warnings)
    assert any("process list" in w for w in warnings)
    warnings.clear()
    build_config({"proxy_url": "http://u:p@h"}, warnings=warnings)  # from env/file: fine
    assert warnings == []


def test_no_proxy_is_an_error_unless_dry_run():
    with pytest.raises(ConfigError, match="no proxy"):
        build_config({})
    assert build_config({}, dry_run=True).proxy is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mtu": 500}, "--mtu"),
        ({"mtu": "big"}, "not a number"),
        ({"tun_name": "x" * 16}, "not a valid interface name"),
        ({"tun_name": "a/b"}, "not a valid interface name"),
        ({"tun_cidr": "10.0.0.0/30"}, "network or broadcast"),
        ({"tun_cidr": "fd00::1/64"}, "not an IPv4"),
        ({"tun_cidr6": "10.0.0.1/30"}, "not an IPv6"),
        ({"proxy_ip": ["nope"]}, "not an IP"),
        ({"dns": "1.2.3"}, "not an IP"),
        ({"allow_dns": ["x"]}, "not an IP"),
        ({"exclude": ["10.0.0.0/33"]}, "not a CIDR"),
        ({"table": 254}, "kernel table"),
        ({"capture_mark": "0x10", "bypass_mark": 16}, "must differ"),
        ({"connect_timeout": 0}, "between"),
        ({"proxy_port": 70000}, "outside"),
        ({"busy_poll": -1}, "--busy-poll"),
        ({"busy_poll": 10_001}, "--busy-poll"),
        ({"busy_poll": "fast"}, "--busy-poll"),
        ({"busy_poll": True}, "whole number"),
        ({"busy_poll": 0.9}, "whole number"),
        ({"max_flows": 100.5}, "whole number"),
        # What the Proxy-Authorization encoder refuses fails at start-up (RFC 7617 §2).
        ({"username": "us:er", "password": "pw"}, "must not contain ':'"),
        ({"username": "user", "password": "pa\tss"}, "control characters"),
        ({"username": "user", "password": "pa\nss"}, "control characters"),
    ],
)
def test_bad_values(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"proxy_url": "http://h", **settings})


def test_hex_marks_and_lists():
    config = build_config({"proxy_url": "http://h", "capture_mark": "0x100", "bypass_mark": "512",
                           "exclude": ["10.1.2.3/8"], "allow_dns": ["1.1.1.1", "2606:4700::1111"]})
    assert config.capture_mark == 0x100 and config.bypass_mark == 512
    assert config.excludes == ("10.0.0.0/8",)
    assert config.allow_dns == ("1.1.1.1", "2606:4700::1111")


def test_config_file_and_precedence(tmp_path):
    path = tmp_path / "proxyvpn.toml"
    path.write_text('proxy-url = "http://file-proxy:1"\ntun-name = "filetun"\nmtu = 9000\n'
                    'allow-dns = "9.9.9.9"\nno-killswitch = true\n')
    file_settings = load_config_file(path)
    assert file_settings["killswitch"] is False and file_settings["allow_dns"] == ["9.9.9.9"]
    # CLI (or env, resolved by click into the same layer) wins over the file; None = not given.
    cli = {"proxy_url": "http://cli-proxy:2", "tun_name": None, "mtu": None}
    config = build_config(merge_settings(file_settings, cli))
    assert config.proxy.host == "cli-proxy"
    assert config.tun_name == "filetun" and config.mtu == 9000 and not config.killswitch


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config_file(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("proxy-url = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config_file(unknown)


def test_config_file_with_password_must_be_private(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('proxy-url = "http://u@h"\npassword = "x"\n')
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_config_file(path)
    os.chmod(path, 0o600)
    assert load_config_file(Path(path))["password"] == "x"
