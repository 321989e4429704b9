"""Per-app routing: config parsing, name resolution, cgroup matching, the tracker, the nft
element batches and the dry-run rendering. No root needed."""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import os
import re
import struct
import time
from types import SimpleNamespace

import pytest
from test_plan import CG_FACTS, FACTS, IPT_FACTS, config

from proxyvpn.config import build_config, load_config_file
from proxyvpn.errors import ConfigError
from proxyvpn.plan import nft
from proxyvpn.plan.build import build_plan
from proxyvpn.plan.render import plan_to_dict, render_commands
from proxyvpn.plan.selection import (
    CgroupTracker,
    Change,
    ResolvedSelection,
    cgroup_level,
    needs_watch,
    nft_cgroup_ref,
    nft_safe_path,
    resolve_selection,
    sets_for,
    too_deep_match,
    unanchored_skips,
)
from proxyvpn.system import nft as nft_system
from proxyvpn.system.cgroups import parse_cgroup2_mount, relative
from proxyvpn.system.cgwatch import (
    IN_CREATE,
    IN_ISDIR,
    CgroupWatcher,
    WatchError,
    parse_events,
)
from proxyvpn.system.nft import NftError

# ---------------------------------------------------------------- config


def test_selection_flags_parse_and_deduplicate():
    cfg = build_config({"proxy_url": "http://p:1", "only_user": ("alice", "alice", "0"),
                        "skip_cgroup": (r"^/system\.slice",), "only_group": "proxied"})
    assert cfg.selection.only_users == ("alice", "0")
    assert cfg.selection.only_groups == ("proxied",)
    assert cfg.selection.skip_cgroups == (r"^/system\.slice",)
    assert cfg.selection.has_only and cfg.selection.active
    assert not build_config({"proxy_url": "http://p:1"}).selection.active


def test_invalid_regex_is_one_line_error():
    with pytest.raises(ConfigError, match=r"--only-cgroup: '\(x' is not a valid regular"):
        build_config({"proxy_url": "http://p:1", "only_cgroup": ("(x",)})


@pytest.mark.parametrize("name", ["a/b", "..", "", "x y"])
def test_exec_cgroup_must_be_one_plain_name(name):
    with pytest.raises(ConfigError, match="--exec-cgroup"):
        build_config({"proxy_url": "http://p:1", "exec_cgroup": name})


