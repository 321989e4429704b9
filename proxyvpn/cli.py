"""Command line: parse, wire, print. No logic beyond turning flags into settings."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from proxyvpn import __version__
from proxyvpn.config import DEFAULT_EXEC_CGROUP, FIREWALL_BACKENDS, SELECTION_KEYS
from proxyvpn.errors import ProxyVpnError
from proxyvpn.logs import register_credentials, setup_logging

if TYPE_CHECKING:
    from proxyvpn.config import ProxySpec

log = logging.getLogger("proxyvpn")


class DefaultUpGroup(click.Group):
    """`proxyvpn --proxy-url ...` means `proxyvpn up --proxy-url ...`, as in the reference."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = ["up", *args]
        return super().parse_args(ctx, args)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line and an exit code for every expected error; a traceback only with -v."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(kwargs.get("verbose"))
        try:
            return func(*args, **kwargs)
        except ProxyVpnError as exc:
            if verbose:
                log.debug("details", exc_info=True)
            click.echo(f"proxyvpn: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.exceptions.Abort):
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # a bug: say so, keep the traceback for -v
            if verbose:
                log.exception("internal error")
            click.echo(f"proxyvpn: internal error: {type(exc).__name__}: {exc} "
                       "(rerun with --verbose for details)", err=True)
            sys.exit(1)

    return wrapper


def _state_dir_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                        help="State directory [default: /run/proxyvpn, else $XDG_RUNTIME_DIR/proxyvpn].")(func)


def _verbose_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--verbose", "-v", is_flag=True, default=None, help="Verbose logging.")(func)


def _exec_cgroup_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--exec-cgroup", default=None, metavar="NAME",
                        help="Directory under the cgroup2 root for `proxyvpn exec`'s capture/ "
                             f"and direct/ cgroups [default: {DEFAULT_EXEC_CGROUP}].")(func)


@click.group(cls=DefaultUpGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                    "max_content_width": 100})
@click.version_option(__version__, prog_name="proxyvpn")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Send every TCP connection of this host through an HTTP CONNECT proxy.

    `up` is the default command: `proxyvpn --proxy-url http://proxy:3128`.
    """
    from proxyvpn.privileges import harden_process

    # First, before any subcommand reads a password: no core dump, no ptrace by the
    # same user. `exec`'s command is the user's: it keeps their core limit.
    harden_process(limit_core=ctx.invoked_subcommand != "exec")


def _forget_secrets(proxy: ProxySpec | None = None) -> None:
    """Once the settings are read: redact the proxy credentials in logs, and remove
    PROXYVPN_PASSWORD / PROXYVPN_PROXY_URL so that no child (nft, iptables, ip) gets them.
    click has read the environment variables before the command's body runs."""
    from proxyvpn.privileges import scrub_environ

    if proxy is not None and proxy.credentials is not None:
        register_credentials(*proxy.credentials)
    scrub_environ()


@main.command()
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="TOML file with settings (keys are the flag names); flags win over it.")
@click.option("--proxy-url", envvar="PROXYVPN_PROXY_URL", default=None,
              help="Proxy URL http[s]://[user[:pass]@]host[:port] (default port 3128 for http, 443 for https) [env: PROXYVPN_PROXY_URL].")
@click.option("--proxy-host", default=None, help="Upstream proxy host name or IP.")
@click.option("--proxy-port", type=int, default=None, help="Upstream proxy port.")
@click.option("--username", default=None, help="User name for proxy authentication.")
@click.option("--password", envvar="PROXYVPN_PASSWORD", default=None,
              help="Password (visible in the process list: prefer --password-file) [env: PROXYVPN_PASSWORD].")
@click.option("--password-file", type=click.Path(path_type=Path), default=None,
              help="Read the password from the first line of this file.")
@click.option("--proxy-ip", multiple=True, help="Proxy IP to use instead of resolving the host (repeatable).")
@click.option("--tun-name", default=None, help="TUN interface name [default: tun0].")
@click.option("--tun-cidr", default=None, help="TUN IPv4 address/prefix [default: 10.255.255.1/30].")
@click.option("--tun-cidr6", default=None, help="TUN IPv6 address/prefix [default: fd70:7076::1/126].")
@click.option("--mtu", type=int, default=None, help="TUN MTU, 1280..65535 [default: 65535].")
@click.option("--dns", default=None, help="DNS server to allow, replacing those of /etc/resolv.conf.")
@click.option("--allow-dns", multiple=True, help="Additional DNS server to allow (repeatable).")
@click.option("--exclude", multiple=True, help="Destination CIDR never captured (repeatable).")
@click.option("--no-killswitch", "no_killswitch", is_flag=True, default=None,
              help="Let UDP and uncaptured traffic bypass the proxy.")
