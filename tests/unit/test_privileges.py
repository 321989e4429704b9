"""proxyvpn.privileges and the launcher, as far as they can be tested without a setcap'd
install (that is tests/netns/test_install.py). A few tests need root to drop
capabilities; they run in child processes so that pytest itself keeps its own."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from proxyvpn import privileges
from proxyvpn.errors import PrivilegeError

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (capabilities to drop)")

STATUS = """Name:\tpython3
Umask:\t0022
Uid:\t1000\t1000\t1000\t1000
CapInh:\t0000000000001000
CapPrm:\t0000000000001000
CapEff:\t0000000000001000
CapBnd:\t000001ffffffffff
CapAmb:\t0000000000001000
NoNewPrivs:\t1
Seccomp:\t0
"""


# As root, a child without any capability: uid 0 stays (so the repo stays readable), but
# an empty bounding set means its exec grants nothing, as for an ordinary user.
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


def run_child(code: str, *args: str, caps: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run Python code in a child (with this repo importable); returns the result.

    caps=False: the child holds no capability at all, whoever runs the tests (CI is root).
    """
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    env.pop(privileges.LAUNCHER_ENV, None)
    argv = [sys.executable, "-c", textwrap.dedent(code), *args]
    if not caps and ROOT:
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop capabilities"
        argv = NO_CAPS + argv
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)


# ---------------------------------------------------------------- reading capabilities


def test_parse_status():
    state = privileges.parse_status(STATUS)
    assert state == privileges.CapState(inheritable=0x1000, permitted=0x1000, effective=0x1000,
                                        bounding=0x1FFFFFFFFFF, ambient=0x1000, no_new_privs=True)
    assert state.net_admin_only and state.has_net_admin


def test_parse_status_without_ambient_line_and_nothing_held():
    text = "CapInh:\t0\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t1fffffffff\n"
    state = privileges.parse_status(text)
    assert state.ambient == 0 and not state.no_new_privs
    assert not state.has_net_admin and not state.net_admin_only


def test_parse_status_rejects_text_without_capabilities():
    with pytest.raises(ValueError, match="CapEff"):
        privileges.parse_status("Name:\tx\nCapInh:\t0\nCapPrm:\t0\nCapBnd:\t0\n")


def test_read_caps_of_this_process_matches_proc():
    state = privileges.read_caps()
    text = Path("/proc/self/status").read_text()
    eff = next(line for line in text.splitlines() if line.startswith("CapEff:"))
    assert state.effective == int(eff.split()[1], 16)


def test_format_caps():
    assert privileges.format_caps(privileges.NET_ADMIN) == "cap_net_admin"
    assert privileges.format_caps((1 << 13) | (1 << 12)) == "cap_net_admin,cap_net_raw"
    assert privileges.format_caps(0) == "none"


# ---------------------------------------------------------------- the message


def test_missing_cap_message_names_the_launcher(monkeypatch):
    monkeypatch.setenv(privileges.LAUNCHER_ENV, "/usr/local/bin/proxyvpn")
    assert privileges.missing_cap_message() == (
        "CAP_NET_ADMIN is missing: run `sudo setcap cap_net_admin=eip /usr/local/bin/proxyvpn` "
        "or use sudo")


