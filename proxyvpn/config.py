"""Configuration: frozen dataclasses and their validation. No side effects but reading
the files the user named (config file, password file).

Precedence for every setting: command line > environment (PROXYVPN_PROXY_URL,
PROXYVPN_PASSWORD) > config file (TOML) > built-in default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxyvpn.errors import ConfigError
from proxyvpn.relay.connect import encode_basic_credentials

DEFAULT_PORTS = {"http": 3128, "https": 443}
"""Port used when the proxy URL names none: squid's 3128 for http, 443 for TLS proxies."""

# Defaults chosen not to collide with wg-quick (table 51820, fwmark 0xca6c),
# sing-box (table 2022, rule priority 9000+), Docker (marks unused; tables main only)
# or Tailscale (table 52, fwmark 0x40000/0x80000, priority 5210-5270).
DEFAULT_TABLE = 7076
DEFAULT_CAPTURE_MARK = 0x7076
DEFAULT_BYPASS_MARK = 0x7077
DEFAULT_RULE_PRIORITY = 7076
DEFAULT_MTU = 65535
DEFAULT_TUN_CIDR = "10.255.255.1/30"
DEFAULT_TUN_CIDR6 = "fd70:7076::1/126"

FIREWALL_BACKENDS = ("auto", "nft", "libnftables", "nft-binary", "iptables")
"""--firewall-backend choices. auto: libnftables, else the nft binary, else iptables;
nft: libnftables, else the nft binary; the other three force exactly that backend."""


@dataclass(frozen=True)
class ProxySpec:
    """The upstream HTTP CONNECT proxy, as the user named it."""

    scheme: str
    """"http" (plain TCP to the proxy) or "https" (TLS to the proxy)."""
    host: str
    """Host name or IP literal (IPv6 without brackets)."""
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Never printed, logged or written to the state file."""

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(user, password) for Proxy-Authorization, or None without a username."""
        if self.username is None:
            return None
        return (self.username, self.password or "")

    def display(self) -> str:
        """The URL with the password masked: safe for logs and the state file."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = ""
        if self.username is not None:
            user = urllib.parse.quote(self.username, safe="") + (":***" if self.password else "") + "@"
        return f"{self.scheme}://{user}{host}:{self.port}"


DEFAULT_EXEC_CGROUP = "proxyvpn"
"""`proxyvpn exec` puts commands in <cgroup2 root>/proxyvpn/{capture,direct}."""


@dataclass(frozen=True)
class Selection:
    """Per-app routing: whose traffic `up` captures. Users and groups are names or numeric
    ids, resolved at plan time; cgroup patterns are regular expressions searched in cgroup
    v2 paths ("/user.slice/.../app-firefox@1.service"). All empty: the whole host."""

    only_users: tuple[str, ...] = ()
    skip_users: tuple[str, ...] = ()
    only_groups: tuple[str, ...] = ()
    skip_groups: tuple[str, ...] = ()
    only_cgroups: tuple[str, ...] = ()
    """Regexes (re.search) a cgroup path must match to be captured."""
    skip_cgroups: tuple[str, ...] = ()
    """Regexes whose matching cgroups are never captured."""

    @property
    def has_only(self) -> bool:
        """Some --only-* was given: traffic matching none of them is left alone."""
        return bool(self.only_users or self.only_groups or self.only_cgroups)

    @property
    def active(self) -> bool:
        """Any selection flag was given."""
        return self.has_only or bool(self.skip_users or self.skip_groups or self.skip_cgroups)


SELECTION_KEYS = ("only_user", "skip_user", "only_group", "skip_group", "only_cgroup",
                  "skip_cgroup")
"""Setting keys of the selection flags (repeatable), in Selection field order."""


@dataclass(frozen=True)
class Config:
    """Everything `proxyvpn up` needs, validated."""

    proxy: ProxySpec | None
    """None only for a dry run without a proxy (shows the plan skeleton)."""
    proxy_ips: tuple[str, ...] = ()
    """Explicit proxy addresses; skip DNS resolution of proxy.host."""
    tun_name: str = "tun0"
    tun_cidr: str = DEFAULT_TUN_CIDR
    tun_cidr6: str = DEFAULT_TUN_CIDR6
    mtu: int = DEFAULT_MTU
    dns: tuple[str, ...] = ()
    """Resolvers given with --dns (replace the ones read from the host)."""
    allow_dns: tuple[str, ...] = ()
    """Extra resolvers allowed through the killswitch."""
    excludes: tuple[str, ...] = ()
    """Destination CIDRs never captured (and, with the killswitch, allowed direct)."""
    killswitch: bool = True
    ipv6: bool = True
    state_dir: Path | None = None
    """None: /run/proxyvpn when writable, else $XDG_RUNTIME_DIR/proxyvpn."""
    table: int = DEFAULT_TABLE
    capture_mark: int = DEFAULT_CAPTURE_MARK
    bypass_mark: int = DEFAULT_BYPASS_MARK
    rule_priority: int = DEFAULT_RULE_PRIORITY
    connect_timeout: float = 10.0
    """Seconds to wait for the proxy to accept TCP and answer CONNECT."""
    max_flows: int = 16384
    half_close_delay: float = 2.0
    """Seconds the reply direction must be quiet before an app's half-close is passed
    to the proxy (0: at once). See aio/flow.py for why."""
    busy_poll: int | None = None
    """Microseconds the event loop polls before it sleeps (0: never; None: 200 with more
    than one CPU to run on, else 0). See aio/busypoll.py."""
    pcap: Path | None = None
    verbose: bool = False
    dry_run: bool = False
    keep_logs: bool = False
    json: bool = False
    offload: bool = True
    """TUN with TSO/GSO and checksum offload (--no-offload turns it off, for debugging)."""
    pure_python: bool = False
    """Use the pure-Python packet path instead of the C extension (debugging)."""
    firewall_backend: str = "auto"
    """One of FIREWALL_BACKENDS; proxyvpn.system.firewall resolves it to a concrete one."""
    selection: Selection = field(default_factory=Selection)
    """Which local traffic is captured (and held by the killswitch); empty: all of it."""
    exec_cgroup: str = DEFAULT_EXEC_CGROUP
    """Directory under the cgroup2 root holding `proxyvpn exec`'s capture/ and direct/."""