@click.option("--no-ipv6", "no_ipv6", is_flag=True, default=None,
              help="Do not capture IPv6 (the killswitch still blocks it).")
@click.option("--table", type=str, default=None, help="Policy routing table [default: 7076].")
@click.option("--capture-mark", type=str, default=None, help="fwmark of captured packets [default: 0x7076].")
@click.option("--bypass-mark", type=str, default=None, help="SO_MARK of proxy sockets [default: 0x7077].")
@click.option("--rule-priority", type=str, default=None, help="ip rule priority [default: 7076].")
@click.option("--connect-timeout", type=float, default=None,
              help="Seconds to wait for the proxy to connect and answer CONNECT [default: 10].")
@click.option("--half-close-delay", type=float, default=None,
              help="Seconds the reply must be quiet (not merely held back by a slow app), "
                   "after the proxy has acknowledged all the app sent, before an app's "
                   "half-close reaches the proxy; many proxies drop "
                   "the tunnel on half-close [default: 2, 0: at once].")
@click.option("--busy-poll", type=int, default=None, metavar="USEC",
              help="Microseconds to poll for the next packet before sleeping: lower "
                   "latency for some CPU [default: 200 with more than one CPU, else 0; 0: off].")
@click.option("--max-flows", type=int, default=None, help="Maximum concurrent flows [default: 16384].")
@click.option("--pcap", type=click.Path(path_type=Path), default=None,
              help="Write every packet seen on the TUN to this pcap file (debugging).")
@click.option("--pure-python", is_flag=True, default=None,
              help="Use the pure-Python packet path instead of the C extension (debugging).")
@click.option("--no-offload", "no_offload", is_flag=True, default=None,
              help="Open the TUN without TSO/GSO offload: MSS-sized packets (debugging).")
@click.option("--firewall-backend", type=click.Choice(FIREWALL_BACKENDS), default=None,
              help="auto: libnftables, else the nft binary, else iptables; nft: libnftables, "
                   "else the nft binary; or force one [default: auto].")
@click.option("--only-user", multiple=True, metavar="USER",
              help="Capture only traffic of sockets owned by this user (name or uid; repeatable).")
@click.option("--skip-user", multiple=True, metavar="USER",
              help="Leave this user's traffic alone (repeatable).")
@click.option("--only-group", multiple=True, metavar="GROUP",
              help="Capture only traffic of this (effective) group, as `sg GROUP cmd` sets it (repeatable).")
@click.option("--skip-group", multiple=True, metavar="GROUP",
              help="Leave this group's traffic alone (repeatable).")
@click.option("--only-cgroup", multiple=True, metavar="REGEX",
              help="Capture only cgroups whose v2 path matches (re.search), and below; "
                   "new cgroups are picked up live (repeatable).")
@click.option("--skip-cgroup", multiple=True, metavar="REGEX",
              help="Leave matching cgroups (and below) alone (repeatable).")
