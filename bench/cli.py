"""`python -m bench`: build the lab, run every mode, print JSON lines and a markdown table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

FD_LIMIT = 200_000
"""RLIMIT_NOFILE for everything the bench starts (like `ulimit -n` before `proxyvpn up`)."""


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE for us and our children; without CAP_SYS_RESOURCE only up to
    the hard limit. Returns the soft limit now in force."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, max(FD_LIMIT, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="short smoke run (< 60 s): small transfers, 1,000 idle flows only")
    p.add_argument("--proxy", choices=["squid", "tinyproxy"], default="squid",
                   help="the upstream proxy on the router [default: squid]")
    p.add_argument("--json-out", type=Path, metavar="FILE",
                   help="also write the JSON lines to FILE")
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of direct,proxyvpn,redsocks [default: all "
                        "three; with --ipv6 the first two]")
    p.add_argument("--only", default="bulk,lat,cps,idle",
                   help="comma-separated subset of bulk,lat,cps,idle")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy proxyvpn during the single-flow bulk, latency and connection-rate "
                        "tests; write stacks here (perturbs the figures: use a separate run)")
    p.add_argument("--no-native", action="store_true",
                   help="with --profile: Python frames only (no C-extension frames)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run every mode N times, interleaved (direct, proxyvpn, redsocks, "
                        "direct, ...), and report each figure's median; the idle-flow RSS "
                        "figures are measured in the first round only [default: 1]")
    p.add_argument("--vpn-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `proxyvpn up` (repeatable)")
    p.add_argument("--logs", type=Path, metavar="DIR",
                   help="at the end, copy every log of the run (proxy, proxyvpn, redsocks) "
                        "to DIR; a failed run saves them anyway")
    p.add_argument("--congestion", metavar="ALGO",
                   help="TCP congestion control of every socket in the lab: any the kernel "
                        "has (cubic, reno, bbr, ...), or 'host' for the host's own default, "
                        "which its namespaces inherit [default: cubic, Linux's default; "
                        "'host' on a kernel without it]")
    p.add_argument("--tun-route", action="store_true",
                   help="experiment: also route the server via the TUN in the main table, so "
                        "apps' sockets get the TUN's MSS at connect time (see bench/README.md)")
    p.add_argument("--ipv6", action="store_true",
                   help="the apps connect to the server's IPv6 address (the proxy's own link "
                        "stays IPv4); modes direct and proxyvpn: redsocks is set up for IPv4 "
                        "only")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.modes is None:
        args.modes = "direct,proxyvpn" if args.ipv6 else "direct,proxyvpn,redsocks"
    args.modes = [m for m in args.modes.split(",") if m]
    if args.ipv6 and ("redsocks" in args.modes or args.tun_route):
        p.error("--ipv6 works with the direct and proxyvpn modes, without --tun-route")
    args.only = {o for o in args.only.split(",") if o}
    for m in args.modes:
        if m not in ("direct", "proxyvpn", "redsocks"):
            p.error(f"unknown mode {m!r}")
    for o in args.only:
        if o not in ("bulk", "lat", "cps", "idle"):
            p.error(f"unknown test {o!r}")
    from bench.lab import available_congestion

    if args.congestion is None:
        args.congestion = "cubic" if "cubic" in available_congestion() else "host"
    if args.congestion != "host" and args.congestion not in available_congestion():
        p.error(f"congestion control {args.congestion!r} is not available here "
                f"(available: {' '.join(available_congestion())})")
    return args


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment(proxy: str) -> dict:
    from bench.lab import REPO, host_congestion

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
        "python": platform.python_version(), "commit": commit + ("+dirty" if dirty != "?" else ""),
        "proxy": _version(["squid", "-v"]) if proxy == "squid" else _version(["tinyproxy", "-v"]),
        "redsocks": _dpkg_version("redsocks"), "host_congestion": host_congestion(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def _dpkg_version(pkg: str) -> str:
    out = _version(["dpkg-query", "-W", "-f", "${Version}", pkg])
    return f"{pkg} {out}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (it builds network namespaces): sudo .venv/bin/python -m bench",
              file=sys.stderr)
        return 2

    from bench import pump, report
    from bench.lab import MODES, SERVER4, SERVER6, ProxyVpn, make_lab, remove_lab
    from bench.suite import FULL, QUICK, Runner, log

    # Ctrl+C, SIGTERM, SIGHUP all unwind through the finally below, which removes the lab.
    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    fd_limit = raise_fd_limit()

    started = time.monotonic()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    command = "sudo " + shlex.join([sys.executable, "-m", "bench", *(argv if argv is not None
                                                                     else sys.argv[1:])])
    env = environment(args.proxy)
    json_fh = open(args.json_out, "w") if args.json_out else None  # noqa: SIM115
    results: list[dict] = []

    def emit(row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False)
        print(line, flush=True)
        if json_fh:
            json_fh.write(line + "\n")
            json_fh.flush()

    print(f"# proxyvpn benchmark, {when}", flush=True)
    print(f"# command: {command}", flush=True)
    emit({"figure": "run", "date": when, "command": command, "quick": args.quick,
          "proxy_kind": args.proxy, "fd_limit": fd_limit, "congestion": args.congestion,
          "ipv6": args.ipv6, **env})
    settings = QUICK if args.quick else FULL
    lab = None
    labels = {}
    failures = 0
    try:
        lab = make_lab(min(fd_limit, 65536))
        if args.congestion != "host":
            # The host's default need not be what users run (this one's may be bbr, whose
            # pacing costs every process of the lab CPU per byte): the same for every run.
            lab.set_congestion(args.congestion)
        log(f"lab: namespaces {lab.client.name} {lab.router.name} {lab.server.name}, "
            f"workdir {lab.workdir}, fd limit {fd_limit}")
        pump_bin = pump.build(lab.workdir)
        lab.start_proxy(args.proxy)
        runner = Runner(lab, pump_bin, settings, emit, proxy_kind=args.proxy,
                        host=SERVER6 if args.ipv6 else SERVER4)
        runner.start_server()
        # Rounds interleave the modes, so a slow spell of this shared host hits all of
        # them rather than one; the medians then go into the table.
        for rnd in range(args.repeat):
            runner.round = rnd
            only = args.only if rnd == 0 else args.only - {"idle"}
            if not only:
                break
            for name in args.modes:
                mode = (ProxyVpn(lab, tuple(args.vpn_arg), tun_route=args.tun_route)
                        if name == "proxyvpn" else MODES[name](lab))
                labels[name] = mode.label
                if args.profile and name == "proxyvpn":
                    from bench.profiling import make_profiler
                    runner.profile = make_profiler(mode.main_pid, args.profile,
                                                   native=not args.no_native)
                try:
                    runner.run_mode(mode, only)
                except Exception as exc:  # noqa: BLE001 - one broken mode must not lose the rest
                    failures += 1
                    saved = lab.save_logs(Path(tempfile.mkdtemp(prefix="pvbench-logs-")))
                    log(f"{name}: failed: {exc!r}; logs saved in {saved}")
                    emit({"figure": "error", "mode": name, "error": repr(exc), "logs": str(saved)})
                runner.ensure_clean()
        results = runner.results
        if args.repeat > 1:
            results = report.medians(results)
            for row in results:
                if "median_of" in row:
                    emit({**row, "aggregate": "median"})
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'}): removing the lab")
        return 130
    except Exception:
        if lab is not None:
            saved = lab.save_logs(Path(tempfile.mkdtemp(prefix="pvbench-logs-")))
            log(f"failed: logs saved in {saved}")
        raise
    finally:
        if lab is not None and args.logs:
            log(f"logs saved in {lab.save_logs(args.logs)}")
        if lab is not None:
            try:
                remove_lab(lab)
            except Exception as exc:  # noqa: BLE001 - report, never mask the real error
                log(f"removing the lab failed: {exc}")

    elapsed = time.monotonic() - started
    emit({"figure": "end", "seconds": round(elapsed, 1),
          "loadavg": Path("/proc/loadavg").read_text().split()[:3]})
    if json_fh:
        json_fh.close()
    header = [
        f"## proxyvpn benchmark ({'quick' if args.quick else 'full'}, proxy: {args.proxy})",
        "",
        *([f"- each figure: the median of {args.repeat} rounds, the modes interleaved "
           "(idle-flow RSS: the first round only)"] if args.repeat > 1 else []),
        f"- date: {when}; took {elapsed:.0f} s",
        f"- command: `{command}`",
        f"- host: {env['cpus']} CPU ({env['cpu']}), Linux {env['kernel']}, "
        f"Python {env['python']}, commit {env['commit']}",
        f"- proxy: {env['proxy']}; {env['redsocks']}",
        *(["- the apps' flows: IPv6 (`--ipv6`)"] if args.ipv6 else []),
        f"- TCP congestion control in the lab: {args.congestion} (the host's default: "
        f"{env['host_congestion']})",
        f"- load average at start: {' '.join(env['loadavg'])} (every process of the lab shares "
        f"these {env['cpus']} CPUs with whatever else runs on the host)",
    ]
    print()
    print(report.markdown(results, header=header, mode_labels=labels))
    log(f"done in {elapsed:.0f} s")
    return 1 if failures else 0