def test_missing_cap_message_ignores_a_python_script_on_path(monkeypatch, tmp_path):
    """pip's console script is a Python script: a file capability on it would be ignored."""
    script = tmp_path / "proxyvpn"
    script.write_text("#!/usr/bin/python3\nimport proxyvpn\n")
    script.chmod(0o755)
    monkeypatch.delenv(privileges.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert privileges.launcher_path() is None
    assert "/path/to/proxyvpn` or use sudo" in privileges.missing_cap_message()


def test_missing_cap_message_finds_a_compiled_launcher_on_path(monkeypatch, tmp_path):
    binary = tmp_path / "proxyvpn"
    shutil.copy("/bin/true", binary)
    monkeypatch.delenv(privileges.LAUNCHER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert privileges.launcher_path() == str(binary)


def test_ensure_net_admin_raises_one_line(monkeypatch):
    monkeypatch.setenv(privileges.LAUNCHER_ENV, "/opt/bin/proxyvpn")
    monkeypatch.setattr(privileges, "read_caps",
                        lambda *a: privileges.parse_status(STATUS.replace("0000000000001000", "0")))
    with pytest.raises(PrivilegeError) as info:
        privileges.ensure_net_admin()
    assert str(info.value) == ("CAP_NET_ADMIN is missing: run `sudo setcap cap_net_admin=eip "
                               "/opt/bin/proxyvpn` or use sudo")
    assert info.value.exit_code == 77


def test_ensure_net_admin_passes_with_the_capability(monkeypatch):
    monkeypatch.setattr(privileges, "read_caps", lambda *a: privileges.parse_status(STATUS))
    privileges.ensure_net_admin()


# ---------------------------------------------------------------- dropping


def test_drop_without_the_capability_is_a_privilege_error():
    result = run_child("""
        from proxyvpn import privileges
        from proxyvpn.errors import PrivilegeError
        held = privileges.read_caps()
        print("held:", hex(held.effective | held.permitted | held.ambient))
        try:
            privileges.drop_to_net_admin()
            print("dropped")
        except PrivilegeError as exc:
            print("refused:", exc)
    """, caps=False)
    assert result.returncode == 0, result.stderr
    # The premise first: the child really holds nothing (else the refusal proves nothing).
    assert result.stdout.splitlines()[0] == "held: 0x0", result.stdout
    assert result.stdout.splitlines()[1] == (
        "refused: CAP_NET_ADMIN is missing: run `sudo setcap cap_net_admin=eip "
        "/path/to/proxyvpn` or use sudo"), result.stdout


def test_up_without_the_capability_says_so_in_one_line(tmp_path):
    """The whole command, as a user without CAP_NET_ADMIN meets it: one line, exit 77, and
    nothing created (the check comes before the state directory)."""
    state = tmp_path / "state"
    result = run_child("from proxyvpn.cli import main; main()", "up", "--proxy-url",
                       "http://127.0.0.1:9", "--state-dir", str(state), caps=False)
    assert result.returncode == 77, result.stdout + result.stderr
    assert result.stderr == ("proxyvpn: error: CAP_NET_ADMIN is missing: run `sudo setcap "
                             "cap_net_admin=eip /path/to/proxyvpn` or use sudo\n")
    assert not state.exists()


@needs_root
def test_drop_as_root_keeps_only_net_admin_for_us_and_children():
    result = run_child("""
        import json, os, subprocess, tempfile
        from proxyvpn import privileges
        d = tempfile.mkdtemp(); os.chown(d, 65534, 65534); os.chmod(d, 0o700)
        state = privileges.drop_to_net_admin()
        child = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True,
                               preexec_fn=privileges.child_preexec).stdout
        # CAP_DAC_OVERRIDE is gone: root cannot enter another user's private directory.
        try:
            os.listdir(d); dac = "kept"
        except PermissionError:
            dac = "dropped"
        finally:
            os.rmdir(d)  # the parent (/tmp) is ours: removing the entry needs no capability
        print(json.dumps({"self": state.__dict__, "child": privileges.parse_status(child).__dict__,
                          "dac": dac}))
    """)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for who in ("self", "child"):
        state = privileges.CapState(**out[who])
        assert state.net_admin_only, (who, state)
        assert state.bounding == privileges.NET_ADMIN, (who, hex(state.bounding))
        assert state.no_new_privs, who
    assert out["dac"] == "dropped"


@needs_root
def test_drop_refuses_when_a_thread_already_runs():
    result = run_child("""
        import threading, time
        from proxyvpn import privileges
        from proxyvpn.errors import PrivilegeError
        stop = threading.Event()
        t = threading.Thread(target=stop.wait, daemon=True); t.start()
        try:
            privileges.drop_to_net_admin()
            print("dropped")
        except PrivilegeError as exc:
            print("refused:", exc)
        stop.set()
    """)
    assert "refused: thread" in result.stdout and "before threads start" in result.stdout, \
        result.stdout + result.stderr


@needs_root
def test_confine_up_as_root():
    """What `up` calls first: capabilities, environment and process title, in a child."""
    result = run_child("""
        import json, os, subprocess, sys
        from proxyvpn import privileges
        privileges.confine_up(sys.argv[1:])
        child = subprocess.run(["sh", "-c", "cat /proc/self/status; env"], capture_output=True,
                               text=True).stdout
        print(json.dumps({
            "comm": open("/proc/self/comm").read().strip(),
            "cmdline": open("/proc/self/cmdline", "rb").read().rstrip(bytes(1)).decode(),
            "env": sorted(k for k in os.environ if k.startswith("PROXYVPN_")),
            "child_status": child, "self": privileges.read_caps().__dict__}))
    """, "up", "--password", "hunter2-secret", "--proxy-url", "http://al:pw-in-url@h:1",
        env={"PROXYVPN_PASSWORD": "env-secret", "PROXYVPN_PROXY_URL": "http://u:env-url-secret@h:1",
             "PROXYVPN_PURE": "1"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["comm"] == "proxyvpn"
    assert out["cmdline"] == "proxyvpn up --password '***' --proxy-url 'http://al:***@h:1'"
    assert out["env"] == ["PROXYVPN_PURE"]
    for secret in ("hunter2-secret", "pw-in-url", "env-secret", "env-url-secret"):
        assert secret not in result.stdout
    for state in (privileges.CapState(**out["self"]), privileges.parse_status(out["child_status"])):
        assert state.net_admin_only and state.bounding == privileges.NET_ADMIN, state


@pytest.mark.parametrize(("argv", "expected"), [
    (["up", "--password", "s3cret", "-v"], ["up", "--password", "***", "-v"]),
    (["--password=s3cret"], ["--password=***"]),
    (["--password"], ["--password"]),
    (["--proxy-url", "http://alice:s3cret@proxy:3128"], ["--proxy-url", "http://alice:***@proxy:3128"]),
    (["--proxy-url=https://a:b@c@[2001:db8::1]:443"], ["--proxy-url=https://a:***@[2001:db8::1]:443"]),
    (["--proxy-url", "http://alice@proxy:3128", "--proxy-ip", "2001:db8::1"],
     ["--proxy-url", "http://alice@proxy:3128", "--proxy-ip", "2001:db8::1"]),
    (["--proxy-url", "http://[2001:db8::1]:3128"], ["--proxy-url", "http://[2001:db8::1]:3128"]),
    (["--password-file", "/etc/proxyvpn/password"], ["--password-file", "/etc/proxyvpn/password"]),
])
def test_redact_argv(argv, expected):
    assert privileges.redact_argv(argv) == expected


# ---------------------------------------------------------------- process hygiene


def test_child_preexec_sets_parent_death_signal():
    result = subprocess.run(
        [sys.executable, "-c", "import prctl; print(prctl.get_pdeathsig())"],
        preexec_fn=privileges.child_preexec, capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "15", result.stderr


def test_set_process_name_and_title_hide_argv_secrets():
    code = ("from proxyvpn import privileges\n"
            "privileges.set_process_name('proxyvpn', title='proxyvpn up')\n"
            "print(open('/proc/self/comm').read().strip())\n"
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(bytes(1)).decode())\n")
    result = subprocess.run([sys.executable, "-c", code, "--password", "hunter2-very-secret"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    comm, cmdline = result.stdout.splitlines()
    assert comm == "proxyvpn"
    assert cmdline == "proxyvpn up"


def test_scrub_environ(monkeypatch):
    monkeypatch.setenv("PROXYVPN_PASSWORD", "x")
    monkeypatch.setenv("PROXYVPN_PROXY_URL", "http://u:p@h:1")
    monkeypatch.setenv("PROXYVPN_KEEP", "y")
    privileges.scrub_environ()
    assert "PROXYVPN_PASSWORD" not in os.environ and "PROXYVPN_PROXY_URL" not in os.environ
    assert os.environ["PROXYVPN_KEEP"] == "y"


# ---------------------------------------------------------------- the launcher (C)


def _compile_launcher(out: Path, venv: Path, launcher_path: str = "/opt/pv/bin/proxyvpn") -> Path:
    python = venv / "bin" / "python3"
    pyver, stdlib = f"{sys.version_info[0]}.{sys.version_info[1]}", sysconfig.get_path("stdlib")
    if python.exists():  # the venv's interpreter may not be the one running pytest
        pyver, stdlib = subprocess.run(
            [str(python), "-c", "import sys, sysconfig; print(f'{sys.version_info[0]}."
             "{sys.version_info[1]}', sysconfig.get_path('stdlib'))"],
            capture_output=True, text=True, check=True).stdout.split()
    defines = {
        "PROXYVPN_VENV": str(venv),
        "PROXYVPN_PYTHON": str(venv / "bin" / "python3"),
        "PROXYVPN_PACKAGE": str(venv / "lib" / f"python{pyver}" / "site-packages" / "proxyvpn"),
        "PROXYVPN_STDLIB": stdlib,
        "PROXYVPN_LAUNCHER": launcher_path,
    }
    argv = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-Wformat=2", "-Wshadow",
            "-Wconversion", "-D_FORTIFY_SOURCE=2", "-o", str(out)]
    argv += [f"-D{k}=\"{v}\"" for k, v in defines.items()]
    result = subprocess.run([*argv, str(REPO / "native" / "launcher.c")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr, result.stderr
    return out


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@needs_gcc
def test_launcher_compiles_without_warnings(tmp_path):
    _compile_launcher(tmp_path / "proxyvpn", tmp_path / "venv")


def _fake_install(tmp_path: Path) -> Path:
    """A venv whose `proxyvpn` package reports what the launcher handed it."""
    venv = tmp_path / "venv"
    real_python = os.path.realpath(sys.executable)
    if not real_python.startswith("/usr/"):
        real_python = shutil.which("python3", path="/usr/bin") or real_python
    subprocess.run([real_python, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    pyver = subprocess.run([str(venv / "bin" / "python3"), "-c",
                            "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                           capture_output=True, text=True, check=True).stdout.strip()
    package = venv / "lib" / f"python{pyver}" / "site-packages" / "proxyvpn"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"env": dict(os.environ), "argv": sys.argv[1:],
                          "isolated": sys.flags.isolated, "prefix": sys.prefix}))
    """))
    return venv


@needs_gcc
@pytest.mark.skipif(not ROOT, reason="the fake install must be root-owned")
def test_launcher_scrubs_environment_and_runs_isolated(tmp_path):
    os.chmod(tmp_path, 0o755)
    venv = _fake_install(tmp_path)
    launcher = _compile_launcher(tmp_path / "proxyvpn", venv)
    env = {"PATH": "/evil", "PYTHONPATH": "/evil", "LD_PRELOAD": "/evil.so", "HOME": "/evil",
           "LANG": "C.UTF-8", "LC_ALL": "../../etc/passwd", "LC_TIME": "de_DE.UTF-8",
           "TERM": "xterm-256color", "PROXYVPN_PASSWORD": "pw", "PROXYVPN_PROXY_URL": "http://h",
           "PROXYVPN_LAUNCHER": "/evil", "XDG_RUNTIME_DIR": "/evil", "IFS": "x", "X": "y"}
    result = subprocess.run([str(launcher), "up", "--state-dir", "/tmp/x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["env"] == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PROXYVPN_LAUNCHER": "/opt/pv/bin/proxyvpn",
        "LANG": "C.UTF-8", "LC_TIME": "de_DE.UTF-8", "TERM": "xterm-256color",
        "PROXYVPN_PASSWORD": "pw", "PROXYVPN_PROXY_URL": "http://h",
    }
    assert out["argv"] == ["up", "--state-dir", "/tmp/x"]
    assert out["isolated"] == 1
    assert out["prefix"] == str(venv)


@needs_gcc
def test_launcher_refuses_an_untrusted_tree(tmp_path):
    os.chmod(tmp_path, 0o755)
    venv = _fake_install(tmp_path)
    launcher = _compile_launcher(tmp_path / "proxyvpn", venv)
    main = next(venv.rglob("proxyvpn/__main__.py"))
    if ROOT:  # root owns the tree: make one file writable by a group that is not root's
        os.chown(main, 0, 100)
        main.chmod(main.stat().st_mode | stat.S_IWGRP)
        expected = f"refusing to run: {main} (in the virtual environment) is writable by group 100"
    else:
        expected = f"refusing to run: {venv / 'bin' / 'python3'} (interpreter) is owned by uid {os.getuid()}"
    result = subprocess.run([str(launcher), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("proxyvpn: " + expected), result.stderr


@needs_gcc
@pytest.mark.skipif(not ROOT, reason="the fake install must be root-owned")
def test_launcher_reports_a_missing_package(tmp_path):
    os.chmod(tmp_path, 0o755)
    venv = _fake_install(tmp_path)
    launcher = _compile_launcher(tmp_path / "proxyvpn", venv)
    shutil.rmtree(next(venv.rglob("site-packages/proxyvpn")))
    result = subprocess.run([str(launcher)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "proxyvpn package" in result.stderr and "No such file or directory" in result.stderr
    assert "install.sh" in result.stderr


# ---------------------------------------------------------------- packaging agrees with the code


def test_example_config_is_valid():
    from proxyvpn.config import build_config, load_config_file

    settings = load_config_file(REPO / "packaging" / "proxyvpn.toml")
    config = build_config(settings, dry_run=True)
    assert config.proxy is not None and config.proxy.password is None


def test_systemd_unit_holds_only_net_admin_and_uses_real_flags():
    from proxyvpn.cli import up

    unit = (REPO / "packaging" / "systemd" / "proxyvpn.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines()
                 if "=" in line and not line.startswith("#"))
    assert lines["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert lines["AmbientCapabilities"] == "CAP_NET_ADMIN"
    assert lines["RuntimeDirectory"] == "proxyvpn"
    # Fail closed: the journal outlives a crash, and only a clean stop runs `down`.
    assert lines["RuntimeDirectoryPreserve"] == "yes"
    stop_post = shlex.split(lines["ExecStopPost"])
    assert stop_post[:2] == ["/bin/sh", "-c"]
    assert stop_post[2].startswith('if [ "$$SERVICE_RESULT" = success ]; then exec '
                                   "/usr/bin/proxyvpn down --state-dir /run/proxyvpn;")
    assert lines["LoadCredential"] == "password:/etc/proxyvpn/password"
    argv = shlex.split(lines["ExecStart"])
    assert argv[:2] == ["/usr/bin/proxyvpn", "up"]
    assert argv[argv.index("--password-file") + 1] == "${CREDENTIALS_DIRECTORY}/password"
    assert argv[argv.index("--config") + 1] == "/etc/proxyvpn/proxyvpn.toml"
    assert argv[argv.index("--state-dir") + 1] == "/run/proxyvpn"
    known = {opt for param in up.params for opt in param.opts}
    assert {a for a in argv if a.startswith("--")} <= known


def test_install_sh_syntax_and_help():
    for script in ("install.sh", "packaging/debian/build-deb.sh", "packaging/arch/PKGBUILD",
                   "packaging/arch/proxyvpn.install"):
        assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0, script
    for script in ("postinst", "prerm", "postrm"):
        assert subprocess.run(["sh", "-n", str(REPO / "packaging" / "debian" / script)]).returncode == 0
    result = subprocess.run([str(REPO / "install.sh"), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "sudo ./install.sh uninstall" in result.stdout


def test_install_sh_rejects_paths_it_cannot_compile_in():
    env = {**os.environ, "PREFIX": "/opt/my proxyvpn"}
    result = subprocess.run([str(REPO / "install.sh"), "build"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert "PREFIX=/opt/my proxyvpn: use an absolute path" in result.stderr


def _path_without_package_managers(tmp_path: Path, *stubs: str) -> str:
    """A PATH directory with every usual program except apt-get, pacman and dnf; `stubs`
    adds fake ones, so the test does not depend on the distribution it runs on."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    hidden = {"apt-get", "pacman", "dnf"}
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                link = bindir / entry.name
                if entry.name not in hidden and not link.exists() and not link.is_symlink():
                    link.symlink_to(entry.path)
    for stub in stubs:
        (bindir / stub).write_text("#!/bin/sh\nexit 0\n")
        (bindir / stub).chmod(0o755)
    return str(bindir)


@pytest.mark.parametrize("managers", [(), ("apt-get",), ("pacman",), ("dnf",)])
def test_install_sh_prints_the_exact_install_line_for_what_is_missing(tmp_path, managers):
    env = {"PATH": _path_without_package_managers(tmp_path, *managers),
           "CC": "/nonexistent/cc", "PYTHON": "/nonexistent/python3", "HOME": str(tmp_path),
           "BUILD_DIR": str(tmp_path / "out")}
    result = subprocess.run([str(REPO / "install.sh"), "build"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    header = Path("/usr/include/sys/capability.h").exists()
    missing = ["cc"] + ([] if header else ["libcap-dev"]) + ["python"]
    apt = "gcc" + ("" if header else " libcap-dev") + " python3"
    pacman = "gcc" + ("" if header else " libcap") + " python"
    dnf = "gcc" + ("" if header else " libcap-devel") + " python3"
    lines = {
        "apt-get": [f"  sudo apt-get install {apt}"],
        "pacman": [f"  sudo pacman -S --needed {pacman}"],
        "dnf": [f"  sudo dnf install {dnf}"],
        (): [f"  Debian/Ubuntu: sudo apt-get install {apt}",
             f"  Arch Linux:    sudo pacman -S --needed {pacman}",
             f"  Fedora:        sudo dnf install {dnf}"],
    }[managers[0] if managers else ()]
    assert result.stderr.splitlines() == [
        f"install.sh: missing prerequisites: {' '.join(missing)}",
        "  (Python >= 3.11 is needed at /nonexistent/python3; set PYTHON=/path/to/python3 to use another)",
        *lines,
    ]
    assert result.stdout == "" and not (tmp_path / "out").exists()  # checked before building


# ---------------------------------------------------------------- harden_process, secrets


def _cli_child(argv: list[str], patch: str, env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """`python -m proxyvpn ARGV` in a child, with `patch` (Python) run first to replace the
    subcommand's work by a report of the process state it would run in."""
    code = ("import os, resource, subprocess, sys, prctl\n"
            "from proxyvpn import app, cli, logs, selftest\n"
            f"{textwrap.dedent(patch)}\n"
            "cli.main(sys.argv[1:], prog_name='proxyvpn')\n")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          **kwargs)


SECRET_ENVIRONMENT = {"PROXYVPN_PASSWORD": "hunter2-Sekr1t",
                      "PROXYVPN_PROXY_URL": "http://alice:hunter2-Sekr1t@192.0.2.10:3128"}

REPORT = ("def report(*args, **kwargs):\n"
          "    child_env = subprocess.run(['env'], capture_output=True, text=True).stdout\n"
          "    print('dumpable', int(prctl.get_dumpable()))\n"
          "    print('core', *resource.getrlimit(resource.RLIMIT_CORE))\n"
          "    print('child-secrets', sorted(k for k in child_env.split() if 'hunter2' in k))\n"
          "    print('kwargs', sorted(kwargs.items()))\n"
          "    return ''\n")


def test_harden_process_makes_no_core_and_no_dumpable():
    result = subprocess.run(
        [sys.executable, "-c", "import prctl, resource\nfrom proxyvpn import privileges\n"
         "privileges.harden_process()\n"
         "print(int(prctl.get_dumpable()), *resource.getrlimit(resource.RLIMIT_CORE))"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(REPO)},
        preexec_fn=lambda: resource_core(1 << 20))
    assert result.stdout.split() == ["0", "0", "0"], result.stderr


def resource_core(limit: int) -> None:
    """preexec_fn: start the child with a core limit it could dump with."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    new = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_CORE, (new, hard))


@pytest.mark.parametrize("argv", [["down", "--state-dir", "/nonexistent/pv-unit"],
                                  ["status", "--state-dir", "/nonexistent/pv-unit"]])
def test_down_and_status_are_hardened_and_their_children_get_no_secret(argv):
    patch = REPORT + "app.run_down = report\napp.status = lambda *a, **k: (report(), True)\n"
    result = _cli_child(argv, patch, env=SECRET_ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dumpable 0" in lines and "core 0 0" in lines
    assert "child-secrets []" in lines


def test_selftest_reads_the_env_url_then_hides_it_from_children():
    patch = REPORT + "selftest.run = lambda **opts: report(**opts) or 0\n"
    result = _cli_child(["selftest", "--no-ip"], patch, env=SECRET_ENVIRONMENT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dumpable 0" in lines and "core 0 0" in lines and "child-secrets []" in lines
    # click handed the URL over before the environment was scrubbed.
    assert SECRET_ENVIRONMENT["PROXYVPN_PROXY_URL"] in next(
        line for line in lines if line.startswith("kwargs"))


def test_up_dry_run_registers_the_credentials_and_scrubs_the_environment():
    patch = ("def dry_run(config):\n"
             "    from proxyvpn.relay.connect import encode_basic_credentials\n"
             "    print(sorted(k for k in os.environ if k.startswith('PROXYVPN_PASSWORD')))\n"
             "    print(logs.redact(encode_basic_credentials('alice', 'x')))\n"
             "    print(int(prctl.get_dumpable()))\n"
             "    return ''\n"
             "app.dry_run = dry_run\n")
    result = _cli_child(["up", "--dry-run", "--proxy-url", "http://alice@192.0.2.10:3128"],
                        patch, env={"PROXYVPN_PASSWORD": "x"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["[]", "Basic ***", "0"]


def test_exec_is_hardened_but_keeps_the_users_core_limit():
    patch = REPORT + "app.run_exec = report\n"
    result = _cli_child(["exec", "--", "true"], patch, preexec_fn=lambda: resource_core(1 << 20))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "dumpable 0" in lines
    core = next(line for line in lines if line.startswith("core ")).split()
    assert core[1] != "0"


@needs_root
def test_hardened_process_of_an_ordinary_user_still_uses_proc_self(tmp_path):
    """Not dumpable, our /proc/self files belong to root: what proxyvpn reads there, and
    its own descriptors (libnftables opens /proc/self/fd/N; subprocess lists
    /proc/self/fd) must keep working for a setcap'd, non-root process."""
    code = textwrap.dedent("""
        import os, subprocess, threading
        from proxyvpn import privileges
        from proxyvpn.system import cgroups
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        privileges.harden_process()
        privileges.read_caps()
        privileges.read_caps("self", threading.get_native_id())
        open("/proc/self/cgroup").read(); open("/proc/self/mounts").read()
        cgroups.own_cgroup()
        r, w = os.pipe()
        os.write(w, b"ok")
        assert str(r) in os.listdir("/proc/self/fd")
        with open(f"/proc/self/fd/{r}", "rb", buffering=0) as fh:
            assert fh.read(2) == b"ok"
        assert subprocess.run(["true"], close_fds=True).returncode == 0
        try:
            open("/proc/self/environ").read()
        except PermissionError:
            print("environ-closed")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["environ-closed", "ok"], result.stderr
