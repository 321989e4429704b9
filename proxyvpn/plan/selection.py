"""Per-app routing, pure part: which local traffic is captured, and which cgroup ids belong
in which nftables set as cgroups come and go.

The selection is one regular nftables chain (built in proxyvpn.plan.nft) that both the
capture chain and the killswitch jump to: `accept` there means "unselected, leave it alone"
(no mark, not blocked), `return` means "selected" (captured, and held by the killswitch).
Order, first match wins: proxyvpn exec --direct, proxyvpn exec, --skip-*, --only-*; with
any --only-* the rest is unselected, without one it is selected (the whole host).

cgroups are matched by `socket cgroupv2 level N @set`: the socket's cgroup or its ancestor
at depth N (the root is level 0) is in the set. A pattern that matches a cgroup therefore
covers everything below it. Sets hold cgroup ids (inode numbers), one set per kind and
level, so the watcher (proxyvpn.system.cgwatch) changes their contents and never the rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from proxyvpn.config import Config
from proxyvpn.errors import ConfigError
from proxyvpn.plan.facts import HostFacts

MAX_LEVEL = 8
"""Deepest cgroup level a pattern can select. systemd puts desktop apps at level 5
(/user.slice/user-1000.slice/user@1000.service/app.slice/app-x@1.service); each level
costs one set lookup per packet, so the rule count stays bounded."""

EXEC_MODES = ("capture", "direct")
"""`proxyvpn exec` leaf cgroups under <cgroup2>/<exec_cgroup>/: captured / bypassing."""

EXEC_LEVEL = 2
"""Depth of the exec leaves: /<exec_cgroup>/capture."""


@dataclass(frozen=True)
class ResolvedSelection:
    """The selection with names resolved to ids; what the nft model is built from."""

    only_uids: tuple[int, ...] = ()
    skip_uids: tuple[int, ...] = ()
    only_gids: tuple[int, ...] = ()
    skip_gids: tuple[int, ...] = ()
    only_cgroups: tuple[str, ...] = ()
    """Regexes searched in cgroup paths relative to the cgroup2 root."""
    skip_cgroups: tuple[str, ...] = ()
    exec_cgroup: str | None = None
    """Name of the exec directory under the cgroup2 root; None without cgroup2."""
    has_only: bool = False
    """An --only-* was given: traffic matching no rule is left alone."""

    @property
    def watches_cgroups(self) -> bool:
        """Some set holds cgroup ids, so a watcher must keep it current."""
        return bool(self.exec_cgroup or self.only_cgroups or self.skip_cgroups)

    def set_names(self) -> tuple[str, ...]:
        """Every cgroup set the table declares, in declaration order."""
        names = [f"exec_{m}" for m in EXEC_MODES] if self.exec_cgroup else []
        for kind, patterns in (("skip", self.skip_cgroups), ("only", self.only_cgroups)):
            if patterns:
                names += [level_set(kind, n) for n in range(1, MAX_LEVEL + 1)]
        return tuple(names)


def level_set(kind: str, level: int) -> str:
    """Name of the set of cgroups at `level` matching an --only-cgroup ("only") or
    --skip-cgroup ("skip") pattern."""
    return f"cg_{kind}_l{level}"


def exec_path(exec_cgroup: str, mode: str) -> str:
    """The path (relative to the cgroup2 root) of an exec leaf: /proxyvpn/capture."""
    if mode not in EXEC_MODES:
        raise ValueError(f"not an exec mode: {mode!r}")
    return f"/{exec_cgroup}/{mode}"


def cgroup_level(path: str) -> int:
    """Depth of a cgroup path: "/" is 0, "/a" is 1, "/a/b" is 2."""
    return len([part for part in path.split("/") if part])


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def sets_for(sel: ResolvedSelection, path: str) -> tuple[str, ...]:
    """The sets a cgroup at `path` belongs in (empty: none)."""
    names: list[str] = []
    if sel.exec_cgroup:
        names += [f"exec_{m}" for m in EXEC_MODES if path == exec_path(sel.exec_cgroup, m)]
    level = cgroup_level(path)
    if 1 <= level <= MAX_LEVEL:
        for kind, patterns in (("skip", sel.skip_cgroups), ("only", sel.only_cgroups)):
            if any(_compiled(p).search(path) for p in patterns):
                names.append(level_set(kind, level))
    return tuple(names)


def _resolve_ids(names: Iterable[str], table: Mapping[str, int], what: str,
                 flag: str) -> tuple[int, ...]:
    out: list[int] = []
    for name in names:
        if name.isdigit():
            out.append(int(name))
        elif name in table:
            out.append(table[name])
        else:
            raise ConfigError(f"{flag} {name}: no such {what}")
    return tuple(sorted(set(out)))


def resolve_selection(config: Config, facts: HostFacts) -> ResolvedSelection:
    """Resolve user and group names (numeric ids pass as they are). ConfigError for an
    unknown name, or for a cgroup pattern without a cgroup2 filesystem."""
    s = config.selection
    if (s.only_cgroups or s.skip_cgroups) and facts.cgroup2 is None:
        raise ConfigError("--only-cgroup/--skip-cgroup need the cgroup v2 filesystem, and "
                          "none is mounted (see /proc/self/mounts)")
    return ResolvedSelection(
        only_uids=_resolve_ids(s.only_users, facts.users, "user", "--only-user"),
        skip_uids=_resolve_ids(s.skip_users, facts.users, "user", "--skip-user"),
        only_gids=_resolve_ids(s.only_groups, facts.groups, "group", "--only-group"),
        skip_gids=_resolve_ids(s.skip_groups, facts.groups, "group", "--skip-group"),
        only_cgroups=s.only_cgroups,
        skip_cgroups=s.skip_cgroups,
        exec_cgroup=config.exec_cgroup if facts.cgroup2 is not None else None,
        has_only=s.has_only,
    )


def nft_cgroup_ref(absolute: str) -> str:
    """How to name a cgroup to nft: nft (1.0.x) resolves a cgroupsv2 element by stat()ing
    "/sys/fs/cgroup/" + the string, whatever the real mount point, and accepts no numeric
    id; going up three levels first makes any absolute path (a hybrid layout's
    /sys/fs/cgroup/unified/..., or /proc/self/fd/N for a cgroup already removed) work."""
    return "../../.." + absolute


# ---------------------------------------------------------------- the tracker


@dataclass(frozen=True)
class Change:
    """One set element to add or delete."""

    add: bool
    """True: add the element; False: delete it."""
    set: str
    """Set name in table inet proxyvpn."""
    path: str
    """cgroup path relative to the cgroup2 root (for the log and for finding its fd)."""
    id: int
    """cgroup id (inode number of its directory)."""


class CgroupTracker:
    """Which cgroup is in which set: events in, set changes out. Pure; the watcher feeds
    it what inotify reports and applies what it returns in one nft batch."""

    def __init__(self, sel: ResolvedSelection, held: Iterable[tuple[str, int]] = ()) -> None:
        """`held`: (path, id) of the cgroups the loaded table already contains."""
        self._sel = sel
        self._held: dict[str, tuple[int, tuple[str, ...]]] = {}
        for path, cid in held:
            names = sets_for(sel, path)
            if names:
                self._held[path] = (cid, names)

    @property
    def held(self) -> dict[str, int]:
        """path -> id of every cgroup currently in some set."""
        return {path: cid for path, (cid, _) in self._held.items()}

    def created(self, path: str, cid: int) -> list[Change]:
        """A cgroup appeared (or was renamed to `path`)."""
        old = self._held.get(path)
        if old is not None and old[0] == cid:
            return []
        changes = self._drop(path) if old is not None else []
        names = sets_for(self._sel, path)
        if names:
            self._held[path] = (cid, names)
            changes += [Change(True, name, path, cid) for name in names]
        return changes

    def removed(self, path: str) -> list[Change]:
        """A cgroup disappeared; so did everything below it (rmdir needs an empty cgroup,
        but a missed event must not leave a stale descendant behind)."""
        prefix = path.rstrip("/") + "/"
        changes: list[Change] = []
        for held in [p for p in self._held if p == path or p.startswith(prefix)]:
            changes += self._drop(held)
        return changes

    def reconcile(self, scan: Mapping[str, int]) -> list[Change]:
        """Bring the sets in line with a full scan (path -> id): after the watches are in
        place, this catches whatever changed between reading the facts and watching."""
        changes: list[Change] = []
        for path, (cid, _) in list(self._held.items()):
            if scan.get(path) != cid:
                changes += self._drop(path)
        for path, cid in scan.items():
            changes += self.created(path, cid)
        return changes

    def undo(self, changes: Iterable[Change]) -> None:
        """Forget changes the kernel refused (the batch failed as a whole)."""
        for change in changes:
            if change.add:
                entry = self._held.get(change.path)
                if entry is not None and entry[0] == change.id:
                    del self._held[change.path]
            else:
                entry = self._held.get(change.path)
                names = entry[1] if entry else ()
                self._held[change.path] = (change.id, tuple(sorted({*names, change.set})))

    def _drop(self, path: str) -> list[Change]:
        cid, names = self._held.pop(path)
        return [Change(False, name, path, cid) for name in names]
