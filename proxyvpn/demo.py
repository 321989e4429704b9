"""`proxyvpn demo`: the whole product in throwaway network namespaces.

client (runs `proxyvpn up`) -- proxy (built-in CONNECT proxy) -- server (HTTP server).
Never touches the host's own namespace; removes everything on exit, Ctrl+C included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click

from proxyvpn.errors import PrivilegeError, ProxyVpnError

CLIENT, PROXY_C, PROXY_S, SERVER = "10.99.1.2", "10.99.1.1", "10.99.2.1", "10.99.2.2"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def say(text: str) -> None:
    click.secho(text, bold=True)


@contextlib.contextmanager
def _namespaces(names: list[str]) -> Iterator[None]:
    created: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        yield
    finally:
        for name in reversed(created):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _wait_port(ns: str, host: str, port: int, timeout: float = 10) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + timeout
    while subprocess.run(_in(ns, sys.executable, "-c", probe), capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise ProxyVpnError(f"demo: {host}:{port} did not come up")
        time.sleep(0.1)


def run(*, keep: bool = False, verbose: bool = False) -> int:
    """Run the demo; returns the exit status (0 when everything behaved)."""
    if os.geteuid() != 0:
        raise PrivilegeError("the demo creates network namespaces: run it as root (sudo proxyvpn demo)")
    tag = secrets.token_hex(2)
    client, proxy, server = f"pvdemo-c-{tag}", f"pvdemo-p-{tag}", f"pvdemo-s-{tag}"
    workdir = Path(tempfile.mkdtemp(prefix="proxyvpn-demo-"))
    procs: list[subprocess.Popen] = []
    # SIGTERM/SIGHUP unwind like Ctrl+C so the finally blocks run.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ok = True
    try:
        with _namespaces([client, proxy, server]):
            say(f"1. namespaces {client}, {proxy}, {server} (the host's network is untouched)")
            _ip("-n", client, "link", "add", "c0", "type", "veth", "peer", "name", "p0",
                "netns", proxy)
            _ip("-n", proxy, "link", "add", "p1", "type", "veth", "peer", "name", "s0",
                "netns", server)
            for ns, dev, addr in ((client, "c0", CLIENT), (proxy, "p0", PROXY_C),
                                  (proxy, "p1", PROXY_S), (server, "s0", SERVER)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", client, "route", "add", "default", "via", PROXY_C)
            _ip("-n", server, "route", "add", "default", "via", PROXY_S)
            subprocess.run(_in(proxy, "sysctl", "-qw", "net.ipv4.ip_forward=1"), check=True)

            say("2. built-in CONNECT proxy on 10.99.1.1:3128, HTTP server on 10.99.2.2:8080")
            (workdir / "index.html").write_text("hello from the server namespace\n")
            proxy_log = workdir / "proxy.log"
            procs.append(subprocess.Popen(
                _in(proxy, sys.executable, "-m", "proxyvpn.relay.miniproxy", "--listen",
                    f"{PROXY_C}:3128", "--log", str(proxy_log)),
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                _in(server, sys.executable, "-m", "http.server", "8080", "--bind", SERVER,
                    "--directory", str(workdir)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_port(proxy, PROXY_C, 3128)
            _wait_port(server, SERVER, 8080)

            say("3. proxyvpn up in the client namespace")
            state = workdir / "state"
            vpn_log = workdir / "proxyvpn.log"
            with open(vpn_log, "w") as log_fh:
                vpn = subprocess.Popen(
                    _in(client, sys.executable, "-m", "proxyvpn", "up", "--proxy-url",
                        f"http://{PROXY_C}:3128", "--state-dir", str(state),
                        *(["--verbose"] if verbose else [])),
                    env=env, stdout=log_fh, stderr=subprocess.STDOUT)
            procs.append(vpn)
            deadline = time.monotonic() + 20
            while "up:" not in vpn_log.read_text():
                if vpn.poll() is not None or time.monotonic() > deadline:
                    raise ProxyVpnError("demo: proxyvpn did not come up:\n" + vpn_log.read_text())
                time.sleep(0.1)
            click.echo(_indent(_applied_ops(vpn_log.read_text())))

            say("4. the client fetches http://10.99.2.2:8080/ (captured, relayed by the proxy)")
            fetch = subprocess.run(
                _in(client, sys.executable, "-c",
                    "import urllib.request;print(urllib.request.urlopen("
                    f"'http://{SERVER}:8080/index.html', timeout=10).read().decode(), end='')"),
                capture_output=True, text=True)
            ok &= fetch.returncode == 0 and "hello" in fetch.stdout
            click.echo(_indent(fetch.stdout or fetch.stderr))
            # The proxy logs a tunnel when it ends; give it a moment.
            deadline = time.monotonic() + 3
            while f"{SERVER}:8080" not in proxy_log.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            seen = [line for line in proxy_log.read_text().splitlines() if f"{SERVER}:8080" in line]
            ok &= bool(seen)
            click.echo(_indent("proxy log: " + (seen[-1] if seen else "(no tunnel logged!)")))

            say("5. a socket that escapes capture (bypass mark) and UDP try to go direct")
            escape = subprocess.run(_in(client, sys.executable, "-c", _ESCAPE), capture_output=True,
                                    text=True)
            blocked = escape.returncode == 0
            ok &= blocked
            click.echo(_indent(escape.stdout + escape.stderr))

            if keep:
                click.echo(f"   look around: ip netns exec {client} bash   (Ctrl+C also cleans up)")
                click.prompt("Press Enter to bring proxyvpn down and remove the namespaces",
                             default="", show_default=False)
            say("6. proxyvpn down")
            vpn.send_signal(signal.SIGTERM)
            vpn.wait(20)
            click.echo(_indent(vpn_log.read_text().splitlines()[-1]))
        say("7. removed the namespaces: " + ("demo OK" if ok else "demo FAILED"))
        return 0 if ok else 1
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns ^C at a prompt into Abort
        say("interrupted: namespaces removed")
        return 130
    finally:
        for proc in procs:  # proxyvpn first gets SIGTERM so it tears down like a user's Ctrl+C
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


_ESCAPE = f"""
import socket
s = socket.socket(); s.settimeout(3)
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x7077)
try:
    s.connect(("{SERVER}", 8080)); print("direct TCP: CONNECTED (leak!)"); raise SystemExit(1)
except OSError as e:
    print("direct TCP: blocked by the killswitch (" + (e.strerror or str(e)) + ")")
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", ("{SERVER}", 9999)); print("direct UDP: sent (leak!)"); raise SystemExit(1)
except OSError as e:
    print("direct UDP: blocked by the killswitch (" + (e.strerror or str(e)) + ")")
"""


def _applied_ops(log_text: str) -> str:
    """The `[#] command` lines of the log, the nft ruleset heredoc folded to one line."""
    lines, in_heredoc = [], False
    for line in log_text.splitlines():
        if in_heredoc:
            in_heredoc = line.strip() != "EOF"
            continue
        if "[#]" in line or " up: " in line:
            lines.append(line)
            in_heredoc = "<<" in line
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.rstrip().splitlines())
