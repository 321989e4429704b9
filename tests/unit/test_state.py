"""The state directory: lock semantics across processes, atomic journal, directory checks.
No root needed (only files under tmp_path)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxyvpn.errors import AlreadyRunningError, ConfigError, UntrustedStateError
from proxyvpn.system.state import StateDir, resolve_state_dir

REPO = Path(__file__).resolve().parents[2]


def holder(path: Path, name: str = "") -> subprocess.Popen:
    """Another process that takes the lock and waits for a line on stdin (named `name` in
    /proc/PID/comm if given, as privileges.set_process_name does)."""
    code = textwrap.dedent(f"""
        import sys
        if {name!r}:
            open("/proc/self/comm", "w").write({name!r})
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from proxyvpn.system.state import StateDir
        s = StateDir(Path({str(path)!r}))
        s.acquire()
        s.write({{"version": 1, "pid": __import__("os").getpid(), "applied": []}})
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_is_exclusive_between_processes(tmp_path):
    proc = holder(tmp_path)
    try:
        store = StateDir(tmp_path)
        assert store.holder_pid() == proc.pid
        with pytest.raises(AlreadyRunningError) as info:
            store.acquire()
        assert info.value.pid == proc.pid
        assert str(tmp_path) in str(info.value)
    finally:
        proc.stdin.close()
        proc.wait(10)
    # The holder died without cleaning up: the lock is free, the journal is stale.
    store = StateDir(tmp_path)
    assert store.holder_pid() is None
    assert store.read()["pid"] == proc.pid
    store.acquire()
    assert store.holder_pid() == os.getpid()


def test_killed_holder_frees_the_lock(tmp_path):
    proc = holder(tmp_path)
    proc.kill()
    proc.wait(10)
    assert StateDir(tmp_path).holder_pid() is None


def test_write_read_remove(tmp_path):
    store = StateDir(tmp_path)
    store.acquire()
    assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
    store.write({"version": 1, "pid": 1, "applied": [{"kind": "LinkUp", "dev": "x"}]})
    assert stat.S_IMODE(os.stat(store.state_file).st_mode) == 0o600
    assert store.read()["applied"] == [{"kind": "LinkUp", "dev": "x"}]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    store.remove()
    assert not store.state_file.exists() and not store.lock_file.exists()
    assert store.read() is None and store.holder_pid() is None
    store.remove()  # idempotent


def test_keep_retires_the_journal(tmp_path):
    store = StateDir(tmp_path, keep=True)
    store.acquire()
    store.write({"version": 1, "pid": 1, "applied": []})
    store.remove()
    assert store.read() is None
    assert json.loads(store.last_file.read_text())["pid"] == 1


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"version": 99}', "unknown format"),
    ("[]", "unknown format"),
])
def test_bad_journal_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        StateDir(tmp_path).read()


def test_lock_file_replaced_under_us_is_detected(tmp_path, monkeypatch):
    """Between our open() and flock() the previous holder may unlink the lock file (its
    remove()); a lock on that orphan inode guards nothing, so acquire() must retry."""
    import proxyvpn.system.state as state

    real_flock = state.fcntl.flock
    calls = []

    def racing_flock(fd, op):
        if not calls:
            # The previous holder finishes: unlinks the file; the next `up` recreates it.
            (tmp_path / "lock").unlink()
            (tmp_path / "lock").write_text("")
        calls.append(os.fstat(fd).st_ino)
        return real_flock(fd, op)

    (tmp_path / "lock").write_text("")
    monkeypatch.setattr(state.fcntl, "flock", racing_flock)
    store = StateDir(tmp_path)
    store.acquire()
    assert len(calls) == 2 and calls[0] != calls[1]
    assert calls[1] == os.stat(tmp_path / "lock").st_ino
    monkeypatch.setattr(state.fcntl, "flock", real_flock)
    assert store.holder_pid() == os.getpid()


def test_resolve_state_dir_creates_private_dir(tmp_path):
    path = resolve_state_dir(tmp_path / "a" / "proxyvpn")
    assert path.is_dir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_resolve_state_dir_refuses_unsafe_dirs(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        resolve_state_dir(open_dir)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_state_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError):
        resolve_state_dir(tmp_path / "file")


def test_resolve_state_dir_falls_back_to_xdg(tmp_path, monkeypatch):
    import proxyvpn.system.state as state

    blocked = tmp_path / "ro"
    blocked.mkdir(mode=0o500)
    monkeypatch.setattr(state, "DEFAULT_STATE_DIR", blocked / "proxyvpn")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    if os.geteuid() == 0:
        # root ignores the mode bits; a file in the way blocks creation instead.
        monkeypatch.setattr(state, "DEFAULT_STATE_DIR", tmp_path / "file" / "proxyvpn")
        (tmp_path / "file").write_text("")
    assert resolve_state_dir(None) == tmp_path / "proxyvpn"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    with pytest.raises(ConfigError, match="--state-dir"):
        resolve_state_dir(None)


# ---------------------------------------------------------------- who holds the lock


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_held_by_is_the_process_holding_the_lock(tmp_path):
    proc = holder(tmp_path)
    other = sleeper()
    try:
        store = StateDir(tmp_path)
        assert store.held_by(proc.pid)
        assert not store.held_by(other.pid)
        assert not store.held_by(os.getpid())
    finally:
        proc.stdin.close()
        proc.wait(10)
        other.kill()
        other.wait(10)
    assert not StateDir(tmp_path).held_by(proc.pid)  # gone


def test_held_by_falls_back_to_the_name_when_fds_are_unreadable(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    python, named = holder(tmp_path / "a"), holder(tmp_path / "b", name="proxyvpn")

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    try:
        monkeypatch.setattr(os, "listdir", denied)
        assert not StateDir(tmp_path / "a").held_by(python.pid)  # a python, not a proxyvpn
        assert StateDir(tmp_path / "b").held_by(named.pid)  # what confine_up names it
    finally:
        for proc in (python, named):
            proc.stdin.close()
            proc.wait(10)


def test_down_does_not_signal_a_forged_pid(tmp_path):
    from proxyvpn.system.down import bring_down

    proc = holder(tmp_path)
    victim = sleeper()
    try:
        # The directory's owner holds the lock and writes another process's pid in it.
        (tmp_path / "lock").write_text(f"{victim.pid}\n")
        with pytest.raises(UntrustedStateError, match=f"pid {victim.pid} does not hold"):
            bring_down(tmp_path, timeout=1)
        (tmp_path / "lock").write_text(f"{2**40}\n")
        with pytest.raises(UntrustedStateError, match="not a process id"):
            bring_down(tmp_path, timeout=1)
        assert victim.poll() is None and proc.poll() is None
        assert (tmp_path / "state.json").exists()
    finally:
        proc.stdin.close()
        proc.wait(10)
        victim.kill()
        victim.wait(10)


def test_down_stops_the_real_holder(tmp_path):
    from proxyvpn.system.down import bring_down

    proc = holder(tmp_path)
    try:
        assert bring_down(tmp_path, timeout=10) == f"stopped proxyvpn (pid {proc.pid})"
        assert proc.wait(10) == -15  # SIGTERM
        assert not (tmp_path / "state.json").exists()
    finally:
        proc.kill()
        proc.wait(10)
