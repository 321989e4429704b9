"""The TUN device: created by opening /dev/net/tun, alive as long as we hold the fd.

Not persistent on purpose: if proxyvpn dies, the kernel deletes the interface and every
address and route on it, so captured traffic has nowhere to go but the killswitch.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass, field

log = logging.getLogger("proxyvpn.system")

try:
    from pytun_pmd3.linux import IFF_NO_PI, IFF_TUN, IFF_TUN_EXCL, TunTapDevice
except ImportError:  # pragma: no cover - the dependency is declared; keep the error clear
    TunTapDevice = None  # type: ignore[assignment,misc]
    IFF_TUN, IFF_NO_PI, IFF_TUN_EXCL = 0x0001, 0x1000, 0x8000

IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04


def link_exists(name: str) -> bool:
    """An interface of that name exists in our network namespace (SIOCGIFINDEX)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


@dataclass
class TunHandle:
    """An open TUN device: raw IP packets without packet-information header."""

    name: str
    """Interface name the kernel gave the device."""
    fd: int
    """Non-blocking file descriptor: read() returns one IP packet, write() sends one."""
    vnet: bool
    """Every packet read or written starts with a virtio_net_hdr, and the kernel hands
    over (and takes) 64 KiB TCP segments with partial checksums (TSO/GSO offload)."""
    _device: object = field(repr=False)
    """The pytun_pmd3 TunTapDevice owning the fd (kept so it is not garbage collected)."""
    big_ipv4: bool = False
    """With vnet: the kernel takes IPv4 GSO packets longer than 64 KiB from us
    (takes_big_ipv4())."""
    big_ipv6: bool = False
    """With vnet: the kernel takes IPv6 GSO packets longer than 64 KiB, in the form
    build() gives them (takes_big_ipv6())."""

    @property
    def closed(self) -> bool:
        """The fd was closed (and with it the interface deleted)."""
        return self.fd < 0

    def close(self) -> None:
        """Close the fd; the kernel then deletes the interface. Idempotent."""
        if self.fd >= 0:
            self._device.close()  # type: ignore[attr-defined]
            log.debug("closed TUN %s", self.name)
            self.fd = -1


TUN_TXQUEUELEN = 10000
"""The default 500 packets overflowed when the engine fell behind a bulk upload: the kernel
dropped thousands of packets and the app waited on retransmission timeouts (bench, 2026-11-24:
8-flow upload 31.6 -> 77.5 MB/s with 10000)."""


def _set_txqueuelen(name: str, qlen: int) -> None:
    """SIOCSIFTXQLEN on the interface (struct ifreq: name, int)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, 0x8943, struct.pack("16si12x", name.encode(), qlen))


BIG_IPV4_SINCE = (6, 6)
"""Two kernel changes are needed. Linux 6.3 (IPv4 BIG TCP) reads an IPv4 GSO packet's
length from the skb when its length field is 0 (iph_totlen() in ip_rcv_core() and
netfilter); before, such a packet is dropped as malformed, without an error to the
writer. And until alloc_skb_with_frags() learnt to fill its fragments with high-order
pages (Linux 6.6), a TUN write of more than MAX_SKB_FRAGS pages of payload (~68 KiB)
fails with EMSGSIZE (Engine._refused() would then end large segments at the first)."""


BIG_IPV6_BEFORE = (7, 0)
"""build() marks an IPv6 packet over 64 KiB as the kernel's own GRO did until Linux 7.0:
0 in the payload length and a Hop-by-Hop header whose Jumbo Payload option (RFC 2675)
holds the length, which ip6_rcv_core() reads (ipv6_hop_jumbo()). Linux 7.0 ("BIG TCP
without HBH in IPv6") switched to IPv4's form, a 0 length read from the skb. On 6.18 a
TUN write of the 0-length form is dropped as a header error (Ip6InHdrErrors), without an
error to the writer, and the Hop-by-Hop form arrives whole; what 7.0 does with the
Hop-by-Hop form is not tried here, so from 7.0 on IPv6 segments stay within 64 KiB.
The TUN needs BIG_IPV4_SINCE too (the skb allocation)."""


def _release(release: str | None) -> tuple[int, int] | None:
    """(major, minor) of ``release`` (as in uname -r; None: this kernel's)."""
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m[1]), int(m[2])) if m is not None else None


def takes_big_ipv4(release: str | None = None) -> bool:
    """Whether this kernel (``release``: as in uname -r) takes IPv4 GSO packets over 64 KiB
    written to a TUN (BIG_IPV4_SINCE)."""
    version = _release(release)
    return version is not None and version >= BIG_IPV4_SINCE


def takes_big_ipv6(release: str | None = None) -> bool:
    """Whether this kernel takes IPv6 GSO packets over 64 KiB written to a TUN in the form
    build() writes (BIG_IPV6_BEFORE)."""
    version = _release(release)
    return version is not None and BIG_IPV4_SINCE <= version < BIG_IPV6_BEFORE


def _enable_offload(fd: int) -> None:
    """TUNSETOFFLOAD: the TUN device then advertises checksum offload and TSO, so the app's
    socket passes 64 KiB GSO skbs (gso_size = its MSS) straight to us instead of the
    kernel cutting them into 1,460-byte packets first. The app's MSS stays what its
    original route (the physical interface) gave it; only the number of packets per byte
    changes."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)


def open_tun(name: str, mtu: int, offload: bool = True) -> TunHandle:
    """Create TUN `name` with `mtu`. Refuses (OSError EEXIST) if a link of that name exists:
    TUNSETIFF would otherwise attach us to someone else's persistent TUN.

    `offload`: open it with IFF_VNET_HDR and TSO/checksum offload (see TunHandle.vnet);
    a kernel that refuses falls back to plain packets, logged."""
    if TunTapDevice is None:
        raise OSError(errno.ENOSYS, "the pytun_pmd3 module is not installed")
    if link_exists(name):
        raise OSError(errno.EEXIST, f"a network interface named {name!r} already exists")
    try:
        # IFF_TUN_EXCL makes the kernel itself refuse an existing device (EBUSY), closing
        # the window between the check above and TUNSETIFF.
        flags = IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | (IFF_VNET_HDR if offload else 0)
        device = TunTapDevice(name, flags=flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise OSError(errno.EEXIST,
                          f"a network interface named {name!r} already exists") from exc
        raise OSError(exc.errno or errno.EIO, f"cannot create TUN {name!r}: "
                      f"{os.strerror(exc.errno) if exc.errno else exc}") from exc
    try:
        device.mtu = mtu
        fd = device.fileno()
        _set_txqueuelen(name, TUN_TXQUEUELEN)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        vnet = offload
        if offload:
            try:
                _enable_offload(fd)
            except OSError as exc:
                # The vnet header stays (IFF_VNET_HDR is fixed at TUNSETIFF); without
                # TSO the kernel just sends MSS-sized packets behind it.
                log.warning("TUN offload unavailable on %s (%s): using MSS-sized packets",
                            name, os.strerror(exc.errno or errno.EIO))
    except OSError as exc:
        device.close()
        raise OSError(exc.errno or errno.EIO,
                      f"cannot set MTU {mtu} on {name}: {os.strerror(exc.errno or errno.EIO)}"
                      ) from exc
    big4, big6 = vnet and takes_big_ipv4(), vnet and takes_big_ipv6()
    log.debug("opened TUN %s (fd %d, mtu %d, offload %s, segments over 64 KiB: IPv4 %s, "
              "IPv6 %s)", device.name, fd, mtu, vnet, big4, big6)
    return TunHandle(device.name, fd, vnet, device, big4, big6)
