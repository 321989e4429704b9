"""Thin pyroute2 wrappers: links, addresses, routes in a table, fwmark rules (IPv4 and IPv6).

Every failure surfaces as OSError with the kernel's errno (pyroute2's NetlinkError carries
it as .code), so callers decide on errno alone: apply.py turns errors into ApplyError and
undo treats ENOENT/ESRCH/ENODEV/EADDRNOTAVAIL as "already gone".
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxyvpn.plan.facts import DefaultRoute

IFA_F_NODAD = 0x02
"""Address flag: skip duplicate address detection (a TUN has no neighbours)."""

_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}

F = TypeVar("F", bound=Callable[..., Any])


def _oserror(exc: NetlinkError, what: str) -> OSError:
    code = exc.code or errno.EIO
    return OSError(code, f"{os.strerror(code)} ({what})")


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until a netlink request is done.

    `up` turns them into KeyboardInterrupt wherever Python happens to be; inside
    pyroute2 that is its private event loop, which is left with a half-run async
    generator and prints a traceback when it is collected. Held, the signal arrives
    the moment the request returns, and the rollback runs exactly as before.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _translate(what: str) -> Callable[[F], F]:
    """Re-raise NetlinkError as OSError(errno, 'strerror (what)'); signals wait for the end."""
    def deco(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                with _signals_deferred():
                    return func(*args, **kwargs)
            except NetlinkError as exc:
                raise _oserror(exc, what) from exc
        return wrapper  # type: ignore[return-value]
    return deco


def _default_dst(family: int, dst: str) -> str:
    return ("0.0.0.0/0" if family == 4 else "::/0") if dst == "default" else dst


class Netlink:
    """One rtnetlink socket (pyroute2 IPRoute) in the caller's network namespace."""

    def __init__(self) -> None:
        with _signals_deferred():
            self._ipr = IPRoute()

    def close(self) -> None:
        """Close the netlink socket."""
        with _signals_deferred():
            self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ links

    def index(self, name: str) -> int:
        """Interface index; OSError(ENODEV) when there is no such link."""
        try:
            with _signals_deferred():
                found = self._ipr.link_lookup(ifname=name)
        except NetlinkError as exc:
            raise _oserror(exc, f"link {name}") from exc
        if not found:
            raise OSError(errno.ENODEV, f"{os.strerror(errno.ENODEV)} ({name})")
        return int(found[0])

    @_translate("link up")
    def link_up(self, name: str) -> None:
        """Set IFF_UP on the link."""
        self._ipr.link("set", index=self.index(name), state="up")

    @_translate("link mtu")
    def set_mtu(self, name: str, mtu: int) -> None:
        """Set the link's MTU."""
        self._ipr.link("set", index=self.index(name), mtu=mtu)

    @_translate("link delete")
    def delete_link(self, name: str) -> None:
        """Delete the link; OSError(ENODEV) when it does not exist."""
        self._ipr.link("del", index=self.index(name))

    @_translate("link kind")
    def link_kind(self, name: str) -> str | None:
        """The link's IFLA_INFO_KIND ("tun", "veth", ...; "" for a physical NIC), or None
        when there is no such link."""
        found = self._ipr.link_lookup(ifname=name)
        if not found:
            return None
        (link,) = self._ipr.get_links(found[0])
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind or "")

    @_translate("link dump")
    def link_names(self) -> frozenset[str]:
        """Names of all links in this namespace."""
        return frozenset(str(link.get("ifname")) for link in self._ipr.get_links())

    # ------------------------------------------------------------ addresses

    @_translate("address add")
    def add_address(self, dev: str, cidr: str) -> None:
        """Add address/prefix to dev (IPv6 with IFA_F_NODAD)."""
        iface = ipaddress.ip_interface(cidr)
        kwargs: dict[str, Any] = {}
        if iface.version == 6:
            kwargs["flags"] = IFA_F_NODAD
        self._ipr.addr("add", index=self.index(dev), address=str(iface.ip),
                       prefixlen=iface.network.prefixlen, **kwargs)

    @_translate("address del")
    def del_address(self, dev: str, cidr: str) -> None:
        """Remove address/prefix from dev; EADDRNOTAVAIL when it is not there."""
        iface = ipaddress.ip_interface(cidr)
        self._ipr.addr("del", index=self.index(dev), address=str(iface.ip),
                       prefixlen=iface.network.prefixlen)

    # ------------------------------------------------------------ routes

    @_translate("route add")
    def add_route(self, family: int, table: int, dev: str, dst: str = "default") -> None:
        """`ip [-6] route add DST dev DEV table TABLE`."""
        self._ipr.route("add", family=_FAMILIES[family], dst=_default_dst(family, dst),
                        oif=self.index(dev), table=table)

    @_translate("route del")
    def del_route(self, family: int, table: int, dev: str, dst: str = "default") -> None:
        """`ip [-6] route del DST dev DEV table TABLE`; ESRCH when absent, ENODEV when the
        device (and so the route) is gone."""
        self._ipr.route("del", family=_FAMILIES[family], dst=_default_dst(family, dst),
                        oif=self.index(dev), table=table)

    @_translate("route dump")
    def route_tables(self) -> frozenset[int]:
        """Tables holding at least one route, IPv4 and IPv6."""
        tables: set[int] = set()
        for family in _FAMILIES.values():
            for route in self._dump(self._ipr.get_routes, family=family):
                table = route.get("table")
                if table is not None:
                    tables.add(int(table))
        return frozenset(tables)

    @_translate("route dump")
    def default_routes(self) -> tuple[DefaultRoute, ...]:
        """Default routes of the main table, IPv4 then IPv6."""
        names = {int(link["index"]): str(link.get("ifname")) for link in self._ipr.get_links()}
        out = []
        for version, family in _FAMILIES.items():
            for route in self._dump(self._ipr.get_routes, family=family, table=254):
                if route["dst_len"] != 0 or route.get("table") != 254:
                    continue
                oif = route.get("oif")
                out.append(DefaultRoute(version, route.get("gateway"),
                                        names.get(int(oif)) if oif is not None else None))
        return tuple(out)

    # ------------------------------------------------------------ rules

    @_translate("rule add")
    def add_rule(self, family: int, fwmark: int, table: int, priority: int) -> None:
        """`ip [-6] rule add fwmark M lookup T priority P`; EEXIST if an identical rule exists."""
        self._ipr.rule("add", family=_FAMILIES[family], fwmark=fwmark, table=table,
                       priority=priority)

    @_translate("rule del")
    def del_rule(self, family: int, fwmark: int, table: int, priority: int) -> None:
        """Delete the rule matching fwmark, table and priority; ENOENT when absent."""
        self._ipr.rule("del", family=_FAMILIES[family], fwmark=fwmark, table=table,
                       priority=priority)

    @_translate("rule dump")
    def rules(self) -> tuple[tuple[int, int, int, int], ...]:
        """(family, priority, fwmark, table) of every rule, IPv4 then IPv6."""
        out = []
        for version, family in _FAMILIES.items():
            for rule in self._dump(self._ipr.get_rules, family=family):
                # The kernel omits FRA_PRIORITY for priority 0 (the "local" rule).
                out.append((version, int(rule.get("priority") or 0),
                            int(rule.get("fwmark") or 0), int(rule.get("table") or 0)))
        return tuple(out)

    @staticmethod
    def _dump(method: Callable[..., Any], **kwargs: Any) -> list[Any]:
        """A dump that yields nothing, instead of failing, for a family the kernel lacks
        (IPv6 compiled out or disabled at boot)."""
        try:
            return list(method(**kwargs))
        except NetlinkError as exc:
            if exc.code in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                return []
            raise


@contextmanager
def netlink() -> Iterator[Netlink]:
    """A Netlink for the duration of a with-block."""
    nl = Netlink()
    try:
        yield nl
    finally:
        nl.close()
