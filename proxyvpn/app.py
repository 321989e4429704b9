"""Wiring of the commands: config -> facts -> plan -> apply -> engine -> teardown.

Each step lives in its own module; this file only orders them and owns the lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxyvpn.config import Config, build_config, load_config_file, merge_settings
from proxyvpn.errors import ConfigError, ProxyUnreachableError, ProxyVpnError
from proxyvpn.logs import register_secret

log = logging.getLogger("proxyvpn")


def load_config(config_file: Path | None, cli: dict[str, Any], *, dry_run: bool = False,
                json: bool = False) -> Config:
    """Merge file < environment/CLI (click already resolved env vars) and validate."""
    file_settings = load_config_file(config_file) if config_file else {}
    warnings: list[str] = []
    config = build_config(merge_settings(file_settings, cli), dry_run=dry_run, json=json,
                          warnings=warnings)
    if config.proxy is not None:
        register_secret(config.proxy.password)
    for warning in warnings:
        log.warning("warning: %s", warning)
    return config


def make_plan(config: Config):
    """Facts from the host, then the pure plan."""
    from proxyvpn.plan.build import build_plan
    from proxyvpn.system.facts import read_facts

    facts = read_facts(config)
    plan = build_plan(config, facts)
    for warning in plan.warnings:
        log.warning("warning: %s", warning)
    log.debug("DNS bypass IPs: %s", list(plan.dns_bypass))
    return plan


def dry_run(config: Config) -> str:
    """The plan as commands (or JSON); needs no privileges and changes nothing."""
    from proxyvpn.plan.render import plan_to_json, render_commands

    plan = make_plan(config)
    return plan_to_json(plan) if config.json else render_commands(plan)


def probe_proxy(addresses: tuple[str, ...], port: int, timeout: float) -> None:
    """Fail before changing anything when no proxy address accepts TCP."""
    errors = []
    deadline = time.monotonic() + timeout
    for address in addresses:
        remaining = max(0.1, deadline - time.monotonic())
        try:
            with socket.create_connection((address, port), timeout=remaining):
                return
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise ProxyUnreachableError(tuple(f"{a}:{port}" for a in addresses), "; ".join(errors) or "no address")


def raise_open_file_limit() -> None:
    """Each flow holds a proxy socket: the usual soft limit of 1024 files would cap us near
    1000 flows whatever --max-flows says, so take the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_up(config: Config) -> int:
    """Apply the plan, run the data path until a stop signal, undo everything."""
    from proxyvpn.aio.busypoll import BusyPollSelector, window_seconds
    from proxyvpn.aio.engine import run_engine
    from proxyvpn.privileges import confine_up
    from proxyvpn.system.apply import apply_plan
    from proxyvpn.system.cgroups import usable_cpus
    from proxyvpn.system.down import clean_stale
    from proxyvpn.system.facts import resolve_proxy
    from proxyvpn.system.state import StateDir, resolve_state_dir

    assert config.proxy is not None
    # First, before any thread or change: CAP_NET_ADMIN or one clear line; then only
    # CAP_NET_ADMIN, no secrets in the environment or the process title.
    confine_up(sys.argv[1:])
    # SIGTERM (`proxyvpn down`, systemd) at any moment outside the engine's own handler --
    # while applying, or just before the loop runs -- must roll back or tear down like
    # Ctrl+C does, never kill the process with everything still in place.
    signal.signal(signal.SIGTERM, _interrupt)
    raise_open_file_limit()
    state_dir = resolve_state_dir(config.state_dir)
    state = StateDir(state_dir, keep=config.keep_logs)
    state.acquire()  # first: a second `up` must say "already running", nothing else
    applied = None
    stop_reason = "stopped"
    # One try from here to the end: wherever a signal lands, either apply_plan rolled
    # back (applied is None) or the finally tears down.
    try:
        try:
            # Reach the proxy before a crashed run's changes are undone: its killswitch
            # lets the lookup and the probe through and, if either fails, stays in place
            # -- fail closed; `proxyvpn down` is what reopens the host. The plan comes
            # after the cleanup: its facts (which iptables tables exist) must not include
            # what that run left.
            try:
                # Resolved once: the plan lets through exactly the addresses probed.
                config = replace(config, proxy_ips=resolve_proxy(config))
                probe_proxy(config.proxy_ips, config.proxy.port, config.connect_timeout)
            except (ConfigError, ProxyUnreachableError) as exc:
                if state.read() is None:
                    raise
                raise _with_stale_hint(exc) from None
            clean_stale(state_dir)
            plan = make_plan(config)
            extra = {"proxy": config.proxy.display(), "tun": config.tun_name,
                     "killswitch": config.killswitch, "pid": os.getpid(),
                     # What `proxyvpn exec` must use; None: this instance has no exec rules.
                     "exec_cgroup": plan.selection.exec_cgroup if plan.selection else None}
            applied = apply_plan(plan, state, extra)
        except BaseException:
            if applied is None and state.locked:
                # Nothing of ours is applied (a rollback that failed has released the lock
                # and kept its journal for `proxyvpn down`). A journal still here is a dead
                # run's that was not undone -- the proxy was unreachable, say -- and `down`
                # needs it: keep it, only let go of the lock.
                if state.read() is not None:
                    state.release()
                else:
                    state.remove()
            raise
        ready = (f"up: {config.tun_name} via {config.proxy.display()} (killswitch "
                 f"{'on' if config.killswitch else 'off'}); Ctrl+C or `proxyvpn down` to stop")
        poller = BusyPollSelector(window_seconds(config.busy_poll, usable_cpus()))
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(poller)) as runner:
            stop_reason = runner.run(_serve(run_engine(config, plan, applied.tun, state_dir,
                                                       poller), plan, ready))
    except KeyboardInterrupt:
        if applied is None:
            raise
        stop_reason = "interrupted"
    except Exception:
        if applied is not None and config.killswitch:
            # A crash, not a stop: fail closed, as after kill -9 (DESIGN). Under systemd
            # the restart takes over; by hand, `proxyvpn down` reopens the host.
            applied.abandon()
            applied = None
            log.error("proxyvpn failed (below); the killswitch stays in place: "
                      "`proxyvpn down` removes it")
        raise
    finally:
        if applied is not None:
            # Signals during teardown must not leave it half done.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            applied.teardown()
            log.info("down: everything proxyvpn changed is undone (%s)", stop_reason)
    return 0


