"""Network namespaces for integration tests: create, run inside, snapshot, always remove.

Nothing here touches the root namespace except creating/deleting the namespaces and the
veth pairs whose both ends are immediately moved into them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, timeout=timeout, text=True,
                          capture_output=True, **kw)


@dataclass
class Netns:
    """One network namespace with loopback up. Use as a context manager or call delete()."""

    name: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str = "pv") -> Netns:
        name = f"{prefix}-{secrets.token_hex(3)}"
        _run(["ip", "netns", "add", name])
        ns = cls(name)
        # No duplicate address detection for the link-local addresses of its links: on a
        # veth nobody else can hold them, and DAD would hold each one tentative ~1 s.
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait for it."""
        try:
            return _run(self.argv(*cmd), check=check, timeout=timeout, **kw)
        except subprocess.CalledProcessError as exc:
            raise AssertionError(
                f"in {self.name}: {shlex.join(cmd)} exited {exc.returncode}\n"
                f"stdout: {exc.stdout}\nstderr: {exc.stderr}"
            ) from None

    def sh(self, script: str, **kw) -> subprocess.CompletedProcess:
        return self.run("sh", "-c", script, **kw)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        """Start a background process inside the namespace; killed on delete()."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.argv(*cmd), start_new_session=True, text=True, **kw)
        self.procs.append(proc)
        return proc

    def snapshot(self) -> dict[str, str]:
        """Everything proxyvpn may change, as text, for before/after comparisons."""
        def out(*cmd: str) -> str:
            return self.run(*cmd, check=False).stdout
        sysctls = {}
        for key in ("net/ipv4/conf/all/rp_filter", "net/ipv4/conf/all/src_valid_mark",
                    "net/ipv4/conf/default/rp_filter", "net/ipv4/ip_forward"):
            sysctls[key] = self.run("cat", f"/proc/sys/{key}", check=False).stdout.strip()
        return {
            "rules4": out("ip", "rule", "show"),
            "rules6": out("ip", "-6", "rule", "show"),
            "routes4": out("ip", "route", "show", "table", "all"),
            "routes6": out("ip", "-6", "route", "show", "table", "all"),
            "links": "\n".join(
                line.split("@")[0] for line in out("ip", "-o", "link", "show").splitlines()
                for line in [line.split(":")[1].strip()]
            ),
            "nft": out("nft", "list", "ruleset"),
            "iptables": _iptables_save(out("iptables-save")),
            "ip6tables": _iptables_save(out("ip6tables-save")),
            "sysctls": repr(sorted(sysctls.items())),
        }

    def kill_procs(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()

    def delete(self) -> None:
        self.kill_procs()
        # Any process still inside (e.g. started by a test without popen) must die, or the
        # namespace lingers as long as it lives.
        pids = _run(["ip", "netns", "pids", self.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _run(["ip", "netns", "del", self.name], check=False)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _iptables_save(text: str) -> str:
    """iptables-save output without what changes by itself: the timestamp comments and
    the packet/byte counters of the built-in chains."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines)


def veth(a: Netns, a_addrs: Sequence[str], b: Netns, b_addrs: Sequence[str]) -> tuple[str, str]:
    """Link two namespaces with a veth pair and address both ends; returns the names."""
    tag = secrets.token_hex(3)
    a_if, b_if = f"va{tag}", f"vb{tag}"
    # Create the pair inside `a` directly so nothing ever appears in the root namespace.
    a.run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    for ns, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
        for addr in addrs:
            extra = ["nodad"] if ":" in addr else []
            ns.run("ip", "addr", "add", addr, "dev", ifname, *extra)
        ns.run("ip", "link", "set", ifname, "up")
    # IPv6 link-local addresses arrive asynchronously (carrier, then DAD); tests that
    # snapshot the namespace must see it settled, or they blame proxyvpn for the change.
    for ns, ifname in ((a, a_if), (b, b_if)):
        wait_for(lambda ns=ns, ifname=ifname: "fe80" in ns.run(
            "ip", "-6", "route", "show", "table", "local", "dev", ifname).stdout
            and not ns.run("ip", "-6", "addr", "show", "dev", ifname, "tentative").stdout.strip(),
            timeout=10, what=f"{ifname} link-local address")
    return a_if, b_if


@contextlib.contextmanager
def namespaces(*prefixes: str) -> Iterator[list[Netns]]:
    """Create several namespaces; all are removed on exit, even on failure."""
    created: list[Netns] = []
    try:
        for prefix in prefixes:
            created.append(Netns.create(prefix))
        yield created
    finally:
        for ns in reversed(created):
            ns.delete()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value or raises AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def is_root() -> bool:
    return os.geteuid() == 0


def assert_same_snapshot(before: dict[str, str], after: dict[str, str]) -> None:
    """Fail with a unified diff of every part of the snapshot that changed."""
    import difflib

    diffs = []
    for key in before:
        if before[key] != after.get(key):
            diffs.append("".join(difflib.unified_diff(
                before[key].splitlines(True), after.get(key, "").splitlines(True),
                f"{key} before", f"{key} after")))
    assert not diffs, "host state changed:\n" + "\n".join(diffs)
