"""iptables/ip6tables through iptables-restore --noflush: load our chains, verify, remove.

Whatever `iptables` the host has (Debian's alternative: iptables-nft, or iptables-legacy)
is used. Every change is one restore document (committed table by table, see
proxyvpn.plan.iptables), never a sequence of single-rule commands. The
existing ruleset is only read with a plain `iptables-save` (never `-t TABLE`: iptables-nft
then prints a table that does not exist) and is never flushed: --noflush, and we only ever
delete our own chains, the jumps we inserted, and tables we created that are left empty.
"""

from __future__ import annotations

import errno
import functools
import logging
import subprocess
from dataclasses import dataclass

from proxyvpn.plan.iptables import TABLES, tool
from proxyvpn.privileges import child_preexec
from proxyvpn.system.firewall import iptables_binary

log = logging.getLogger("proxyvpn.system")

_TIMEOUT = 30


class IptablesError(OSError):
    """An iptables command failed; .errno is EEXIST/ENOENT/EPERM where the message says so."""


@functools.cache
def _binary(family: int, what: str) -> str:
    """The nf_tables flavour (system/firewall.py says why); the plain name if none is
    found, so that the error names what is missing."""
    return iptables_binary(family, what) or (f"ip6tables-{what}" if family == 6
                                             else f"iptables-{what}")


def _error(what: str, message: str) -> IptablesError:
    text = " ".join(line.strip() for line in message.strip().splitlines()
                    if line.strip() and not line.startswith("Try `"))
    if "already exists" in text:
        code = errno.EEXIST
    elif "does not exist" in text or "No chain/target/match by that name" in text:
        code = errno.ENOENT
    elif "Permission denied" in text or "Operation not permitted" in text:
        code = errno.EPERM
    else:
        code = errno.EIO
    return IptablesError(code, f"{what}: {text or 'failed'}")


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False, preexec_fn=child_preexec)
    except FileNotFoundError:
        raise IptablesError(errno.ENOENT, f"{argv[0]} not found (install iptables)") from None


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Table:
    """One table as iptables-save shows it."""

    chains: dict[str, str]
    """Chain name -> policy ("ACCEPT", "DROP"; "-" for a user-defined chain)."""
    rules: tuple[str, ...]
    """The "-A CHAIN ..." lines, in order."""


def parse_save(text: str) -> dict[str, Table]:
    """Tables of an iptables-save dump by name; comments and counters are dropped."""
    tables: dict[str, Table] = {}
    name: str | None = None
    chains: dict[str, str] = {}
    rules: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name, chains, rules = line[1:], {}, []
        elif line == "COMMIT" and name is not None:
            tables[name] = Table(chains, tuple(rules))
            name = None
        elif line.startswith(":") and name is not None:
            chain, policy, *_ = line[1:].split()
            chains[chain] = policy
        elif line.startswith("-A ") and name is not None:
            rules.append(line)
    return tables


def dump(family: int) -> dict[str, Table]:
    """The family's whole ruleset, parsed."""
    binary = _binary(family, "save")
    proc = _run([binary])
    if proc.returncode != 0:
        raise _error(f"{binary} failed", proc.stderr)
    return parse_save(proc.stdout)


def existing_tables() -> frozenset[str] | None:
    """The tables that exist, as "4/mangle", "6/filter"...; None when they cannot be read
    (iptables missing, or no CAP_NET_ADMIN as in a dry run)."""
    out: set[str] = set()
    for family in (4, 6):
        try:
            out |= {f"{family}/{name}" for name in dump(family)}
        except OSError as exc:
            log.debug("cannot read the %s ruleset: %s", _binary(family, "save"), exc)
            return None
    return frozenset(out)


def _split(item: str) -> tuple[str, str]:
    table, rest = item.split("/", 1)
    return table, rest


def _jump_rule(jump: str) -> tuple[str, str]:
    table, builtin, target = jump.split("/")
    return table, f"-A {builtin} -j {target}"


# ---------------------------------------------------------------- changing


