"""install.sh and the setcap'd launcher, end to end, as an ordinary user.

One install.sh run into a temporary root-owned PREFIX/INSTALL_DIR under /tmp, with a
throwaway group (random name, so that a real `proxyvpn` group on this machine is never
touched) and two throwaway users: a member and an outsider. Everything - the install,
the users, the group, the lab namespaces - is removed afterwards, also on failure.

The .deb is built and, where that cannot clobber anything (no proxyvpn package, file or
group on this machine), installed for real with dpkg -i, exercised with `proxyvpn demo`
(which builds its own namespaces) and purged; see test_deb_package for why.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from nslib import REPO, assert_same_snapshot, wait_for
from topology import PROXY_PORT, ROUTER4_C, SERVER4

from proxyvpn._compiled import COMPILED

NET_ADMIN = 1 << 12
INSTALL_TIMEOUT = 300


def skip_unless_ci(reason: str) -> None:
    """Skip, except in CI (CI=true, a fresh root machine), where every condition below
    holds by construction: there a skip would be counted as a pass and hide a defect."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run this test, but: {reason}")
    pytest.skip(reason)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(argv, **kw)


def _setcap_supported(directory: Path) -> bool:
    probe = directory / "setcap-probe"
    shutil.copy("/bin/true", probe)
    try:
        return _run(["setcap", "cap_net_admin=eip", str(probe)]).returncode == 0 and \
            "cap_net_admin" in _run(["getcap", str(probe)]).stdout
    finally:
        probe.unlink()


@dataclass
class Installed:
    root: Path
    prefix: Path
    launcher: Path
    group: str
    member: str
    outsider: str
    install_output: str


