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


def too_deep_match(sel: ResolvedSelection, path: str) -> tuple[str, ...]:
    """The pattern kinds ("skip", "only") that match a cgroup deeper than MAX_LEVEL with no
    matching ancestor at a level a set can hold: the user asked for that cgroup, and the
    rules cannot select it (it stays whatever its ancestors make it)."""
    parts = [part for part in path.split("/") if part]
    if len(parts) <= MAX_LEVEL:
        return ()
    kinds: list[str] = []
    for kind, patterns in (("skip", sel.skip_cgroups), ("only", sel.only_cgroups)):
        if not any(_compiled(p).search(path) for p in patterns):
            continue
        ancestors = ("/" + "/".join(parts[:n]) for n in range(1, MAX_LEVEL + 1))
        if not any(_compiled(p).search(a) for a in ancestors for p in patterns):
            kinds.append(kind)
    return tuple(kinds)


def unanchored_skips(sel: ResolvedSelection) -> tuple[str, ...]:
    """--skip-cgroup patterns not anchored at the start of the path (^ or \\A): anyone who
    can create a cgroup (a delegated subtree: every systemd user) can name one to match
    such a pattern, and whatever runs there escapes capture and the killswitch."""
    return tuple(p for p in sel.skip_cgroups if not p.startswith(("^", "\\A")))


def needs_watch(sel: ResolvedSelection, path: str) -> bool:
    """Whether the watcher must watch directory `path` (relative to the cgroup2 root) for
    subdirectories appearing in it. With --only-cgroup/--skip-cgroup patterns every
    directory (any cgroup can match); without, only what the exec sets need: the root, to
    see the exec directory being created, and the exec directory's subtree. Watches are a
    per-user kernel budget (fs.inotify.max_user_watches), and hosts can have many cgroups."""
    if sel.only_cgroups or sel.skip_cgroups or path == "/":
        return True
    if not sel.exec_cgroup:
        return False
    base = f"/{sel.exec_cgroup}"
    return path == base or path.startswith(base + "/")


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


_NFT_SAFE_PATH = re.compile(r"[A-Za-z0-9_@.:+=,%/-]+")
"""cgroup paths the table may name in its initial set elements: nft's quoted strings take
no '"' (it is dropped), and a name that is not UTF-8 cannot be encoded at all. Any user
can create such a cgroup in their delegated subtree; it must not make `up` fail."""


def nft_safe_path(path: str) -> bool:
    """`path` can be written into the nft ruleset text as a set element. The others are
    added by the watcher right after the table loads, through /proc/self/fd/N."""
    return _NFT_SAFE_PATH.fullmatch(path) is not None


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
    it what inotify reports and applies what it returns in one nft batch.

    The tracker's state must be what the nft sets hold. created()/removed()/reconcile()
    change it as they compute, so the watcher wraps each batch in begin() ... commit()
    once nft accepted it, or rollback() when anything failed (the batch is atomic, so
    the sets are as they were at begin()); a later reconcile() then retries."""

    def __init__(self, sel: ResolvedSelection, held: Iterable[tuple[str, int]] = ()) -> None:
        """`held`: (path, id) of the cgroups the loaded table already contains."""
        self._sel = sel
        self._held: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._saved: dict[str, tuple[int, tuple[str, ...]]] | None = None
        self._deep_seen: set[str] = set()
        self._deep_new: list[tuple[str, tuple[str, ...]]] = []
        for path, cid in held:
            names = sets_for(sel, path)
            if names:
                self._held[path] = (cid, names)

    @property
    def held(self) -> dict[str, int]:
        """path -> id of every cgroup currently in some set."""
        return {path: cid for path, (cid, _) in self._held.items()}

    # ------------------------------------------------------------- transactions

    def begin(self) -> None:
        """Remember the current state (what nft holds) before computing a batch."""
        self._saved = dict(self._held)

    def commit(self) -> None:
        """nft accepted the batch: the computed state is now what it holds."""
        self._saved = None

    def rollback(self) -> None:
        """The batch failed (or was never sent): back to the state at begin()."""
        if self._saved is not None:
            self._held = self._saved
            self._saved = None

    def forget(self, path: str, cid: int) -> None:
        """An added cgroup could not be named to nft (gone already): it is in no set."""
        entry = self._held.get(path)
        if entry is not None and entry[0] == cid:
            del self._held[path]

    def pop_too_deep(self) -> list[tuple[str, tuple[str, ...]]]:
        """(path, kinds) of cgroups seen since the last call that a pattern matches but no
        set can hold (see too_deep_match); each path is reported once."""
        out, self._deep_new = self._deep_new, []
        return out

    # ------------------------------------------------------------- events

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
        elif path not in self._deep_seen:
            kinds = too_deep_match(self._sel, path)
            if kinds:
                self._deep_seen.add(path)
                self._deep_new.append((path, kinds))
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
        place, this catches whatever changed between reading the facts and watching, and
        after a failure it re-sends whatever the sets lack."""
        changes: list[Change] = []
        for path, (cid, _) in list(self._held.items()):
            if scan.get(path) != cid:
                changes += self._drop(path)
        for path, cid in scan.items():
            changes += self.created(path, cid)
        return changes

    def _drop(self, path: str) -> list[Change]:
        cid, names = self._held.pop(path)
        return [Change(False, name, path, cid) for name in names]