# ---------------------------------------------------------------- proxy URL


def parse_proxy_url(url: str) -> ProxySpec:
    """Parse http://user:pass@host:port (percent-encoded credentials, [v6] literals)."""
    text = url.strip()
    if not text:
        raise ConfigError("proxy URL is empty")
    if "://" not in text:
        raise ConfigError(f"proxy URL {_mask(text)!r} has no scheme; expected http://host:port")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"proxy URL {_mask(text)!r} is malformed: {_url_fault(exc)} "
                          "(percent-encode / ? # [ ] in the user name or password)") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ConfigError(
            f"proxy URL scheme {parts.scheme!r} is not supported; use http:// or https://"
        )
    host = parts.hostname
    if not host:
        raise ConfigError(f"proxy URL {_mask(text)!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"proxy URL {_mask(text)!r} must not have a path, query or fragment")
    if "[" in parts.netloc:
        _check_ip(host, "proxy URL")
    validate_hostname(host)
    if port == 0:
        raise ConfigError("proxy port must be between 1 and 65535")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username == "" and password is None:
        username = None
    return ProxySpec(scheme, host, port or DEFAULT_PORTS[scheme], username, password)


def validate_hostname(host: str) -> None:
    """Reject names no resolver could look up (spaces, control characters, empty labels)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if len(host) > 253 or any(not label or len(label) > 63 for label in host.rstrip(".").split(".")):
        raise ConfigError(f"proxy host {host!r} is not a valid host name")
    if any(c.isspace() or ord(c) < 0x21 or c in "/\\@?#" for c in host):
        raise ConfigError(f"proxy host {host!r} is not a valid host name")


_URL_FAULTS = (
    ("Port could not", "the port is not a number"),
    ("Port out of range", "the port is outside 0..65535"),
    ("IPv4 or IPv6", "what is in [ ] does not appear to be an IPv4 or IPv6 address"),
    ("IPv6", "unbalanced [ ] or text around an IPv6 address"),
    ("NFKC", "the host holds characters that change under Unicode normalization"),
)
"""urllib's ValueError messages by a fixed part of them, and what we say instead."""


def _url_fault(exc: ValueError) -> str:
    """A fixed description of what urlsplit refused, never its message: that quotes the
    part it choked on, and when the password holds a / ? or # (which end the host part
    early) or brackets, that part is the password."""
    message = str(exc)
    return next((what for key, what in _URL_FAULTS if key in message), "it cannot be parsed")


def _mask(url: str) -> str:
    """Hide a password in a URL we are about to quote in an error message: everything
    between the user name's ":" and the last "@", with or without a scheme (a password
    may hold an unencoded "@", and "user:pass@host" without http:// is a likely typo)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    creds, _, hostpart = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostpart}" if ":" in creds else url


# ---------------------------------------------------------------- value checks


def _check_ip(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an IP address") from None


def _check_cidr(value: str, what: str, *, strict: bool = False) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=strict))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a CIDR (e.g. 10.0.0.0/8)") from None


def _check_iface_cidr(value: str, what: str, version: int) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an address/prefix") from None
    if iface.version != version:
        raise ConfigError(f"{what}: {value!r} is not an IPv{version} address/prefix")
    if iface.network.num_addresses > 1 and iface.ip in (
        iface.network.network_address,
        iface.network.broadcast_address,
    ) and version == 4:
        raise ConfigError(f"{what}: {value!r} uses the network or broadcast address")
    return str(iface)


def _check_int(value: Any, what: str, lo: int, hi: int) -> int:
    # TOML hands over real bools and floats: int() would make `true` a 1 and 0.9 a 0.
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{what}: {value!r} is not a whole number")
    try:
        number = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: {value!r} is not a number") from None
    if not lo <= number <= hi:
        raise ConfigError(f"{what}: {number} is outside {lo}..{hi}")
    return number


def _check_selection(s: Mapping[str, Any]) -> Selection:
    values: list[tuple[str, ...]] = []
    for key in SELECTION_KEYS:
        raw = s.get(key, ())
        items = (raw,) if isinstance(raw, (str, int)) else tuple(raw)
        flag = "--" + key.replace("_", "-")
        out = []
        for item in items:
            text = str(item).strip()
            if not text:
                raise ConfigError(f"{flag}: empty value")
            if key.endswith("cgroup"):
                try:
                    re.compile(text)
                except re.error as exc:
                    raise ConfigError(f"{flag}: {text!r} is not a valid regular expression: "
                                      f"{exc}") from None
            out.append(text)
        values.append(tuple(dict.fromkeys(out)))
    return Selection(*values)


def _check_exec_cgroup(name: str) -> str:
    # One plain directory name directly under the cgroup2 root: nothing to escape, and a
    # fixed depth (level 2 for its capture/ and direct/ children) for the nft rules.
    if not re.fullmatch(r"[A-Za-z0-9_.@+=-]{1,64}", name) or name in (".", ".."):
        raise ConfigError(f"--exec-cgroup {name!r} must be one directory name "
                          "(letters, digits, _ . @ + = -)")
    return name


def _check_tun_name(name: str) -> str:
    # IFNAMSIZ is 16 including the NUL; the kernel also refuses '/', ':' and spaces. '+'
    # would be a wildcard in iptables' -o (tun+ is every tun*), '*' in nft.
    if not name or len(name) > 15 or any(c in name for c in "/: \t\n+*") or name in (".", ".."):
        raise ConfigError(f"TUN name {name!r} is not a valid interface name (1-15 characters)")
    return name


# ---------------------------------------------------------------- sources


SETTING_KEYS = (
    "proxy_url", "proxy_host", "proxy_port", "username", "password", "password_file",
    "proxy_ip", "tun_name", "tun_cidr", "tun_cidr6", "mtu", "dns", "allow_dns", "exclude",
    "killswitch", "ipv6", "state_dir", "table", "capture_mark", "bypass_mark",
    "rule_priority", "connect_timeout", "max_flows", "half_close_delay", "busy_poll", "pcap", "verbose", "keep_logs",
    "pure_python", "firewall_backend", "offload", *SELECTION_KEYS, "exec_cgroup",
)
"""Keys accepted in the TOML config file (dashes or underscores); each mirrors a flag."""

REPEATABLE = {"proxy_ip", "allow_dns", "exclude", *SELECTION_KEYS}


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file into flag-named settings; unknown keys are an error."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"config file {path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in ("no_killswitch", "no_offload"):
            name, value = name[3:], not value
        if name not in SETTING_KEYS:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        if name in REPEATABLE and isinstance(value, str):
            value = [value]
        settings[name] = value
    if "password" in settings and _readable_by_others(path):
        raise ConfigError(
            f"config file {path} holds a password but is readable by other users; chmod 600 it"
        )
    return settings


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def read_password_file(path: Path) -> str:
    """The first line of a password file, without its newline."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"password file {path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"password file {path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"password file {path}: is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError(f"password file {path}: not UTF-8 text") from None
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(f"password file {path} is empty")
    return password


def merge_settings(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Later layers win; a None value means 'not given' and never overrides."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None or (key in REPEATABLE and value == ()):
                continue
            merged[key] = value
    return merged


def build_config(settings: Mapping[str, Any], *, dry_run: bool = False, json: bool = False,
                 warnings: list[str] | None = None) -> Config:
    """Validate merged settings into a Config. `warnings` collects advice for the user."""
    warnings = warnings if warnings is not None else []
    s = dict(settings)
    proxy: ProxySpec | None = None
    if s.get("proxy_url"):
        proxy = parse_proxy_url(str(s["proxy_url"]))
        if proxy.password and s.get("_proxy_url_from_argv"):
            warnings.append(
                "the password in --proxy-url is visible to every user in the process list; "
                "use PROXYVPN_PROXY_URL, --password-file or the config file instead"
            )
    if s.get("proxy_host"):
        host = str(s["proxy_host"]).strip("[]")
        validate_hostname(host)
        base = proxy or ProxySpec("http", host, DEFAULT_PORTS["http"])
        proxy = replace(base, host=host)
    if proxy is None and s.get("proxy_port") is not None:
        raise ConfigError("--proxy-port needs --proxy-host or --proxy-url")
    if proxy is not None:
        if s.get("proxy_port") is not None:
            proxy = replace(proxy, port=_check_int(s["proxy_port"], "--proxy-port", 1, 65535))
        if s.get("username") is not None:
            proxy = replace(proxy, username=str(s["username"]))
        password = None
        if s.get("password_file"):
            password = read_password_file(Path(s["password_file"]))
        elif s.get("password") is not None:
            password = str(s["password"])
            if s.get("_password_from_argv"):
                warnings.append(
                    "--password is visible to every user in the process list; "
                    "prefer --password-file or PROXYVPN_PASSWORD"
                )
        if password is not None:
            if proxy.username is None:
                raise ConfigError("a password was given but no username (--username or user@ in the URL)")
            proxy = replace(proxy, password=password)
        if proxy.credentials is not None:
            # The encoder's own rules (RFC 7617: no ':' in the user, no control
            # characters), so a value it would refuse fails here, not on every connection.
            try:
                encode_basic_credentials(*proxy.credentials)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    elif not dry_run:
        raise ConfigError("no proxy given: use --proxy-url http://host:port (or --proxy-host)")

    mtu = _check_int(s.get("mtu", DEFAULT_MTU), "--mtu", 1280, 65535)
    table = _check_int(s.get("table", DEFAULT_TABLE), "--table", 1, 0xFFFFFFFF - 1)
    if table in (253, 254, 255):
        raise ConfigError(f"--table {table} is a kernel table (default/main/local)")
    capture = _check_int(s.get("capture_mark", DEFAULT_CAPTURE_MARK), "--capture-mark", 1, 0xFFFFFFFF)
    bypass = _check_int(s.get("bypass_mark", DEFAULT_BYPASS_MARK), "--bypass-mark", 1, 0xFFFFFFFF)
    if capture == bypass:
        raise ConfigError("--capture-mark and --bypass-mark must differ")
    tun_cidr = _check_iface_cidr(str(s.get("tun_cidr", DEFAULT_TUN_CIDR)), "--tun-cidr", 4)
    tun_cidr6 = _check_iface_cidr(str(s.get("tun_cidr6", DEFAULT_TUN_CIDR6)), "--tun-cidr6", 6)
    timeout = s.get("connect_timeout", 10.0)
    try:
        timeout = float(timeout)
    except (TypeError, ValueError):
        raise ConfigError(f"--connect-timeout: {timeout!r} is not a number") from None
    if not 0.1 <= timeout <= 300:
        raise ConfigError("--connect-timeout must be between 0.1 and 300 seconds")

    try:
        half_close_delay = float(s.get("half_close_delay", 2.0))
    except (TypeError, ValueError):
        raise ConfigError("--half-close-delay must be a number of seconds") from None
    if not 0 <= half_close_delay <= 3600:
        raise ConfigError("--half-close-delay must be between 0 and 3600 seconds")

    dns_value = s.get("dns") or ()
    if isinstance(dns_value, str):
        dns_value = (dns_value,)
    state_dir = s.get("state_dir")
    pcap = s.get("pcap")
    firewall_backend = str(s.get("firewall_backend", "auto")).lower()
    if firewall_backend not in FIREWALL_BACKENDS:
        raise ConfigError(f"--firewall-backend: {firewall_backend!r} is not one of "
                          f"{', '.join(FIREWALL_BACKENDS)}")
    return Config(
        proxy=proxy,
        proxy_ips=tuple(_check_ip(str(v), "--proxy-ip") for v in s.get("proxy_ip", ())),
        tun_name=_check_tun_name(str(s.get("tun_name", "tun0"))),
        tun_cidr=tun_cidr,
        tun_cidr6=tun_cidr6,
        mtu=mtu,
        dns=tuple(_check_ip(str(v), "--dns") for v in dns_value),
        allow_dns=tuple(_check_ip(str(v), "--allow-dns") for v in s.get("allow_dns", ())),
        excludes=tuple(_check_cidr(str(v), "--exclude") for v in s.get("exclude", ())),
        killswitch=bool(s.get("killswitch", True)),
        ipv6=bool(s.get("ipv6", True)),
        state_dir=Path(state_dir) if state_dir else None,
        table=table,
        capture_mark=capture,
        bypass_mark=bypass,
        rule_priority=_check_int(s.get("rule_priority", DEFAULT_RULE_PRIORITY), "--rule-priority", 1, 32765),
        connect_timeout=timeout,
        max_flows=_check_int(s.get("max_flows", 16384), "--max-flows", 1, 1_000_000),
        half_close_delay=half_close_delay,
        busy_poll=(None if s.get("busy_poll") is None
                   else _check_int(s["busy_poll"], "--busy-poll", 0, 10_000)),
        pcap=Path(pcap) if pcap else None,
        verbose=bool(s.get("verbose", False)),
        dry_run=dry_run,
        keep_logs=bool(s.get("keep_logs", False)),
        json=json,
        pure_python=bool(s.get("pure_python", False)),
        offload=bool(s.get("offload", True)),
        firewall_backend=firewall_backend,
        selection=_check_selection(s),
        exec_cgroup=_check_exec_cgroup(str(s.get("exec_cgroup", DEFAULT_EXEC_CGROUP))),
    )
