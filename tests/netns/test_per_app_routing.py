"""Per-app routing on a real kernel with a real proxy: by user, by cgroup (picked up live by
the watcher) and `proxyvpn exec`.

`ip netns exec` gives each command a fresh mount namespace with a new /sys and no cgroup
mount, so every command here that needs cgroups mounts cgroup2 at /sys/fs/cgroup inside its
own namespace first (the same hierarchy the host has; the mount is private to it). The
cgroups the tests create are uniquely named, directly under the cgroup2 root, and always
removed.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from nslib import wait_for
from test_killswitch import capture
from topology import PYTHON, REPO, SERVER4

from proxyvpn.system.cgroups import cgroup2_mount

MOUNT = 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"'
CLIENT = ("import socket,sys\n"
          "s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
          "s.close(); print('connected')\n")


def in_cgroup_ns(*cmd: str) -> list[str]:
    return ["sh", "-c", MOUNT, "sh", *cmd]


def connect_argv(port: int) -> list[str]:
    return ["/usr/bin/python3", "-c", CLIENT, SERVER4, str(port)]


def start_vpn(lab, *extra: str):
    """`proxyvpn up` with cgroup2 mounted in its mount namespace; waits for "up:"."""
    lab.start_vpn(argv=in_cgroup_ns(*lab.vpn_argv(*extra)))


def servers(lab, *ports: int) -> None:
    for port in ports:
        lab.start_server(port=port)


def proxied(lab, port: int) -> bool:
    return f"{SERVER4}:{port}" in lab.proxy_log_text()


@contextmanager
def cgroup_base():
    """A unique top-level cgroup directory name; its whole subtree is removed at the end."""
    root = cgroup2_mount()
    assert root, "the host has no cgroup2 mount"
    name = f"pvtest-{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        base = Path(root) / name
        for _ in range(50):
            if not base.exists():
                break
            dirs = sorted((p for p in base.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True)
            for d in [*dirs, base]:
                with suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with suppress(ProcessLookupError):
                            os.kill(int(pid), 9)
                with suppress(OSError):
                    d.rmdir()
            time.sleep(0.1)
        assert not base.exists(), f"could not remove test cgroup {base}"


def test_only_user_selected_proxied_other_direct_and_held_by_killswitch(lab):
    servers(lab, 9001, 9002, 9003, 9004)
    with cgroup_base() as name:
        start_vpn(lab, "--only-user", "nobody", "--exec-cgroup", name)
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        assert "connected" in lab.client.run(*as_nobody, *connect_argv(9001)).stdout
        assert "connected" in lab.client.run(*connect_argv(9002)).stdout  # root: not selected
        wait_for(lambda: proxied(lab, 9001), timeout=5, what="the proxy to log :9001")
        assert not proxied(lab, 9002), "unselected traffic went through the proxy"

        lab.stop_proxy()
        with capture(lab) as packets:
            blocked = lab.client.run(*as_nobody, *connect_argv(9003), check=False)
            direct = lab.client.run(*connect_argv(9004), check=False)
        assert blocked.returncode != 0, "selected traffic connected with the proxy down"
        assert "connected" in direct.stdout, "unselected traffic was blocked"
        assert not [p for p in packets if p[3] == 9003], "selected traffic left directly"
        assert [p for p in packets if p[3] == 9004], "the unselected connection was not seen"
        assert lab.stop_vpn() == 0


CLOSE_EARLY_CLIENT = ("import socket,sys,time\n"
                      "s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
                      "s.sendall(b'x' * 100000); s.close(); print('closed', flush=True)\n"
                      "time.sleep(8)\n")


def test_a_selected_connection_stays_captured_after_its_socket_is_closed(lab):
    """Once the app has closed its socket, the kernel still sends for it (queued data, the
    FIN, the ACK of the peer's FIN from TIME-WAIT), but the packets no longer carry the
    socket's owner, so `meta skuid` cannot select them: the connection's first decision
    must hold (conntrack mark), or they leave directly with the host's own address."""
    lab.start_server(port=9005)
    with cgroup_base() as name:
        start_vpn(lab, "--only-user", "nobody", "--exec-cgroup", name,
                  "--half-close-delay", "0.5")
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        with capture(lab) as packets:
            app = lab.client.popen(*as_nobody, "/usr/bin/python3", "-c", CLOSE_EARLY_CLIENT,
                                   SERVER4, "9005")
            assert app.stdout.readline().strip() == "closed"
            time.sleep(4)  # our FIN reaches the closed socket, which ACKs it from TIME-WAIT
        assert not [p for p in packets if 9005 in (p[2], p[3])], (
            "a packet of the selected connection left directly", packets)
        assert proxied(lab, 9005)
        assert lab.stop_vpn() == 0


def _set_ids(lab, set_name: str) -> set[int]:
    out = lab.client.run("nft", "-j", "list", "set", "inet", "proxyvpn", set_name).stdout
    for item in json.loads(out)["nftables"]:
        if "set" in item:
            return {int(e) for e in item["set"].get("elem", [])}
    return set()


def test_cgroup_created_after_up_is_captured_within_a_second(lab):
    servers(lab, 9011, 9012)
    with cgroup_base() as name:
        start_vpn(lab, "--only-cgroup", f"^/{name}/sel-", "--exec-cgroup", f"{name}x")
        root = cgroup2_mount()
        sel, other = Path(root) / name / "sel-1", Path(root) / name / "other-1"
        other.mkdir(parents=True)
        start = time.monotonic()
        sel.mkdir()
        wait_for(lambda: sel.stat().st_ino in _set_ids(lab, "cg_only_l2"), timeout=1.0,
                 interval=0.02, what="the new cgroup in the nft set")
        elapsed = time.monotonic() - start
        assert elapsed < 1.0
        assert other.stat().st_ino not in _set_ids(lab, "cg_only_l2")

        def run_in(cgroup: Path, port: int):
            rel = "/sys/fs/cgroup/" + str(cgroup.relative_to(root))
            script = f'echo $$ > {rel}/cgroup.procs && exec "$@"'
            return lab.client.run(*in_cgroup_ns("sh", "-c", script, "sh",
                                                *connect_argv(port)), check=False)

        assert "connected" in run_in(sel, 9011).stdout
        assert "connected" in run_in(other, 9012).stdout
        wait_for(lambda: proxied(lab, 9011), timeout=5, what="the proxy to log :9011")
        assert not proxied(lab, 9012), "a cgroup that does not match was captured"

        # Removal takes it out of the set again.
        sel.rmdir()
        wait_for(lambda: not _set_ids(lab, "cg_only_l2"), timeout=1.0, interval=0.02,
                 what="the removed cgroup to leave the set")
        assert lab.stop_vpn() == 0
        assert lab.client.run("nft", "list", "table", "inet", "proxyvpn",
                              check=False).returncode != 0, "the table outlived up"


def test_exec_captures_and_exec_direct_bypasses(lab):
    servers(lab, 9021, 9022)
    with cgroup_base() as name:
        # Whole-host capture with the killswitch, no selection flags: exec still works.
        start_vpn(lab, "--exec-cgroup", name)
        exec_ = [PYTHON, "-m", "proxyvpn", "exec", "--exec-cgroup", name,
                 "--state-dir", str(lab.vpn_state)]
        env = ["env", f"PYTHONPATH={REPO}"]
        captured = lab.client.run(*in_cgroup_ns(*env, *exec_, "--", *connect_argv(9021)),
                                  check=False)
        assert "connected" in captured.stdout, captured.stderr
        direct = lab.client.run(*in_cgroup_ns(*env, *exec_, "--direct", "--",
                                              *connect_argv(9022)), check=False)
        assert "connected" in direct.stdout, direct.stderr
        wait_for(lambda: proxied(lab, 9021), timeout=5, what="the proxy to log :9021")
        assert not proxied(lab, 9022), "exec --direct went through the proxy"
        root = cgroup2_mount()
        assert (Path(root) / name / "capture").is_dir() and (Path(root) / name / "direct").is_dir()
        assert lab.stop_vpn() == 0


def test_plain_up_watches_only_the_root_and_the_exec_subtree(lab):
    # Without --only-cgroup/--skip-cgroup only the exec sets need the watcher: one watch on
    # the cgroup2 root (to see the exec directory appear), then the exec subtree; never
    # every cgroup of the host (which can exhaust fs.inotify.max_user_watches).
    with cgroup_base() as name, cgroup_base() as other:
        root = Path(cgroup2_mount())
        (root / other / "a" / "b").mkdir(parents=True)
        start_vpn(lab, "--exec-cgroup", name)
        assert "cgroup watcher: 1 directories watched" in lab.vpn_log(), lab.vpn_log()
        capture = root / name / "capture"
        capture.mkdir(parents=True)
        wait_for(lambda: capture.stat().st_ino in _set_ids(lab, "exec_capture"), timeout=1.0,
                 interval=0.02, what="the exec cgroup in the nft set")
        direct = root / name / "direct"
        direct.mkdir()
        wait_for(lambda: direct.stat().st_ino in _set_ids(lab, "exec_direct"), timeout=1.0,
                 interval=0.02, what="the direct exec cgroup in the nft set")
        (root / other / "a" / "b" / "c").mkdir()  # outside the scope: no watch, no error
        direct.rmdir()
        wait_for(lambda: not _set_ids(lab, "exec_direct"), timeout=1.0, interval=0.02,
                 what="the removed exec cgroup to leave the set")
        assert capture.stat().st_ino in _set_ids(lab, "exec_capture")
        assert "cgroup watcher:" not in lab.vpn_log().split("directories watched", 1)[1]
        assert lab.stop_vpn() == 0


def test_unanchored_skip_pattern_is_warned_about_at_start(lab):
    with cgroup_base() as name:
        start_vpn(lab, "--skip-cgroup", f"{name}-nothing", "--exec-cgroup", name)
        line = [x for x in lab.vpn_log().splitlines() if "is not anchored with ^" in x]
        assert len(line) == 1 and f"'{name}-nothing'" in line[0], lab.vpn_log()
        assert lab.stop_vpn() == 0


def test_cgroup_with_an_odd_name_before_up_neither_breaks_up_nor_escapes(lab):
    """Any user can name a cgroup in their delegated subtree; one nft could not take in
    the ruleset text (a quote) must not stop `up`, and still lands in its set (the watcher
    names it by file descriptor)."""
    with cgroup_base() as name:
        root = cgroup2_mount()
        odd = Path(root) / name / 'sel-a"b'
        odd.mkdir(parents=True)
        start_vpn(lab, "--only-cgroup", f"^/{name}/sel-", "--exec-cgroup", f"{name}x")
        wait_for(lambda: odd.stat().st_ino in _set_ids(lab, "cg_only_l2"), timeout=1.0,
                 interval=0.02, what="the odd cgroup in the nft set")
        odd.rmdir()
        assert lab.stop_vpn() == 0
