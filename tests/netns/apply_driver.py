"""Test driver for the system layer, run INSIDE a network namespace by tests/netns/test_apply.py
(`ip netns exec NS python tests/netns/apply_driver.py MODE ...`). Never run it on a host.

Modes:
  plan    print the dry-run commands (read_facts + build_plan + render_commands)
  apply   plan, take the state dir, clean a stale journal, apply (the order `up` uses);
          print "APPLIED <json>" and wait for a line on stdin (or SIGTERM), then tear down
          and print "DOWN <json errors>". On failure print "ERR <Class> <message>", exit 3.
  down    bring_down(state_dir); print "MSG <message>"
  clean   clean_stale(state_dir); print "MSG <message or None>"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxyvpn.config import build_config  # noqa: E402
from proxyvpn.errors import ProxyVpnError  # noqa: E402


def _config(args: argparse.Namespace):
    settings = {
        "proxy_url": args.proxy_url,
        "proxy_ip": args.proxy_ip,
        "tun_name": args.tun,
        "table": args.table,
        "rule_priority": args.priority,
        "killswitch": not args.no_killswitch,
        "ipv6": not args.no_ipv6,
        "exclude": args.exclude,
        "allow_dns": args.allow_dns,
        "firewall_backend": args.firewall_backend,
    }
    return build_config({k: v for k, v in settings.items() if v is not None},
                        dry_run=args.mode == "plan")


def _plan(args: argparse.Namespace):
    from proxyvpn.plan.build import build_plan
    from proxyvpn.system.facts import read_facts

    config = _config(args)
    facts = read_facts(config)
    # Lie about the host to reach failures the planner would otherwise prevent.
    if args.fake_free_links:
        facts = dataclasses.replace(facts, links=frozenset())
    if args.fake_ipv6_default_enabled:
        facts = dataclasses.replace(
            facts, sysctls={**facts.sysctls, "net.ipv6.conf.default.disable_ipv6": "0"})
    return config, build_plan(config, facts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["plan", "apply", "down", "clean"])
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--proxy-url", default="http://user:s3cret@192.0.2.10:3128")
    parser.add_argument("--proxy-ip", action="append")
    parser.add_argument("--tun")
    parser.add_argument("--table", type=int)
    parser.add_argument("--priority", type=int)
    parser.add_argument("--exclude", action="append")
    parser.add_argument("--allow-dns", action="append")
    parser.add_argument("--no-killswitch", action="store_true")
    parser.add_argument("--no-ipv6", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--firewall-backend")
    parser.add_argument("--fake-free-links", action="store_true")
    parser.add_argument("--fake-ipv6-default-enabled", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    try:
        if args.mode == "plan":
            from proxyvpn.plan.render import render_commands

            print(render_commands(_plan(args)[1]), end="")
            return 0
        if args.mode == "down":
            from proxyvpn.system.down import bring_down

            print("MSG", bring_down(args.state_dir, timeout=10), flush=True)
            return 0
        if args.mode == "clean":
            from proxyvpn.system.down import clean_stale

            print("MSG", clean_stale(args.state_dir), flush=True)
            return 0
        return _apply(args)
    except ProxyVpnError as exc:
        print("ERR", type(exc).__name__, exc, flush=True)
        return 3


def _apply(args: argparse.Namespace) -> int:
    from proxyvpn.system.apply import apply_plan
    from proxyvpn.system.down import clean_stale
    from proxyvpn.system.state import StateDir, resolve_state_dir

    config, plan = _plan(args)
    state_dir = resolve_state_dir(args.state_dir)
    state = StateDir(state_dir, keep=args.keep)
    state.acquire()
    clean_stale(state_dir)
    applied = apply_plan(plan, state, {"proxy": config.proxy, "tun": config.tun_name,
                                       "killswitch": config.killswitch})

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    errors: list[str] = []
    try:
        # Like `up`, run an asyncio loop between apply and teardown (pyroute2 has its own).
        asyncio.run(asyncio.sleep(0))
        tun = applied.tun
        print("APPLIED", json.dumps({"tun": tun.name if tun else None,
                                     "fd": tun.fd if tun else None}), flush=True)
        sys.stdin.readline()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        errors = applied.teardown()
    print("DOWN", json.dumps(errors), flush=True)
    return 0 if not errors else 4


if __name__ == "__main__":
    sys.exit(main())