def _with_stale_hint(exc: ConfigError | ProxyUnreachableError) -> ProxyVpnError:
    """The same error, saying that a dead run's killswitch still blocks the host."""
    hint = " (the killswitch of a proxyvpn that died stays in place; `proxyvpn down` removes it)"
    if isinstance(exc, ProxyUnreachableError):
        return ProxyUnreachableError(exc.addresses, exc.cause + hint)
    return ConfigError(f"{exc}{hint}")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


async def _serve(engine: Any, plan: Any, ready: str) -> str:
    """Run the engine with the cgroup watcher beside it (when the table has cgroup sets);
    the watcher stops before teardown removes the table its sets live in. `ready` is
    logged once everything runs (scripts and tests wait for it)."""
    watcher = None
    if plan.selection is not None and plan.selection.watches_cgroups and plan.cgroup2:
        from proxyvpn.system.cgwatch import CgroupWatcher

        watcher = CgroupWatcher(plan.cgroup2, plan.selection, plan.cgroups_held)
        try:
            watcher.start(asyncio.get_running_loop())
        except BaseException:
            engine.close()
            raise
    log.info("%s", ready)
    try:
        return await engine
    finally:
        if watcher is not None:
            watcher.stop()


EXEC_SETTLE = 0.25
"""Seconds `exec` waits after creating its cgroup, so that a running `up`'s watcher (which
reacts within milliseconds) has put it in the nft set before the command's first packet."""


