"""Real packet loss, reordering and duplication inside a lab namespace, without sch_netem.

The test kernel has no sch_netem (CONFIG_NET_SCH_NETEM unset) and no nft `queue`, so
`tc netem` cannot be used. This builds the same impairments from what it does have:

loss + reordering -- iptables/ip6tables NFQUEUE + a userspace verdict process
    For every impaired device, packets *leaving* through it are queued from
    `mangle POSTROUTING -o DEV` and packets *arriving* through it from
    `raw PREROUTING -i DEV` (before conntrack), each (device, direction) to its own
    queue, all with --queue-bypass. nfqueue_impair.py, started inside the namespace with
    Netns.popen, answers them over nfnetlink_queue: NF_DROP for `loss` of them (the
    kernel frees the skb: real loss); for `reorder` of them no verdict yet -- each is
    released once 1-3 later packets of the same flow at the same point were accepted
    or after 1-5 ms, so the later ones really go first; NF_ACCEPT for the rest.
    "reordered" counts held packets that a later packet of their own flow overtook,
    "delayed" those released by their deadline with nothing overtaking them.

duplication -- nftables `dup`, with a kernel random number per packet
    leaving DEV:  a netdev *egress* chain on DEV (it runs in dev_queue_xmit, after IP
        POSTROUTING, so after the queue verdict):
        `numgen random mod 10000 < N dup to "DEV"` transmits a clone on DEV. Checked
        with tcpdump (taps run after the egress hook): on a veth the number of
        identical repeats (same IP ID and TCP header) equals the rule counter; on the
        TUN each clone shows as ~2 repeats, because the TUN splits the GSO skb after
        the hook. The receiving kernel TCP counts them (TcpExtTCPDSACKOldSent 0 -> 42).
    arriving through DEV: a netdev *ingress* `dup to "lo"` cannot work: on a TUN there is
        no MAC header and on a veth the destination MAC is not lo's, so lo's
        eth_type_trans() mangles or discards the clone. What works is an `ip`/`ip6`
        table prerouting chain (after the raw-table queue; `dup to <addr>` does not
        exist in `inet` tables):
        `iifname DEV fib daddr type local numgen random ... dup to ip daddr`
        (nf_dup_ipv4/6): the clone is routed to its own, local, destination, i.e. sent
        through lo and received again by the local stack, while the original goes on.
        Checked: tcpdump on lo shows exactly (rule counters of all "in" points) clones,
        IPv4 and IPv6. Only packets for a local address are duplicated in this
        direction (a router's forwarded traffic is duplicated on its way out instead).

Granularity: the queue is set up with NFQA_CFG_F_GSO, so a TSO/GSO skb (up to 64 KiB:
the app's 44 x 1460-byte segments towards tun0, or a veth super-packet) is one packet
for loss, reordering and duplication -- as for `tc netem`, which also drops whole skbs.

By default only TCP is impaired (`proto="tcp"`): neighbour discovery, ICMP and UDP pass
untouched so a test measures the data path, not NDP retry timers. Pass proto=None to
impair every IPv4/IPv6 packet.

    with impair(lab.client, ["tun0", lab.client_if], seed=1) as imp:
        ...traffic...
    st = imp.final            # ImpairStats, counters per "DEV/out" and "DEV/in"
    imp.assert_impaired()     # the impairer lived to the end; loss/reorder/dup happened

Everything installed (iptables rules, the tables iptables-nft created for them if they
did not exist, the nft tables, the process) is removed on exit, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nslib import Netns

IMPAIRER = str(Path(__file__).with_name("nfqueue_impair.py"))
QUEUE_BASE = 4200


@dataclass(frozen=True)
class PointStats:
    """Counters of one impairment point: one device, one direction."""

    name: str
    """"DEV/out" (leaving through DEV) or "DEV/in" (arriving through DEV)."""
    queue: int
    """The NFQUEUE number of this point."""
    seen: int = 0
    """Packets the impairer got a verdict request for (a GSO skb counts once)."""
    accepted: int = 0
    """Accepted at once."""
    dropped: int = 0
    """NF_DROP: lost."""
    held: int = 0
    """Held back; each ends up reordered or delayed (or is still held)."""
    reordered: int = 0
    """Held packets that at least one later packet of the same flow overtook."""
    delayed: int = 0
    """Held packets released by their deadline with nothing of their flow overtaking."""
    duplicated: int = 0
    """Clones made by nft dup (its rule counter)."""
    max_len: int = 0
    """Largest packet seen, bytes (the TUN carries up to 64 KiB)."""
    bytes: int = 0
    """Bytes of all packets seen."""
    ipv6: int = 0
    """How many of the packets seen were IPv6."""
    queued_by_rule: int = 0
    """Packets the iptables NFQUEUE rules matched (read just before they were removed)."""

    @property
    def unimpaired(self) -> int:
        """Matched by the rules but never seen by the impairer: passed by --queue-bypass or
        fail-open (impairer dead or too slow). Approximate: counters are read at stop."""
        return max(0, self.queued_by_rule - self.seen)


@dataclass(frozen=True)
class ImpairStats:
    points: dict[str, PointStats]
    alive: bool
    """The impairer process was running when asked (for `final`: when stop() began)."""
    enobufs: int = 0
    """Times the kernel overran the impairer's netlink socket (those packets failed open)."""
    verdict_errors: int = 0
    kernel: dict = field(default_factory=dict)
    """/proc/net/netfilter/nfnetlink_queue per queue: queue_total, queue_dropped,
    user_dropped, id_sequence."""
    log: str = ""

    def total(self, counter: str) -> int:
        return sum(getattr(p, counter) for p in self.points.values())

    def summary(self) -> str:
        rows = [f"{'point':<18}{'seen':>8}{'ipv6':>8}{'drop':>7}{'reord':>7}{'delay':>7}"
                f"{'dup':>6}{'maxlen':>8}{'unimp':>7}"]
        for p in self.points.values():
            rows.append(f"{p.name:<18}{p.seen:>8}{p.ipv6:>8}{p.dropped:>7}{p.reordered:>7}"
                        f"{p.delayed:>7}{p.duplicated:>6}{p.max_len:>8}{p.unimpaired:>7}")
        rows.append(f"alive={self.alive} enobufs={self.enobufs} "
                    f"verdict_errors={self.verdict_errors} kernel={self.kernel}")
        return "\n".join(rows)


