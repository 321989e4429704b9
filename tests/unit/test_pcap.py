"""--pcap: the capture holds the plaintext of every captured connection, so the file is
0600 from its first byte, never written through a symbolic link, and never shared with a
reader who opened an older, readable file of the same name."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import dpkt
import pytest

from proxyvpn.aio.engine import _open_pcap
from proxyvpn.errors import ConfigError, ProxyVpnError

PACKET = bytes.fromhex("4500001c000100004011f97cc0000201c000020204d200350008fb4e")


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def _write_one(path: Path) -> None:
    pcap = _open_pcap(path)
    pcap.writepkt(PACKET, 1.5)
    pcap.close()


def _packets(path: Path) -> list[bytes]:
    with open(path, "rb") as fh:
        return [buf for _, buf in dpkt.pcap.Reader(fh)]


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_new_capture_is_0600_with_umask_0_without_a_chmod_by_path(tmp_path, umask0, monkeypatch):
    # A chmod by path comes after the file exists (others may open it meanwhile) and
    # follows a symlink swapped in: the mode must not depend on one.
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    path = tmp_path / "tun.pcap"
    _write_one(path)
    assert _mode(path) == 0o600
    assert _packets(path) == [PACKET]


def test_existing_0644_capture_is_replaced_not_shared(tmp_path, umask0):
    path = tmp_path / "tun.pcap"
    path.write_bytes(b"old capture")
    path.chmod(0o644)
    with open(path, "rb") as earlier_reader:  # someone who opened it while it was 0644
        _write_one(path)
        assert earlier_reader.read() == b"old capture"  # sees none of the new capture
    assert _mode(path) == 0o600
    assert _packets(path) == [PACKET]


def test_existing_private_capture_is_truncated_and_stays_0600(tmp_path):
    path = tmp_path / "tun.pcap"
    path.write_bytes(b"x" * 10000)
    path.chmod(0o600)
    _write_one(path)
    assert _mode(path) == 0o600
    assert _packets(path) == [PACKET]


@pytest.mark.parametrize("dangling", [False, True])
def test_a_symlink_is_refused_with_one_line(tmp_path, dangling):
    target = tmp_path / "victim"
    if not dangling:
        target.write_bytes(b"precious")
        target.chmod(0o644)
    link = tmp_path / "tun.pcap"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link") as info:
        _open_pcap(link)
    assert isinstance(info.value, ProxyVpnError) and "\n" not in str(info.value)
    if dangling:
        assert not target.exists()
    else:
        assert target.read_bytes() == b"precious" and _mode(target) == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mknod")
def test_a_device_is_refused_and_left_alone(tmp_path):
    # `--pcap /dev/null` as root must not chmod /dev/null: a node of our own stands in
    # for it, so that a regression cannot break the host's.
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(null, 0o666)  # whatever the umask
    try:
        with open(null, "wb"):
            pass
    except OSError:
        pytest.skip("device nodes are not usable here (nodev mount)")
    with pytest.raises(ConfigError, match="not a regular file"):
        _open_pcap(null)
    assert _mode(null) == 0o666


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_a_file_of_another_user_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "tun.pcap"
    path.write_bytes(b"theirs")
    path.chmod(0o666)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="not a regular file of this user"):
        _open_pcap(path)
    assert path.read_bytes() == b"theirs" and _mode(path) == 0o666