@_exec_cgroup_option
@_state_dir_option
@_verbose_option
@click.option("--dry-run", is_flag=True, help="Print the changes without applying them.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
@click.option("--keep-logs", is_flag=True, default=None, help="Keep state files on teardown.")
@friendly_errors
def up(config_file: Path | None, dry_run: bool, as_json: bool, verbose: bool | None,
       **flags: Any) -> None:
    """Bring the VPN up and run until Ctrl+C / SIGTERM / `proxyvpn down`."""
    from proxyvpn import app  # deferred: keeps `--help` fast and free of netlink imports

    setup_logging(bool(verbose))
    settings = cli_settings(flags, verbose)
    config = app.load_config(config_file, settings, dry_run=dry_run, json=as_json)
    _forget_secrets(config.proxy)
    if dry_run:
        click.echo(app.dry_run(config))
        return
    sys.exit(app.run_up(config))


def cli_settings(flags: dict[str, Any], verbose: bool | None) -> dict[str, Any]:
    """Map click's values to setting keys; None means 'not given here'."""
    settings: dict[str, Any] = {k: v for k, v in flags.items() if k not in ("no_killswitch", "no_ipv6", "no_offload")}
    settings["verbose"] = verbose
    settings["killswitch"] = False if flags.get("no_killswitch") else None
    settings["ipv6"] = False if flags.get("no_ipv6") else None
    settings["offload"] = False if flags.get("no_offload") else None
    for key in ("proxy_ip", "allow_dns", "exclude", *SELECTION_KEYS):
        settings[key] = tuple(flags.get(key) or ())
    ctx = click.get_current_context()
    # Secrets typed on the command line deserve a warning; from env or file they do not.
    for key in ("proxy_url", "password"):
        source = ctx.get_parameter_source(key)
        settings[f"_{key}_from_argv"] = source == click.core.ParameterSource.COMMANDLINE
    return settings


@main.command(name="exec", context_settings={"ignore_unknown_options": True,
                                             "allow_interspersed_args": False})
@click.option("--direct", is_flag=True,
              help="Bypass the capture (and the killswitch) of a running `up`.")
@_exec_cgroup_option
@_state_dir_option
@_verbose_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def exec_(direct: bool, exec_cgroup: str | None, state_dir: Path | None, verbose: bool | None,
          command: tuple[str, ...]) -> None:
    """Run CMD captured by a running `up` (or, with --direct, bypassing it):
    `proxyvpn exec [--direct] -- CMD ARGS...`. Works for an interactive shell."""
    from proxyvpn import app
    from proxyvpn.config import build_config

    setup_logging(bool(verbose))
    # Validated when given; otherwise the running `up` says which one (app.run_exec).
    name = build_config({"exec_cgroup": exec_cgroup}, dry_run=True).exec_cgroup \
        if exec_cgroup else None
    app.run_exec(command, direct=direct, exec_cgroup=name, state_dir=state_dir)


@main.command()
@_state_dir_option
@_verbose_option
@friendly_errors
def down(state_dir: Path | None, verbose: bool | None) -> None:
    """Stop a running proxyvpn, or undo what a crashed one left behind."""
    from proxyvpn import app

    setup_logging(bool(verbose))
    _forget_secrets()  # `down` reads no secret: its children need none
    click.echo(app.run_down(state_dir))


@main.command()
@_state_dir_option
@_verbose_option
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@friendly_errors
def status(state_dir: Path | None, verbose: bool | None, as_json: bool) -> None:
    """Show whether proxyvpn runs, with what, and its counters."""
    from proxyvpn import app

    setup_logging(bool(verbose))
    _forget_secrets()
    text, running = app.status(state_dir, as_json=as_json)
    click.echo(text)
    sys.exit(0 if running else 3)


@main.command()
@click.option("--name", default="ifconfig.me", show_default=True, help="DNS name to query.")
@click.option("--server", default=None, help="DNS server [default: first nameserver in /etc/resolv.conf].")
@click.option("--timeout-ms", type=int, default=1500, show_default=True, help="Probe timeout.")
@click.option("--no-ip", is_flag=True, help="Skip the ip rule/route and nft output.")
@click.option("--proxy-url", envvar="PROXYVPN_PROXY_URL", default=None,
              help="Do the DNS query over TCP through this HTTP CONNECT proxy.")
@click.option("--socket-mark", type=str, default=None, help="SO_MARK for the probe socket.")
@_verbose_option
@friendly_errors
def selftest(verbose: bool | None, **opts: Any) -> None:
    """Probe DNS (directly or through the proxy) and show the routing state."""
    from proxyvpn import selftest as st
    from proxyvpn.config import parse_proxy_url

    setup_logging(bool(verbose))
    # opts["proxy_url"] holds PROXYVPN_PROXY_URL already; the ip/nft children need neither.
    _forget_secrets(parse_proxy_url(opts["proxy_url"]) if opts.get("proxy_url") else None)
    sys.exit(st.run(**opts))


@main.command()
@click.option("--keep", is_flag=True, help="Pause with proxyvpn up (Enter continues) to look around.")
@_verbose_option
@friendly_errors
def demo(verbose: bool | None, keep: bool) -> None:
    """Show proxyvpn end to end in throwaway network namespaces (needs root)."""
    from proxyvpn import demo as demo_mod

    setup_logging(bool(verbose))
    # The demo's own `up` is given its proxy; the caller's PROXYVPN_* must not reach it.
    _forget_secrets()
    sys.exit(demo_mod.run(keep=keep, verbose=bool(verbose)))


if __name__ == "__main__":
    main()