class Impairment:
    """Loss/reorder/duplication on `devices` of `ns` while in the `with` block."""

    def __init__(self, ns: Netns, devices: Iterable[str], *, loss: float = 0.05,
                 reorder: float = 0.25, duplicate: float = 0.01, seed: int = 0,
                 proto: str | None = "tcp", hold_ms: tuple[float, float] = (1.0, 5.0),
                 hold_after: tuple[int, int] = (1, 3), directions: Iterable[str] = ("out", "in"),
                 queue_base: int = QUEUE_BASE) -> None:
        assert min(loss, reorder, duplicate) >= 0 and loss + reorder <= 1 and duplicate <= 1
        self.ns = ns
        self.devices = list(devices)
        self.loss, self.reorder, self.duplicate, self.seed = loss, reorder, duplicate, seed
        self.proto = proto
        self.hold_ms, self.hold_after = hold_ms, hold_after
        self.tag = f"pvimpair{secrets.token_hex(3)}"
        self.points: dict[str, int] = {}
        q = queue_base
        self.directions = tuple(directions)
        assert self.directions and set(self.directions) <= {"out", "in"}, self.directions
        for dev in self.devices:
            for direction in self.directions:
                self.points[f"{dev}/{direction}"] = q
                q += 1
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.final: ImpairStats | None = None
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._rule_counts: dict[str, int] = {}
        self._final_dups: dict[str, int] = {}

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Impairment:
        try:
            self._start()
        except BaseException:
            try:
                self._teardown()
            finally:
                self._remove_workdir()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pvimpair-"))
        stats = self.workdir / "stats.json"
        log = open(self.workdir / "impairer.log", "w")  # noqa: SIM115 (lives with the process)
        argv = [sys.executable, IMPAIRER, "--loss", str(self.loss), "--reorder", str(self.reorder),
                "--seed", str(self.seed), "--stats", str(stats),
                "--hold-ms", *map(str, self.hold_ms), "--hold-after", *map(str, self.hold_after)]
        for name, q in self.points.items():
            argv += ["--queue", f"{q}:{name}"]
        self.proc = self.ns.popen(*argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._undo.append(("impairer", self._stop_impairer))
        deadline = time.monotonic() + 10
        while not stats.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"nfqueue impairer did not start:\n{self._log()}")
            time.sleep(0.02)
        self._install_queue_rules()
        if self.duplicate > 0:
            self._install_dup()

    def stop(self) -> ImpairStats:
        """Remove everything; the final counters are returned and kept in `final`."""
        if self.final is None:
            alive = self.proc is not None and self.proc.poll() is None
            try:
                self._teardown()
                self.final = self._read_stats(alive=alive, final=True)
            finally:
                self._remove_workdir()
        return self.final

    def _remove_workdir(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _teardown(self) -> None:
        errors = []
        while self._undo:
            what, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # keep undoing; report afterwards
                errors.append(f"{what}: {exc}")
        if errors:
            raise AssertionError("impair cleanup failed:\n" + "\n".join(errors))

    # ---------------------------------------------------------------- iptables NFQUEUE

    def _tables_now(self) -> set[str]:
        return set(self.ns.run("nft", "list", "tables").stdout.split("\n"))

    def _install_queue_rules(self) -> None:
        before = self._tables_now()
        created: list[tuple[str, str, str]] = []  # (iptables binary, table, nft family)
        for tool, family in (("iptables", "ip"), ("ip6tables", "ip6")):
            for table in ("mangle", "raw"):
                if f"table {family} {table}" not in before:
                    created.append((tool, table, family))
        self._undo.append(("iptables tables", lambda: self._drop_empty_tables(created)))
        for name, q in self.points.items():
            dev, direction = name.rsplit("/", 1)
            table, chain, flag = (("mangle", "POSTROUTING", "-o") if direction == "out"
                                  else ("raw", "PREROUTING", "-i"))
            spec = [chain, flag, dev]
            if self.proto:
                spec += ["-p", self.proto]
            spec += ["-m", "comment", "--comment", f"{self.tag}:{name}",
                     "-j", "NFQUEUE", "--queue-num", str(q), "--queue-bypass"]
            for tool in ("iptables", "ip6tables"):
                self.ns.run(tool, "-w", "-t", table, "-A", *spec)
                self._undo.append((f"{tool} {table} {name}",
                                   lambda tool=tool, table=table, spec=spec:
                                   self.ns.run(tool, "-w", "-t", table, "-D", *spec)))
        self._undo.append(("rule counters", self._save_rule_counts))

    def _save_rule_counts(self) -> None:
        counts: dict[str, int] = dict.fromkeys(self.points, 0)
        pattern = re.compile(r"^\[(\d+):\d+\] .*--comment \"?" + self.tag + r":(\S+?)\"? ")
        for tool in ("iptables-save", "ip6tables-save"):
            for line in self.ns.run(tool, "-c").stdout.splitlines():
                m = pattern.match(line)
                if m and m.group(2) in counts:
                    counts[m.group(2)] += int(m.group(1))
        self._rule_counts = counts

    def _drop_empty_tables(self, created: list[tuple[str, str, str]]) -> None:
        """Delete the tables iptables-nft made for our rules, if nothing else uses them."""
        for tool, table, family in created:
            if f"table {family} {table}" not in self._tables_now():
                continue
            rules = [r for r in self.ns.run(tool, "-w", "-t", table, "-S").stdout.splitlines()
                     if r.startswith("-A ")]
            if not rules:
                self.ns.run("nft", "delete", "table", family, table)

    # ---------------------------------------------------------------- nft dup

    def _install_dup(self) -> None:
        n = max(1, round(self.duplicate * 10000))
        rnd = f"numgen random mod 10000 < {n}"
        l4 = f"meta l4proto {self.proto} " if self.proto else ""
        lines = []
        if "out" in self.directions:
            lines.append(f"table netdev {self.tag} {{")
            for i, dev in enumerate(self.devices):
                lines += [f"  chain out{i} {{",
                          f'    type filter hook egress device "{dev}" priority 0; policy accept;',
                          f"    meta protocol {{ ip, ip6 }} {l4}{rnd} counter "
                          f'dup to "{dev}" comment "{dev}/out"',
                          "  }"]
            lines.append("}")
        if "in" in self.directions:
            for family, addr in (("ip", "ip daddr"), ("ip6", "ip6 daddr")):
                lines += [f"table {family} {self.tag} {{",
                          "  chain in {",
                          "    type filter hook prerouting priority 0; policy accept;"]
                for dev in self.devices:
                    lines.append(f'    iifname "{dev}" {l4}fib daddr type local {rnd} counter '
                                 f'dup to {addr} comment "{dev}/in"')
                lines += ["  }", "}"]
        script = self.workdir / "dup.nft"
        script.write_text("\n".join(lines) + "\n")
        for family in ("netdev", "ip", "ip6"):
            self._undo.append((f"nft {family} {self.tag}",
                               lambda family=family: self._delete_nft_table(family)))
        self.ns.run("nft", "-f", str(script))
        self._undo.append(("dup counters", self._save_dup_counts))

    def _save_dup_counts(self) -> None:
        self._final_dups = self._dup_counts()

    def _delete_nft_table(self, family: str) -> None:
        if f"table {family} {self.tag}" in self._tables_now():
            self.ns.run("nft", "delete", "table", family, self.tag)

    def _dup_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(self.points, 0)
        if self.duplicate <= 0:
            return counts
        for family in ("netdev", "ip", "ip6"):
            res = self.ns.run("nft", "-j", "list", "table", family, self.tag, check=False)
            if res.returncode:
                continue
            for item in json.loads(res.stdout)["nftables"]:
                rule = item.get("rule")
                if not rule or rule.get("comment") not in counts:
                    continue
                for expr in rule["expr"]:
                    if "counter" in expr:
                        counts[rule["comment"]] += expr["counter"]["packets"]
        return counts

    # ---------------------------------------------------------------- impairer process

    def _stop_impairer(self) -> None:
        # Teardown runs in reverse: the queue rules are gone, nothing new is queued; the
        # impairer accepts what it still holds and writes its final counters.
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("nfqueue impairer ignored SIGTERM") from None

    def _dup_counts_safe(self) -> dict[str, int]:
        try:
            return self._dup_counts()
        except Exception:
            return {}

    def _log(self) -> str:
        path = self.workdir / "impairer.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    # ---------------------------------------------------------------- counters

    def stats(self) -> ImpairStats:
        """Live counters (the impairer rewrites them every ~0.3 s)."""
        if self.final is not None:
            return self.final
        alive = self.proc is not None and self.proc.poll() is None
        return self._read_stats(alive=alive, final=False)

    def _read_stats(self, *, alive: bool, final: bool) -> ImpairStats:
        raw: dict = {}
        path = self.workdir / "stats.json" if self.workdir else None
        with contextlib.suppress(OSError, ValueError):
            raw = json.loads(path.read_text()) if path else {}
        dups = self._final_dups if final else self._dup_counts_safe()
        points = {}
        for name, q in self.points.items():
            p = raw.get("points", {}).get(name, {})
            points[name] = PointStats(
                name=name, queue=q, seen=p.get("seen", 0), accepted=p.get("accepted", 0),
                dropped=p.get("dropped", 0), held=p.get("held", 0),
                reordered=p.get("reordered", 0), delayed=p.get("delayed", 0),
                duplicated=dups.get(name, 0), max_len=p.get("max_len", 0),
                bytes=p.get("bytes", 0), ipv6=p.get("ipv6", 0), queued_by_rule=self._rule_counts.get(name, 0))
        if final and not raw.get("final"):
            alive = False  # it never wrote its final report: it died or was killed
        return ImpairStats(points=points, alive=alive, enobufs=raw.get("enobufs", 0),
                           verdict_errors=raw.get("verdict_errors", 0),
                           kernel=raw.get("kernel", {}), log=self._log()[-2000:])

    def assert_impaired(self, *, per_point: Iterable[str] = ("dropped", "reordered"),
                        per_device: Iterable[str] = ("duplicated",)) -> ImpairStats:
        """Fail unless the impairer was alive at the end, (almost) nothing passed unimpaired,
        every point (device + direction) lost and reordered packets, and every device
        duplicated some (either direction: at 1% a single point may see only a few
        hundred packets). Stops the impairment if still running; returns the counters."""
        st = self.stop()
        problems = []
        if not st.alive:
            problems.append("the impairer was not alive at the end (--queue-bypass let "
                            "packets through unimpaired)")
        if st.verdict_errors:
            problems.append(f"{st.verdict_errors} verdict errors")
        for p in st.points.values():
            problems += [f"{p.name}: no packet {c}" for c in per_point if getattr(p, c) <= 0]
            if p.unimpaired > p.queued_by_rule // 100:  # more than 1%: not the asked impairment
                problems.append(f"{p.name}: {p.unimpaired} of {p.queued_by_rule} packets "
                                "passed unimpaired (impairer dead or overrun)")
        for dev in self.devices:
            mine = [p for p in st.points.values() if p.name.rsplit("/", 1)[0] == dev]
            for c in per_device:
                if c == "duplicated" and self.duplicate <= 0:
                    continue
                if sum(getattr(p, c) for p in mine) <= 0:
                    problems.append(f"{dev}: no packet {c}")
        assert not problems, "impairment did not happen as asked:\n" + "\n".join(
            problems) + "\n" + st.summary() + "\n" + st.log
        return st


def impair(ns: Netns, devices: Iterable[str], *, loss: float = 0.05, reorder: float = 0.25,
           duplicate: float = 0.01, seed: int = 0, **kw) -> Impairment:
    """Context manager: impair packets leaving and arriving through `devices` of `ns`."""
    return Impairment(ns, devices, loss=loss, reorder=reorder, duplicate=duplicate,
                      seed=seed, **kw)
