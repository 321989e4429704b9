"""system/tun.py's pure parts: which kernels take GSO packets over 64 KiB."""

from __future__ import annotations

import pytest

from proxyvpn.system.tun import takes_big_ipv4, takes_big_ipv6


@pytest.mark.parametrize(("release", "expected"), [
    ("6.18.44-fc-v1272", True),
    ("6.6.0", True),
    ("6.12.48+deb13-amd64", True),
    ("10.0", True),
    ("6.5.13-7-pve", False),  # the length field, but writes over ~68 KiB fail
    ("6.3.0", False),
    ("6.2.16-arch1", False),
    ("6.1.0-37-amd64", False),  # Debian 12
    ("5.15.0-91-generic", False),
    ("", False),
    ("garbage", False),
])
def test_large_ipv4_segments_need_linux_6_6(release: str, expected: bool) -> None:
    assert takes_big_ipv4(release) is expected


@pytest.mark.parametrize(("release", "expected"), [
    ("6.18.44-fc-v1272", True),
    ("6.6.0", True),
    ("6.19.2", True),
    ("7.0.0", False),  # IPv4's form from 7.0 on: the Hop-by-Hop one is not tried there
    ("7.1-rc1", False),
    ("10.0", False),
    ("6.5.13-7-pve", False),  # the TUN write fails past ~68 KiB, as for IPv4
    ("5.19.0", False),
    ("", False),
    ("garbage", False),
])
def test_large_ipv6_segments_need_linux_6_6_and_not_yet_7(release: str, expected: bool) -> None:
    assert takes_big_ipv6(release) is expected
