"""Per-app routing: config parsing, name resolution, cgroup matching, the tracker, the nft
element batches and the dry-run rendering. No root needed."""

from __future__ import annotations

import dataclasses
import struct

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
    nft_cgroup_ref,
    resolve_selection,
    sets_for,
)
from proxyvpn.system.cgroups import parse_cgroup2_mount, relative
from proxyvpn.system.cgwatch import IN_CREATE, IN_ISDIR, parse_events

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


def test_tracker_undo_restores_state():
    tracker = CgroupTracker(SEL, [("/system.slice", 4)])
    added = tracker.created("/proxyvpn/direct", 8)
    removed = tracker.removed("/system.slice")
    tracker.undo(added + removed)
    assert tracker.held == {"/system.slice": 4}


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
    assert capture.index("jump selection") < capture.index("meta mark set")
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