def _restore(family: int, text: str, what: str) -> None:
    binary = _binary(family, "restore")
    # -w: wait for the xtables lock (iptables-legacy) instead of failing when another
    # iptables command runs at the same moment.
    proc = _run([binary, "-w", "10", "--noflush"], text)
    if proc.returncode != 0:
        raise _error(what, proc.stderr)


def load(family: int, text: str, chains: tuple[str, ...], jumps: tuple[str, ...]) -> None:
    """Run the restore document that creates our chains and jumps, then verify them.

    EEXIST when one of our chains exists already (nothing is changed then). The check
    comes first because iptables-restore commits table by table: a clash found by `-N` in
    the second table would leave the first one applied.
    """
    present = dump(family)
    clash = [c for c in chains
             if _split(c)[1] in present.get(_split(c)[0], Table({}, ())).chains]
    if clash:
        raise IptablesError(errno.EEXIST, (
            f"{tool(family)} chain(s) {', '.join(clash)} already exist: another proxyvpn is "
            "running or one died without `proxyvpn down`"))
    try:
        _restore(family, text, f"{_binary(family, 'restore')} rejected the ruleset")
    except IptablesError as exc:
        if exc.errno == errno.EEXIST:
            raise IptablesError(errno.EEXIST, (
                f"{tool(family)} chain(s) "
                f"{', '.join(chains)} already exist: another proxyvpn is running or one died "
                "without `proxyvpn down`")) from exc
        raise
    verify(family, chains, jumps)


def verify(family: int, chains: tuple[str, ...], jumps: tuple[str, ...]) -> None:
    """Every chain and jump is in place (IptablesError ENOENT otherwise)."""
    tables = dump(family)
    missing = [c for c in chains
               if _split(c)[1] not in tables.get(_split(c)[0], Table({}, ())).chains]
    for jump in jumps:
        table, rule = _jump_rule(jump)
        if rule not in tables.get(table, Table({}, ())).rules:
            missing.append(jump)
    if missing:
        raise IptablesError(errno.ENOENT, f"{', '.join(missing)} missing after loading")


def _pristine(table: Table) -> bool:
    """Only built-in chains, all with policy ACCEPT, and no rules: what iptables-nft leaves
    behind in a table it created for us."""
    return not table.rules and all(policy == "ACCEPT" for policy in table.chains.values())


def remove(family: int, chains: tuple[str, ...], jumps: tuple[str, ...],
           new_tables: tuple[str, ...] = ()) -> bool:
    """Delete whichever of our jumps and chains still exist, in one transaction, then the
    tables in `new_tables` if nothing but empty built-in chains is left in them. False
    when there was nothing to remove (already gone)."""
    tables = dump(family)
    lines: list[str] = []
    for name in TABLES:
        table = tables.get(name)
        if table is None:
            continue
        section: list[str] = []
        for jump in jumps:
            jt, rule = _jump_rule(jump)
            if jt == name:
                # Every copy: a crashed instance's leftover jump would otherwise stay.
                section += ["-D" + rule[2:]] * table.rules.count(rule)
        for chain in chains:
            ct, cname = _split(chain)
            if ct == name and cname in table.chains:
                section += [f"-F {cname}", f"-X {cname}"]
        if section:
            lines += [f"*{name}", *section, "COMMIT"]
    did = bool(lines)
    if lines:
        _restore(family, "\n".join(lines) + "\n",
                 f"{_binary(family, 'restore')} could not remove our chains")
    if new_tables:
        did |= _drop_created_tables(family, new_tables)
    return did


def _drop_created_tables(family: int, new_tables: tuple[str, ...]) -> bool:
    """iptables-nft creates a table (as nftables table `ip mangle`...) on first use and
    keeps it, empty, after our chains are gone; iptables has no command to delete a
    table, nft does. (Only the nf_tables flavour is ever used: system/firewall.py.)"""
    from proxyvpn.system import nft

    tables = dump(family)
    did = False
    for name in new_tables:
        table = tables.get(name)
        if table is None or not _pristine(table):
            continue
        try:
            did |= nft.delete_table("ip6" if family == 6 else "ip", name)
        except OSError as exc:  # no nft at all: the empty table stays, harmlessly
            log.debug("cannot delete the empty table %s %s: %s", tool(family), name, exc)
    return did