def test_config_file_selection_keys(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('only-cgroup = "firefox"\nskip-user = ["bob"]\nexec-cgroup = "pv"\n')
    settings = load_config_file(path)
    cfg = build_config({"proxy_url": "http://p:1", **settings})
    assert cfg.selection.only_cgroups == ("firefox",)
    assert cfg.selection.skip_users == ("bob",)
    assert cfg.exec_cgroup == "pv"


# ---------------------------------------------------------------- resolution


def test_names_resolve_from_facts_and_numbers_pass():
    cfg = config(only_user=["alice", "1001"], skip_group=["nogroup"])
    facts = dataclasses.replace(FACTS, users={"alice": 1000}, groups={"nogroup": 65534})
    sel = resolve_selection(cfg, facts)
    assert sel.only_uids == (1000, 1001) and sel.skip_gids == (65534,)
    assert sel.exec_cgroup is None  # no cgroup2 in these facts


@pytest.mark.parametrize("key,flag,what", [("only_user", "--only-user", "user"),
                                           ("skip_group", "--skip-group", "group")])
def test_unknown_name_is_one_line_error(key, flag, what):
    with pytest.raises(ConfigError, match=f"^{flag} ghost: no such {what}$"):
        build_plan(config(**{key: ["ghost"]}), FACTS)


def test_cgroup_pattern_without_cgroup2_is_refused():
    with pytest.raises(ConfigError, match="cgroup v2"):
        build_plan(config(only_cgroup=["x"]), FACTS)


def test_iptables_backend_refuses_selection_in_one_line():
    with pytest.raises(ConfigError, match="needs the nftables backend"):
        build_plan(config(only_user=["0"]), IPT_FACTS)
    # Without flags the iptables plan has no selection (and no exec rules).
    assert build_plan(config(), dataclasses.replace(IPT_FACTS, cgroup2="/x")).selection is None


# ---------------------------------------------------------------- matching


SEL = ResolvedSelection(only_cgroups=(r"app-firefox@\d+\.service$",),
                        skip_cgroups=(r"^/system\.slice",), exec_cgroup="proxyvpn",
                        has_only=True)


def test_levels():
    assert [cgroup_level(p) for p in ("/", "/a", "/a/b", "/a/b/c/")] == [0, 1, 2, 3]


def test_sets_for_paths():
    assert sets_for(SEL, "/proxyvpn/capture") == ("exec_capture",)
    assert sets_for(SEL, "/proxyvpn/direct") == ("exec_direct",)
    assert sets_for(SEL, "/proxyvpn") == ()
    assert sets_for(SEL, "/system.slice") == ("cg_skip_l1",)
    assert sets_for(SEL, "/user.slice/u/app.slice/app-firefox@12.service") == ("cg_only_l4",)
    assert sets_for(SEL, "/user.slice/u/app.slice/app-firefox@12.service/sub") == ()
    deep = "/" + "/".join(["d"] * 9) + "/app-firefox@1.service"
    assert sets_for(SEL, deep) == ()  # beyond MAX_LEVEL: no set to hold it


def test_tracker_create_remove_and_reconcile():
    tracker = CgroupTracker(SEL, [("/system.slice", 4), ("/unrelated", 9)])
    assert tracker.held == {"/system.slice": 4}
    assert tracker.created("/system.slice", 4) == []  # already held: nothing to do
    assert tracker.created("/a/app-firefox@1.service", 20) == [
        Change(True, "cg_only_l2", "/a/app-firefox@1.service", 20)]
    assert tracker.created("/a/other", 21) == []
    # Same path, new cgroup (removed and re-created between two looks): swap the id.
    assert tracker.created("/a/app-firefox@1.service", 22) == [
        Change(False, "cg_only_l2", "/a/app-firefox@1.service", 20),
        Change(True, "cg_only_l2", "/a/app-firefox@1.service", 22)]
    assert tracker.removed("/a") == [
        Change(False, "cg_only_l2", "/a/app-firefox@1.service", 22)]
    assert tracker.removed("/a") == []
    changes = tracker.reconcile({"/proxyvpn/capture": 30})
    assert Change(False, "cg_skip_l1", "/system.slice", 4) in changes
    assert Change(True, "exec_capture", "/proxyvpn/capture", 30) in changes
    assert tracker.held == {"/proxyvpn/capture": 30}


def test_tracker_rollback_restores_what_nft_holds_and_reconcile_resends_it():
    tracker = CgroupTracker(SEL, [("/system.slice", 4)])
    tracker.begin()
    assert tracker.created("/proxyvpn/direct", 8)
    assert tracker.removed("/system.slice")
    tracker.rollback()  # nft refused the batch: the sets are as they were
    assert tracker.held == {"/system.slice": 4}
    # The retry (a rescan) computes the same changes again, and they stick on commit.
    tracker.begin()
    changes = tracker.reconcile({"/proxyvpn/direct": 8})
    assert set(changes) == {Change(True, "exec_direct", "/proxyvpn/direct", 8),
                            Change(False, "cg_skip_l1", "/system.slice", 4)}
    tracker.commit()
    tracker.rollback()  # nothing to roll back after a commit
    assert tracker.held == {"/proxyvpn/direct": 8}
    tracker.forget("/proxyvpn/direct", 7)  # another id: kept
    tracker.forget("/proxyvpn/direct", 8)
    assert tracker.held == {}


def test_tracker_reports_too_deep_matches_once():
    deep = "/" + "/".join(["d"] * 9) + "/app-firefox@1.service"
    tracker = CgroupTracker(SEL)
    assert tracker.created(deep, 50) == []
    assert tracker.created(deep, 51) == []
    assert tracker.pop_too_deep() == [(deep, ("only",))]
    assert tracker.pop_too_deep() == []
    # A matching ancestor within MAX_LEVEL selects it already: nothing to say.
    sel = ResolvedSelection(only_cgroups=("^/a",), has_only=True)
    assert too_deep_match(sel, "/a" + "/x" * 9) == ()
    assert too_deep_match(sel, "/b" + "/x" * 9) == ()  # matches nothing
    assert too_deep_match(sel, "/a/x/y") == ()  # not too deep
    skip = ResolvedSelection(skip_cgroups=("leaf$",))
    assert too_deep_match(skip, "/x" * 8 + "/leaf") == ("skip",)


def test_unanchored_skip_patterns_are_found():
    sel = ResolvedSelection(skip_cgroups=(r"^/system\.slice", "backup", r"\Afoo", "a^"),
                            only_cgroups=("firefox",))
    assert unanchored_skips(sel) == ("backup", "a^")


def test_watch_scope_without_patterns_is_root_and_exec_subtree():
    plain = ResolvedSelection(exec_cgroup="proxyvpn")
    assert needs_watch(plain, "/")
    assert needs_watch(plain, "/proxyvpn") and needs_watch(plain, "/proxyvpn/capture")
    assert not needs_watch(plain, "/user.slice")
    assert not needs_watch(plain, "/proxyvpnx")
    assert not needs_watch(ResolvedSelection(), "/proxyvpn")
    assert needs_watch(SEL, "/user.slice/u/app.slice")
    assert needs_watch(ResolvedSelection(skip_cgroups=("^/x",)), "/y/z")


# ---------------------------------------------------------------- nft


def test_element_batch_groups_by_verb_and_set():
    items = [(Change(True, "exec_capture", "/p/capture", 3), "../../../proc/self/fd/7"),
             (Change(True, "exec_capture", "/q", 4), "../../../proc/self/fd/8"),
             (Change(False, "cg_only_l2", "/a/b", 5), "../../../proc/self/fd/9")]
    assert nft.element_commands(items) == (
        'add element inet proxyvpn exec_capture { "../../../proc/self/fd/7", '
        '"../../../proc/self/fd/8" }\n'
        'delete element inet proxyvpn cg_only_l2 { "../../../proc/self/fd/9" }\n')
    assert nft.element_commands([]) == ""


def test_cgroup_ref_climbs_out_of_nfts_fixed_prefix():
    assert nft_cgroup_ref("/sys/fs/cgroup/unified/a") == "../../../sys/fs/cgroup/unified/a"


def test_selection_chain_order_and_jumps():
    plan = build_plan(config(only_user=["0"], skip_cgroup=["^/system"]), CG_FACTS)
    op = plan.ops[0]
    assert op.load_text
    text = op.text
    sel = text[text.index("chain selection"):text.index("chain capture")]
    order = [sel.index(s) for s in ("@exec_direct accept", "@exec_capture return",
                                    "@cg_skip_l1 accept", "meta skuid 0 return")]
    assert order == sorted(order)
    assert sel.rstrip().rstrip("}").rstrip().endswith("accept")  # --only-*: rest unselected
    capture = text[text.index("chain capture"):text.index("chain killswitch")]
    # A connection already captured stays so (conntrack mark) before selection is asked;
    # what selection returns is marked, and the decision kept on the connection.
    assert (capture.index("ct mark 0x7076 meta mark set 0x7076 return")
            < capture.index("jump selection")
            < capture.index("meta mark set 0x7076 ct mark set 0x7076"))
    ks = text[text.index("chain killswitch {"):text.index("chain killswitch_post")]
    assert ks.index("jump selection") < ks.index("reject with tcp reset")
    assert '"../../../sys/fs/cgroup/unified/system.slice"' in text
    assert nft.chain_names(config(), plan.selection)[0] == "selection"


def test_whole_host_without_cgroup2_has_no_selection_chain():
    plan = build_plan(config(), FACTS)
    assert plan.selection is None and "selection" not in plan.ops[0].text
    assert not plan.ops[0].load_text


def test_exec_rules_exist_without_flags_when_cgroup2_is_there():
    plan = build_plan(config(), CG_FACTS)
    text = plan.ops[0].text
    assert "socket cgroupv2 level 2 @exec_direct accept" in text
    sel = text[text.index("chain selection"):text.index("chain capture")]
    assert sel.count("\n\t\t") == 2  # no final accept: everything else stays selected


# ---------------------------------------------------------------- rendering


def test_dry_run_text_and_json_show_the_selection():
    plan = build_plan(config(only_cgroup=["firefox"], skip_user=["0"]), CG_FACTS)
    text = render_commands(plan)
    assert "# selection: only cgroup firefox; skip uid 0" in text
    assert "# proxyvpn exec cgroups: /sys/fs/cgroup/unified/proxyvpn/capture" in text
    assert "chain selection" in text
    data = plan_to_dict(plan)
    assert list(data["selection"]["only_cgroups"]) == ["firefox"]
    assert list(data["selection"]["skip_uids"]) == [0]
    assert {"path": "/proxyvpn/capture", "id": 3} in data["selection"]["cgroups"]
    assert "# selection: the whole host" in render_commands(build_plan(config(), FACTS))
    assert plan_to_dict(build_plan(config(), FACTS))["selection"] is None


# ---------------------------------------------------------------- system helpers (pure parts)


def test_cgroup2_mount_is_read_not_assumed():
    mounts = ("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nsdelegate 0 0\n")
    assert parse_cgroup2_mount(mounts) == "/sys/fs/cgroup/unified"
    assert parse_cgroup2_mount("none /my\\040cg cgroup2 rw 0 0\n") == "/my cg"
    assert parse_cgroup2_mount("proc /proc proc rw 0 0\n") is None
    assert relative("/sys/fs/cgroup", "/sys/fs/cgroup/a/b") == "/a/b"
    assert relative("/sys/fs/cgroup", "/sys/fs/cgroup") == "/"


def test_inotify_event_parsing():
    name = b"app.service\0\0\0\0\0"
    buf = struct.pack("iIII", 3, IN_CREATE | IN_ISDIR, 0, len(name)) + name
    buf += struct.pack("iIII", 4, IN_CREATE, 0, 0)
    assert parse_events(buf) == [(3, IN_CREATE | IN_ISDIR, "app.service"),
                                 (4, IN_CREATE, "")]


# ---------------------------------------------------------------- the watcher (real inotify)


class FakeNft:
    """nft.load_text for element batches: atomic, and refuses to delete what a set lacks
    (as nft does). `fail`: exceptions to raise on the next loads, in order."""

    def __init__(self) -> None:
        self.sets: dict[str, set[int]] = {}
        self.fail: list[BaseException] = []
        self.loads = 0

    def load_text(self, text: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.loads += 1
        if self.fail:
            raise self.fail.pop(0)
        new = {name: set(ids) for name, ids in self.sets.items()}
        for line in text.splitlines():
            m = re.fullmatch(r"(add|delete) element inet proxyvpn (\S+) \{ (.*) \}", line)
            assert m, line
            for ref in re.findall(r'"([^"]*)"', m[3]):
                fd_path = ref.removeprefix("../../..")
                assert int(fd_path.rsplit("/", 1)[1]) in pass_fds
                cid = os.stat(fd_path).st_ino
                if m[1] == "add":
                    new.setdefault(m[2], set()).add(cid)
                elif cid in new.get(m[2], set()):
                    new[m[2]].discard(cid)
                else:
                    raise NftError(errno.ENOENT, f"no element {cid} in {m[2]}")
        self.sets = new

    def ids(self, name: str) -> set[int]:
        return self.sets.get(name, set())


class FailingWatches:
    """The watcher's libc, with inotify_add_watch failing (errno `err`) for paths ending
    in one of `names`, `times` times each."""

    def __init__(self, libc, names: tuple[str, ...], err: int, times: int = 1) -> None:
        self._libc, self._names, self._err = libc, names, err
        self.left = dict.fromkeys(names, times)

    def inotify_init1(self, flags):
        return self._libc.inotify_init1(flags)

    def inotify_add_watch(self, fd, path, mask):
        for name in self._names:
            if path.endswith(os.fsencode("/" + name)) and self.left[name] > 0:
                self.left[name] -= 1
                ctypes.set_errno(self._err)
                return -1
        return self._libc.inotify_add_watch(fd, path, mask)


@pytest.fixture
def watch(tmp_path, monkeypatch):
    """make(sel) -> a started CgroupWatcher on tmp_path with a FakeNft; run_until(pred)."""
    fake = FakeNft()
    monkeypatch.setattr(nft_system, "load_text", fake.load_text)
    monkeypatch.setattr(CgroupWatcher, "RETRY_FIRST", 0.02)
    loop = asyncio.new_event_loop()
    watchers: list[CgroupWatcher] = []

    def make(sel, libc_wrap=None, start=True):
        w = CgroupWatcher(str(tmp_path), sel)
        if libc_wrap is not None:
            w._libc = libc_wrap(w._libc)
        watchers.append(w)
        if start:
            w.start(loop)
        return w

    def run_until(pred, timeout=3.0):
        async def wait():
            deadline = time.monotonic() + timeout
            while not pred():
                assert time.monotonic() < deadline, "timed out"
                await asyncio.sleep(0.01)
        loop.run_until_complete(wait())

    yield SimpleNamespace(make=make, run_until=run_until, nft=fake, root=tmp_path)
    for w in watchers:
        w.stop()
    loop.close()


ONLY_SEL = ResolvedSelection(only_cgroups=("^/sel-",), exec_cgroup="pv", has_only=True)


@pytest.mark.parametrize("error", [NftError(errno.EINVAL, "nft rejected the ruleset: x"),
                                   OSError(errno.EMFILE, "Too many open files")])
def test_watcher_retries_a_failed_batch_until_the_set_is_in_sync(watch, caplog, error):
    w = watch.make(ONLY_SEL)
    watch.nft.fail = [error, error]  # the event's batch and the first retry fail
    (watch.root / "sel-1").mkdir()
    ino = (watch.root / "sel-1").stat().st_ino
    watch.run_until(lambda: ino in watch.nft.ids("cg_only_l1") and not w.failing)
    assert w._tracker.held == {"/sel-1": ino}
    assert w.rescans >= 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "retrying" in errors[0].getMessage()  # once, loudly
    assert not any(r.exc_info for r in caplog.records)
    # Later events apply normally, and the delete finds the element (nft would refuse
    # to delete one it lacks, which a tracker out of sync with nft would ask for).
    (watch.root / "sel-2").mkdir()
    (watch.root / "sel-1").rmdir()
    ino2 = (watch.root / "sel-2").stat().st_ino
    watch.run_until(lambda: watch.nft.ids("cg_only_l1") == {ino2})
    assert not w.failing and set(w._fds) == {"/sel-2"}


def test_watcher_event_after_a_refused_batch_does_not_double_delete(watch):
    w = watch.make(ONLY_SEL)
    (watch.root / "sel-1").mkdir()
    ino = (watch.root / "sel-1").stat().st_ino
    watch.run_until(lambda: ino in watch.nft.ids("cg_only_l1"))
    w.RETRY_FIRST = w._delay = 5.0  # no retry during this test: only the events count
    watch.nft.fail = [NftError(errno.EIO, "boom")]
    (watch.root / "sel-1").rmdir()  # refused: the element stays, and so must the tracker
    watch.run_until(lambda: w.failing)
    assert w._tracker.held == {"/sel-1": ino} and ino in watch.nft.ids("cg_only_l1")
    w._retry_rescan()  # what the timer does: the element goes
    assert not w.failing and watch.nft.ids("cg_only_l1") == set() and not w._fds


def test_watcher_survives_a_watch_it_cannot_add_and_watches_it_on_retry(watch, caplog):
    w = watch.make(ONLY_SEL, lambda libc: FailingWatches(libc, ("sel-3",), errno.ENOSPC))
    (watch.root / "sel-3").mkdir()
    ino = (watch.root / "sel-3").stat().st_ino
    # The cgroup itself is in the set at once; its watch comes with the retry.
    watch.run_until(lambda: ino in watch.nft.ids("cg_only_l1") and not w.failing)
    assert "/sel-3" in w._wds.values()
    (watch.root / "sel-3" / "sub").mkdir()
    sub = (watch.root / "sel-3" / "sub").stat().st_ino
    watch.run_until(lambda: sub in watch.nft.ids("cg_only_l2"))
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "sysctl -w fs.inotify.max_user_watches=" in errors[0]
    assert "\n" not in errors[0] and not any(r.exc_info for r in caplog.records)


def test_watcher_start_at_the_watch_limit_is_one_clear_error(watch):
    (watch.root / "a").mkdir()
    w = watch.make(ONLY_SEL, lambda libc: FailingWatches(libc, ("a",), errno.ENOSPC),
                   start=False)
    with pytest.raises(WatchError, match=r"fs\.inotify\.max_user_watches") as info:
        w.start(asyncio.new_event_loop())
    assert "\n" not in str(info.value) and w._fd == -1


def test_watcher_without_patterns_watches_only_root_and_exec_subtree(watch):
    for d in ("user.slice/u/app.slice", "system.slice/a", "system.slice/b"):
        (watch.root / d).mkdir(parents=True)
    w = watch.make(ResolvedSelection(exec_cgroup="pv"))
    assert sorted(w._wds.values()) == ["/"]
    (watch.root / "pv" / "capture").mkdir(parents=True)
    ino = (watch.root / "pv" / "capture").stat().st_ino
    watch.run_until(lambda: ino in watch.nft.ids("exec_capture"))
    assert sorted(w._wds.values()) == ["/", "/pv", "/pv/capture"]
    (watch.root / "user.slice" / "new").mkdir()  # not watched: no event, no watch
    (watch.root / "pv" / "direct").mkdir()
    direct = (watch.root / "pv" / "direct").stat().st_ino
    watch.run_until(lambda: direct in watch.nft.ids("exec_direct"))
    assert "/user.slice" not in w._wds.values()
    # With a pattern, the whole tree.
    w2 = watch.make(ResolvedSelection(skip_cgroups=("^/system",), exec_cgroup="pv"))
    assert {"/user.slice/u/app.slice", "/system.slice/b"} <= set(w2._wds.values())


def test_watcher_warns_about_unanchored_skips_and_too_deep_matches(watch, caplog):
    deep = watch.root.joinpath(*["d"] * 9, "leaf-x")
    deep.mkdir(parents=True)
    caplog.set_level(logging.WARNING, logger="proxyvpn.cgroups")
    watch.make(ResolvedSelection(skip_cgroups=("leaf-x$", r"^/nothing"), exec_cgroup="pv"))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [m for m in messages if "'leaf-x$' is not anchored with ^" in m]
    assert not [m for m in messages if "'^/nothing'" in m]
    too_deep = [m for m in messages if "deeper than level 8" in m]
    assert len(too_deep) == 1 and "/d/d/d/d/d/d/d/d/d/leaf-x" in too_deep[0]
    assert "--skip-cgroup" in too_deep[0]


@pytest.mark.parametrize("path, safe", [
    ("/user.slice/user-1000.slice/app-firefox@1.service", True),
    ("/system.slice/systemd-journald.service", True),
    ('/user.slice/a"b', False),          # nft drops the quote: names another cgroup
    ("/user.slice/a\\x2db.scope", False),  # systemd escapes: left to the watcher
    ("/user.slice/caf\udce9", False),     # not UTF-8 (surrogateescape): cannot encode
    ("/user.slice/a b", False),
])
def test_nft_safe_path(path, safe):
    assert nft_safe_path(path) is safe


def test_unsafe_cgroup_names_stay_out_of_the_initial_table():
    """Any user can name a cgroup in their delegated subtree; an odd name must not break
    `up` (nft would refuse or misread it): it is left for the watcher, which names
    cgroups by file descriptor."""
    odd = '/user.slice/user-1000.slice/app-firefox@2.service/x"y'
    facts = dataclasses.replace(CG_FACTS, cgroups=(*CG_FACTS.cgroups, (odd, 9),
                                                   ("/user.slice/caf\udce9", 10)))
    plan = build_plan(config(only_cgroup=[r"app-firefox@\d+\.service"],
                             skip_cgroup=["^/user.slice/caf"]), facts)
    held = dict(plan.cgroups_held)
    assert odd not in held and "/user.slice/caf\udce9" not in held
    assert "/user.slice/user-1000.slice/app-firefox@1.service" in held
    plan.ops[0].text.encode()  # the ruleset text is encodable