def _exec_cgroup_of_running_up(state_dir: Path | None, requested: str | None,
                               direct: bool) -> str:
    """The exec cgroup name of the running `up`, from its state file.

    Without a running `up` nothing captures the command, and an `up` without exec rules
    (iptables backend, no cgroup2) or with another exec cgroup would not capture it
    either: refuse rather than let it talk directly while its user believes it goes
    through the proxy. `--direct` only needs a name. A state directory we may not read
    (an `up` run by root or by the systemd unit) cannot be checked: warn, and trust
    --exec-cgroup."""
    from proxyvpn.config import DEFAULT_EXEC_CGROUP
    from proxyvpn.errors import ConfigError, PrivilegeError
    from proxyvpn.system.state import StateDir, resolve_state_dir

    fallback = requested or DEFAULT_EXEC_CGROUP
    try:
        directory = resolve_state_dir(state_dir)
        store = StateDir(directory)
        pid, state = store.holder_pid(), store.read()
    except (PermissionError, PrivilegeError, ConfigError) as exc:
        if not direct:
            log.warning("cannot check that proxyvpn runs (%s): the command is captured "
                        "only if `proxyvpn up` runs with exec cgroup %r", exc, fallback)
        return fallback
    if pid is None or state is None:
        if direct:
            return fallback
        raise ConfigError(f"proxyvpn is not running (state directory {directory}): "
                          "start `proxyvpn up` first, or use `exec --direct`")
    running = state.get("exec_cgroup")
    if running is None:
        raise ConfigError("the running proxyvpn has no exec rules (the iptables backend, "
                          "or no cgroup v2 filesystem): exec cannot select the command")
    if requested and requested != running:
        raise ConfigError(f"the running proxyvpn uses --exec-cgroup {running}, not "
                          f"{requested}")
    return str(running)


def run_exec(argv: tuple[str, ...], *, direct: bool, exec_cgroup: str | None,
             state_dir: Path | None = None) -> None:
    """Move this process into the exec cgroup (capture/ or direct/) and exec the command,
    which inherits the terminal, environment and cgroup. Returns only by raising."""
    from proxyvpn.errors import ConfigError
    from proxyvpn.plan.selection import exec_path
    from proxyvpn.privileges import drop_all
    from proxyvpn.system import cgroups

    if not argv:
        raise ConfigError("exec needs a command: proxyvpn exec [--direct] -- CMD ARGS...")
    exec_cgroup = _exec_cgroup_of_running_up(state_dir, exec_cgroup, direct)
    root = cgroups.cgroup2_mount()
    if root is None:
        raise ConfigError("exec needs the cgroup v2 filesystem, and none is mounted "
                          "(see /proc/self/mounts)")
    rel = exec_path(exec_cgroup, "direct" if direct else "capture")
    if cgroups.enter(Path(root.rstrip("/") + rel)):
        time.sleep(EXEC_SETTLE)
    drop_all()
    try:
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        raise ConfigError(f"exec {argv[0]}: {exc.strerror or exc}") from None


def run_down(state_dir: Path | None) -> str:
    """Stop the running instance or clean up after a dead one; safe to run twice."""
    from proxyvpn.system.down import bring_down
    from proxyvpn.system.state import resolve_state_dir

    return bring_down(resolve_state_dir(state_dir))


def status(state_dir: Path | None, *, as_json: bool = False) -> tuple[str, bool]:
    """What the state file says, and live counters from the running instance."""
    from proxyvpn.system.state import StateDir, resolve_state_dir

    directory = resolve_state_dir(state_dir)
    store = StateDir(directory)
    state = store.read()
    pid = store.holder_pid()
    running = pid is not None
    info: dict[str, Any] = {"running": running, "state_dir": str(directory)}
    if state:
        info.update({k: state.get(k) for k in ("pid", "proxy", "tun", "killswitch", "firewall",
                                                  "started")})
        info["operations"] = len(state.get("applied", []))
    stats_file = directory / "stats.json"
    if running and stats_file.exists():
        with contextlib.suppress(OSError, ValueError):
            info["stats"] = json.loads(stats_file.read_text())
    if as_json:
        return json.dumps(info, indent=2, sort_keys=True), running
    if not running:
        stale = " (a stale state file exists: run `proxyvpn down`)" if state else ""
        return f"proxyvpn is not running{stale}", False
    lines = [f"proxyvpn is running (pid {pid})",
             f"  proxy:      {info.get('proxy')}",
             f"  interface:  {info.get('tun')}",
             f"  killswitch: {'on' if info.get('killswitch') else 'off'}",
             f"  firewall:   {info.get('firewall') or 'libnftables'}"]
    for key, value in sorted(info.get("stats", {}).items()):
        if not isinstance(value, dict):
            lines.append(f"  {key + ':':<11} {value}")
    return "\n".join(lines), True