@pytest.fixture(scope="module")
def installed():
    for tool in ("setcap", "getcap", "gcc", "useradd", "groupadd", "userdel", "groupdel", "setpriv"):
        if not shutil.which(tool):
            skip_unless_ci(f"{tool} is not installed")
    root = Path(tempfile.mkdtemp(prefix="pvinst-"))
    os.chmod(root, 0o755)
    tag = secrets.token_hex(3)
    group, member, outsider = f"pvg{tag}", f"pvu{tag}", f"pvo{tag}"
    users: list[str] = []
    prefix, bindir = root / "lib" / "proxyvpn", root / "bin"
    env = {**os.environ, "PREFIX": str(prefix), "INSTALL_DIR": str(bindir), "GROUP": group}
    try:
        if not _setcap_supported(root):
            skip_unless_ci(f"the filesystem of {root} does not support file capabilities")
        result = _run([str(REPO / "install.sh")], env=env, timeout=INSTALL_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        for user, groups in ((member, [group]), (outsider, [])):
            extra = ["-G", ",".join(groups)] if groups else []
            _run(["useradd", "-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", *extra,
                  user], check=True)
            users.append(user)
        yield Installed(root, prefix, bindir / "proxyvpn", group, member, outsider,
                        result.stdout + result.stderr)
    finally:
        for user in users:
            _run(["userdel", user])
        _run([str(REPO / "install.sh"), "uninstall"], env=env, timeout=60)
        with contextlib.suppress(KeyError):
            grp.getgrnam(group)
            _run(["groupdel", group])
        shutil.rmtree(root, ignore_errors=True)


# What packaging/systemd/proxyvpn.service asks systemd for, done by setpriv instead
# (there is no systemd in CI): CapabilityBoundingSet=, AmbientCapabilities=,
# NoNewPrivileges=.
AS_SERVICE = ["--bounding-set=-all,+net_admin", "--inh-caps=-all,+net_admin",
              "--ambient-caps=-all,+net_admin", "--no-new-privs"]


def as_user(user: str, *cmd: str, env: dict[str, str] | None = None,
            service: bool = False) -> list[str]:
    """argv running `cmd` as `user` with its groups and a clean environment.

    `env -i` sits between setpriv and cmd: setpriv keeps root's permitted capabilities
    across its own exec, so the kernel's exec permission check on `cmd` would not be
    the one an ordinary user meets. service=True: started as the systemd unit starts it.
    """
    pairs = [f"{k}={v}" for k, v in {"PATH": "/usr/bin:/bin", **(env or {})}.items()]
    return ["setpriv", f"--reuid={user}", "--regid=nogroup", "--init-groups",
            *(AS_SERVICE if service else []), "env", "-i", *pairs, *cmd]


def status_of(pid: int | str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def all_cmdlines() -> dict[int, bytes]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out[int(entry.name)] = (entry / "cmdline").read_bytes()
    return out


# ---------------------------------------------------------------- the install itself


def test_install_layout_and_capability(installed: Installed):
    st = installed.launcher.stat()
    assert (st.st_mode & 0o7777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == \
        (0o750, 0, installed.group)
    getcap = _run(["getcap", str(installed.launcher)]).stdout.split()
    assert getcap == [str(installed.launcher), "cap_net_admin=eip"]  # and nothing else
    venv = installed.prefix / "venv"
    for path in [venv, *venv.rglob("*")]:
        lst = path.lstat()
        assert lst.st_uid == 0, path
        if not path.is_symlink():
            assert not lst.st_mode & 0o022, path
    assert sorted(p.name for p in (venv / "bin").iterdir()) == ["python", "python3", "python3.11"]
    manifest = (installed.prefix / "install-manifest.txt").read_text()
    assert f"launcher\t{installed.launcher}\t" in manifest
    assert f"group\t{installed.group}" in manifest
    assert f"created group {installed.group}" in installed.install_output


def test_installed_stack_is_the_compiled_build(installed: Installed):
    # The wheel carries the mypyc build of the stack; an install that quietly fell back
    # to the interpreted source would work, only slower, and no other test would notice.
    probe = "import json, proxyvpn._compiled as c; print(json.dumps(c.loaded()))"
    python = installed.prefix / "venv" / "bin" / "python"
    result = _run([str(python), "-I", "-c", probe], env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == dict.fromkeys(COMPILED, True)


def test_outsider_cannot_run_it(installed: Installed):
    denied = _run(as_user(installed.outsider, str(installed.launcher), "--version"))
    assert denied.returncode == 126 and "Permission denied" in denied.stderr, denied
    # Made executable for everyone by mistake, the launcher itself still refuses.
    os.chmod(installed.launcher, 0o755)
    try:
        refused = _run(as_user(installed.outsider, str(installed.launcher), "--version"))
    finally:
        os.chmod(installed.launcher, 0o750)  # chmod keeps the file capability
    assert refused.returncode == 1, refused
    assert f"only members of group {installed.group} may run proxyvpn" in refused.stderr
    assert f"usermod -aG {installed.group}" in refused.stderr
    assert "cap_net_admin=eip" in _run(["getcap", str(installed.launcher)]).stdout


def test_member_runs_it(installed: Installed):
    ok = _run(as_user(installed.member, str(installed.launcher), "--version"))
    assert ok.returncode == 0 and "proxyvpn, version" in ok.stdout, ok


def _install_env(installed: Installed) -> dict[str, str]:
    return {**os.environ, "PREFIX": str(installed.prefix),
            "INSTALL_DIR": str(installed.launcher.parent), "GROUP": installed.group}


def test_install_again_is_idempotent(installed: Installed):
    """A second `sudo ./install.sh` (an upgrade) ends in the same state, and uninstall
    still knows that the first run created the group (test_uninstall_removes_everything)."""
    manifest = installed.prefix / "install-manifest.txt"
    before = manifest.read_text()
    again = _run([str(REPO / "install.sh")], env=_install_env(installed), timeout=INSTALL_TIMEOUT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "created group" not in again.stdout
    assert "which this script did not install" not in again.stdout
    assert manifest.read_text() == before  # same launcher (same sha256), dirs and group
    assert sorted(p.name for p in installed.prefix.iterdir()) == ["install-manifest.txt", "venv"]
    assert not list(installed.launcher.parent.glob(".proxyvpn.new.*"))
    st = installed.launcher.stat()
    assert (st.st_mode & 0o7777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == \
        (0o750, 0, installed.group)
    assert _run(["getcap", str(installed.launcher)]).stdout.split()[1:] == ["cap_net_admin=eip"]
    ok = _run(as_user(installed.member, str(installed.launcher), "--version"))
    assert ok.returncode == 0 and "proxyvpn, version" in ok.stdout, ok


def test_build_only_needs_no_root_and_installs_nothing(installed: Installed):
    """`./install.sh build` as an ordinary user: a launcher and a wheel, nothing else."""
    user = pwd.getpwnam(installed.member)
    top = Path(tempfile.mkdtemp(prefix="pvbuild-"))  # not pytest's tmp_path: that is 0700 root
    try:
        os.chmod(top, 0o755)
        work = top / "build-as-user"
        work.mkdir()
        os.chown(work, user.pw_uid, user.pw_gid)
        prefix, bindir = top / "never" / "lib", top / "never" / "bin"
        env = {"HOME": str(work), "TMPDIR": str(work), "BUILD_DIR": str(work / "out"),
               "PREFIX": str(prefix), "INSTALL_DIR": str(bindir)}
        env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})  # mirrors
        result = _run(as_user(installed.member, str(REPO / "install.sh"), "build", env=env),
                      timeout=INSTALL_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        out = work / "out"
        assert os.access(out / "proxyvpn", os.X_OK)
        assert (out / "proxyvpn").stat().st_uid == user.pw_uid
        assert len(list((out / "wheels").glob("proxyvpn-*.whl"))) == 1
        assert f"PREFIX={prefix}" in (out / "build.env").read_text().splitlines()
        assert _run(["getcap", str(out / "proxyvpn")]).stdout.strip() == ""
        assert not (top / "never").exists()
        assert not list(work.glob("proxyvpn-build.*")), "the temporary build directory was left"
    finally:
        shutil.rmtree(top, ignore_errors=True)


# ---------------------------------------------------------------- up/down as a user


def _evil_kit(workdir: Path, owner: pwd.struct_passwd) -> tuple[dict[str, str], Path]:
    """Environment that would run our code in the privileged process if it were obeyed,
    and the directory where that code leaves marker files."""
    evil = workdir / "evil"
    markers = evil / "markers"
    (evil / "proxyvpn").mkdir(parents=True)
    markers.mkdir()
    write = f"open({str(markers)!r} + '/' + {{!r}}, 'w').close()\n"
    (evil / "sitecustomize.py").write_text(write.format("sitecustomize"))
    (evil / "proxyvpn" / "__init__.py").write_text(write.format("shadow-package"))
    (evil / "proxyvpn" / "__main__.py").write_text(write.format("shadow-main"))
    usersite = evil / "home" / ".local" / "lib" / "python3.11" / "site-packages"
    usersite.mkdir(parents=True)
    (usersite / "usercustomize.py").write_text(write.format("usercustomize"))
    (evil / "evil.c").write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void evil(void) {\n"
        f'  int fd = open("{markers}/ld_preload", O_WRONLY | O_CREAT, 0644);\n'
        "  if (fd >= 0) close(fd);\n}\n")
    _run(["gcc", "-shared", "-fPIC", "-o", str(evil / "evil.so"), str(evil / "evil.c")], check=True)
    for path in [evil, *evil.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    env = {"PYTHONPATH": str(evil), "PYTHONHOME": str(evil), "PYTHONSTARTUP": str(evil / "sitecustomize.py"),
           "PYTHONUSERBASE": str(evil / "home" / ".local"), "HOME": str(evil / "home"),
           "LD_PRELOAD": str(evil / "evil.so"), "LD_LIBRARY_PATH": str(evil)}
    return env, markers


def _start_up(lab, installed: Installed, state: Path, log: Path, *args: str,
              env: dict[str, str] | None = None, service: bool = False) -> subprocess.Popen:
    argv = as_user(installed.member, str(installed.launcher), "up", "--state-dir", str(state),
                   *args, env=env, service=service)
    if os.stat("/dev/net/tun").st_mode & 0o666 != 0o666:
        # Distributions make /dev/net/tun 0666 (udev); some containers leave it 0600, and
        # then no ordinary user can open it, capability or not. Give this process tree a
        # private 0666 node: `ip netns exec` runs it in its own mount namespace, so the
        # host's /dev is not touched.
        argv = ["sh", "-c", "mount -t tmpfs -o mode=0755 pvtest /dev/net && "
                "mknod -m 0666 /dev/net/tun c 10 200 && exec \"$@\"", "sh", *argv]
    with open(log, "w") as fh:
        proc = lab.client.popen(*argv, stdout=fh, stderr=subprocess.STDOUT)

    def ready() -> bool:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            raise AssertionError(f"proxyvpn exited {proc.returncode}:\n{text}")
        return " up: " in text
    wait_for(ready, timeout=30, what="proxyvpn up (as an ordinary user)")
    return proc


def _down(lab, installed: Installed, state: Path, proc: subprocess.Popen,
          service: bool = False) -> None:
    down = lab.client.run(*as_user(installed.member, str(installed.launcher), "down",
                                   "--state-dir", str(state), service=service), check=False)
    assert down.returncode == 0, down.stdout + down.stderr
    assert proc.wait(20) == 0


def _assert_secret_nowhere(password: str, state: Path | None = None) -> None:
    """Not in any process's command line, nor (given `state`) in the state files."""
    secret = password.encode()
    leaks = [p for p, cmd in all_cmdlines().items() if secret in cmd]
    assert not leaks, f"password in the command line of pids {leaks}"
    for path in state.iterdir() if state else ():
        assert secret not in path.read_bytes(), f"password in {path}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group of an `up` a test left running, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def _fetch_through_proxy(lab) -> None:
    result = lab.tool(lab.client, "client", "--host", SERVER4, "--port", "9000",
                      "--up", "20000", "--down", "50000", timeout=30)
    assert json.loads(result.stdout.strip().splitlines()[-1])["ok"] is True
    wait_for(lambda: f"{SERVER4}" in lab.proxy_log_text(), timeout=5,
             what="tinyproxy to log the CONNECT")


def test_user_up_down_through_proxy(installed: Installed, lab):
    user = pwd.getpwnam(installed.member)
    password = "pv-secret-" + secrets.token_hex(8)
    lab.start_tinyproxy(auth=("alice", password))
    lab.start_server()
    state = lab.workdir / "user-state"
    state.mkdir(mode=0o700)
    os.chown(state, user.pw_uid, user.pw_gid)
    evil_env, markers = _evil_kit(lab.workdir, user)

    # Positive controls: the kit works when it is obeyed, so its silence below means
    # the launcher scrubbed it, not that it is broken.
    control = _run(as_user(installed.member, "/usr/bin/python3", "-c", "pass",
                           env={"PYTHONPATH": evil_env["PYTHONPATH"],
                                "LD_PRELOAD": evil_env["LD_PRELOAD"]}))
    assert control.returncode == 0, control
    assert {p.name for p in markers.iterdir()} == {"sitecustomize", "ld_preload"}
    for marker in markers.iterdir():
        marker.unlink()

    before = lab.client.snapshot()
    url = f"http://alice@{ROUTER4_C}:{PROXY_PORT}"
    log1 = lab.workdir / "user-up-1.log"
    proc = _start_up(lab, installed, state, log1, "--proxy-url", url, "--verbose",
                     env={**evil_env, "PROXYVPN_PASSWORD": password})
    try:
        pid = json.loads((state / "state.json").read_text())["pid"]
        status = status_of(pid)
        assert status["Uid"].split()[0] == str(user.pw_uid)
        assert int(status["CapEff"], 16) == NET_ADMIN, status["CapEff"]
        assert int(status["CapPrm"], 16) == NET_ADMIN, status["CapPrm"]
        assert int(status["CapAmb"], 16) == NET_ADMIN, status["CapAmb"]
        assert status["NoNewPrivs"] == "1"
        # Capabilities belong to threads: every one of them, not only the main thread.
        for task in Path(f"/proc/{pid}/task").iterdir():
            task_status = status_of(f"{pid}/task/{task.name}")
            assert int(task_status["CapEff"], 16) == NET_ADMIN, (task.name, task_status["CapEff"])
            assert int(task_status["CapPrm"], 16) == NET_ADMIN, (task.name, task_status["CapPrm"])
        # `up` confined itself (proxyvpn.privileges.confine_up): named, argv redacted.
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "proxyvpn"
        assert Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"proxyvpn up --state-dir ")
        exe = os.readlink(f"/proc/{pid}/exe")
        assert exe.startswith("/usr/bin/python3"), exe
        # The user's other processes lack CAP_NET_ADMIN, so ptrace rules keep them out of
        # its environment (PROXYVPN_PASSWORD) and memory, although the uid is the same.
        peek = _run(as_user(installed.member, "cat", f"/proc/{pid}/environ"))
        assert peek.returncode != 0 and "Permission denied" in peek.stderr, peek

        _fetch_through_proxy(lab)

        assert not list(markers.iterdir()), "the evil environment reached the process"
        _assert_secret_nowhere(password, state)
        _down(lab, installed, state, proc)
    finally:
        _stop(proc)
    assert password not in log1.read_text(errors="replace")
    assert " up: " in log1.read_text() and "down:" in log1.read_text()
    assert_same_snapshot(before, lab.client.snapshot())

    # The same with --password-file (a file the user owns, 0600).
    pwfile = lab.workdir / "user-password"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    os.chown(pwfile, user.pw_uid, user.pw_gid)
    log2 = lab.workdir / "user-up-2.log"
    proc = _start_up(lab, installed, state, log2, "--proxy-url", url,
                     "--password-file", str(pwfile), "--verbose")
    try:
        _fetch_through_proxy(lab)
        _assert_secret_nowhere(password, state)
        _down(lab, installed, state, proc)
    finally:
        _stop(proc)
    assert password not in log2.read_text(errors="replace")
    assert_same_snapshot(before, lab.client.snapshot())


def test_started_like_the_systemd_unit(installed: Installed, lab):
    """The unit's way: CAP_NET_ADMIN handed over (ambient, the only one in the bounding
    set) under NoNewPrivileges, settings from a config file, the password from a
    credential file; ExecStopPost's `down` restores everything."""
    user = pwd.getpwnam(installed.member)
    password = "pv-unit-secret-" + secrets.token_hex(8)
    lab.start_tinyproxy(auth=("alice", password))
    lab.start_server()
    state = lab.workdir / "unit-state"  # RuntimeDirectory=proxyvpn, owned by the service user
    state.mkdir(mode=0o700)
    os.chown(state, user.pw_uid, user.pw_gid)
    config = lab.workdir / "proxyvpn.toml"  # /etc/proxyvpn/proxyvpn.toml, 0644 root
    config.write_text(f'proxy-url = "http://alice@{ROUTER4_C}:{PROXY_PORT}"\n')
    config.chmod(0o644)
    creds = lab.workdir / "credentials"  # $CREDENTIALS_DIRECTORY: 0500, file 0400, the user's
    creds.mkdir(mode=0o500)
    (creds / "password").write_text(password + "\n")
    (creds / "password").chmod(0o400)
    for path in (creds, creds / "password"):
        os.chown(path, user.pw_uid, user.pw_gid)

    before = lab.client.snapshot()
    log = lab.workdir / "unit-up.log"
    proc = _start_up(lab, installed, state, log, "--config", str(config),
                     "--password-file", str(creds / "password"), service=True)
    try:
        pid = json.loads((state / "state.json").read_text())["pid"]
        status = status_of(pid)
        for key in ("CapEff", "CapPrm", "CapBnd"):
            assert int(status[key], 16) == NET_ADMIN, (key, status[key])
        assert status["NoNewPrivs"] == "1"
        _fetch_through_proxy(lab)
        _assert_secret_nowhere(password)
        _down(lab, installed, state, proc, service=True)
    finally:
        _stop(proc)
    assert password not in log.read_text(errors="replace")
    assert_same_snapshot(before, lab.client.snapshot())


# ---------------------------------------------------------------- uninstall


def test_exec_hands_no_capability_to_the_command(installed: Installed):
    """`proxyvpn exec` through the setcap'd launcher: the command runs in the exec cgroup,
    holds no capability at all (the launcher drops CAP_NET_ADMIN for exec) and gets the
    caller's environment (an app needs HOME, DISPLAY, ...), which up never does."""
    from proxyvpn.system.cgroups import cgroup2_mount

    root = cgroup2_mount()
    assert root, "cgroup v2 is not mounted"
    name = f"pvexec-{secrets.token_hex(3)}"
    base = Path(root) / name
    base.mkdir()
    try:
        # Delegate the subtree to the member (as systemd does for user@.service): it may
        # then create cgroups below and move its own processes between them.
        uid = pwd.getpwnam(installed.member).pw_uid
        for path in (base, base / "cgroup.procs", base / "cgroup.subtree_control"):
            os.chown(path, uid, -1)
        probe = ("grep -E '^Cap(Inh|Prm|Eff|Amb)' /proc/self/status; cat /proc/self/cgroup; "
                 "echo \"probe=$PROBE_VAR home=$HOME\"")
        argv = ["sh", "-c", f'echo $$ > {base}/cgroup.procs && exec "$@"', "sh",
                *as_user(installed.member, str(installed.launcher), "exec", "--direct",
                         "--exec-cgroup", name, "--", "sh", "-c", probe,
                         env={"PROBE_VAR": "kept", "HOME": "/tmp/pvhome"})]
        result = _run(argv)
        assert result.returncode == 0, result.stdout + result.stderr
        caps = dict(line.split(":\t") for line in result.stdout.splitlines() if "Cap" in line)
        assert caps and all(int(v, 16) == 0 for v in caps.values()), caps
        assert f"0::/{name}/direct" in result.stdout, result.stdout
        assert "probe=kept home=/tmp/pvhome" in result.stdout, result.stdout
    finally:
        for leaf in ("direct", "capture"):
            with contextlib.suppress(OSError):
                (base / leaf).rmdir()
        base.rmdir()


def test_uninstall_removes_everything(installed: Installed):
    # The users go first: a group with members is kept (and said so), by design.
    for user in (installed.member, installed.outsider):
        _run(["userdel", user], check=True)
    env = {**os.environ, "PREFIX": str(installed.prefix), "GROUP": installed.group}
    result = _run([str(REPO / "install.sh"), "uninstall"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed group {installed.group}" in result.stdout
    assert not installed.launcher.exists()
    assert list(installed.root.iterdir()) == [], list(installed.root.rglob("*"))
    with pytest.raises(KeyError):
        grp.getgrnam(installed.group)
    again = _run([str(REPO / "install.sh"), "uninstall"], env=env)
    assert again.returncode == 0 and "nothing to uninstall" in again.stdout


# ---------------------------------------------------------------- the Debian package


def _dpkg_installed(name: str) -> bool:
    out = _run(["dpkg-query", "-W", "-f=${Status}", name]).stdout
    return "installed" in out and "not-installed" not in out


def test_deb_package(tmp_path: Path):
    """Build the .deb; install, run and purge it for real when that is harmless.

    Installing into the real system is the only way to run the maintainer scripts as
    dpkg runs them (dpkg --root/--instdir chroot into the target and would need a whole
    Debian there). It is done only when nothing of proxyvpn exists on this machine (no
    package, no /usr/bin/proxyvpn, no /usr/lib/proxyvpn, no group proxyvpn), so the
    purge that follows restores exactly the state before; set PROXYVPN_TEST_NO_DPKG=1
    to stop after inspecting the archive.
    """
    for tool in ("dpkg-deb", "dpkg", "setcap"):
        if not shutil.which(tool):
            skip_unless_ci(f"{tool} is not installed (not a Debian system)")
    build = _run([str(REPO / "packaging" / "debian" / "build-deb.sh"), str(tmp_path)],
                 timeout=INSTALL_TIMEOUT)
    assert build.returncode == 0, build.stdout + build.stderr
    deb = Path(build.stdout.strip().splitlines()[-1])
    listing = _run(["dpkg-deb", "-c", str(deb)], check=True).stdout
    launcher_line = next(line for line in listing.splitlines() if line.endswith(" ./usr/bin/proxyvpn"))
    assert launcher_line.startswith("-rwxr-x--- root/root"), launcher_line
    assert "./usr/lib/proxyvpn/venv/lib/python3.11/site-packages/proxyvpn/__main__.py" in listing
    assert "./lib/systemd/system/proxyvpn.service" in listing
    assert "/bin/pip" not in listing

    if os.environ.get("PROXYVPN_TEST_NO_DPKG") == "1":
        pytest.skip("PROXYVPN_TEST_NO_DPKG=1: not installing the .deb")  # asked for by hand
    reasons = []
    if _dpkg_installed("proxyvpn"):
        reasons.append("a proxyvpn package is installed")
    for path in ("/usr/bin/proxyvpn", "/usr/lib/proxyvpn"):
        if os.path.lexists(path):
            reasons.append(f"{path} exists")
    with contextlib.suppress(KeyError):
        grp.getgrnam("proxyvpn")
        reasons.append("group proxyvpn exists")
    if reasons:
        skip_unless_ci("not installing the .deb into this system: " + ", ".join(reasons))

    try:
        result = _run(["dpkg", "-i", str(deb)], timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        st = os.stat("/usr/bin/proxyvpn")
        assert (st.st_mode & 0o7777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == \
            (0o750, 0, "proxyvpn")
        assert _run(["getcap", "/usr/bin/proxyvpn"]).stdout.split()[1:] == ["cap_net_admin=eip"]
        assert "root proxyvpn 750 /usr/bin/proxyvpn" in _run(["dpkg-statoverride", "--list"]).stdout
        if shutil.which("systemd-analyze"):
            verify = _run(["systemd-analyze", "verify", "/lib/systemd/system/proxyvpn.service"])
            assert verify.returncode == 0, verify.stdout + verify.stderr
        # Root through the launcher: the demo builds (and removes) its own namespaces.
        demo = _run(["/usr/bin/proxyvpn", "demo"], timeout=120)
        assert demo.returncode == 0 and "demo OK" in demo.stdout, demo.stdout + demo.stderr
    finally:
        purge = _run(["dpkg", "--purge", "proxyvpn"], timeout=120)
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert not _dpkg_installed("proxyvpn")
    for path in ("/usr/bin/proxyvpn", "/usr/lib/proxyvpn", "/lib/systemd/system/proxyvpn.service",
                 "/usr/share/doc/proxyvpn"):
        assert not os.path.lexists(path), f"{path} left behind"
    with pytest.raises(KeyError):
        grp.getgrnam("proxyvpn")
    assert "/usr/bin/proxyvpn" not in _run(["dpkg-statoverride", "--list"]).stdout

