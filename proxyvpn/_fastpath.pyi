"""Type stub for the C fast path (native/fastpath.c); twin of proxyvpn.netstack.wire."""

from collections.abc import Iterable
from typing import Final

from typing_extensions import Buffer

FIN: Final[int]
SYN: Final[int]
RST: Final[int]
PSH: Final[int]
ACK: Final[int]
URG: Final[int]
ECE: Final[int]
CWR: Final[int]

DROP_TRUNCATED: Final[int]
DROP_BAD_VERSION: Final[int]
DROP_BAD_IP_HEADER: Final[int]
DROP_FRAGMENT: Final[int]
DROP_NOT_TCP: Final[int]
DROP_BAD_IP_CHECKSUM: Final[int]
DROP_BAD_TCP_HEADER: Final[int]
DROP_BAD_TCP_CHECKSUM: Final[int]
DROP_BAD_OPTIONS: Final[int]
DROP_BAD_ADDRESS: Final[int]
DROP_REASONS: Final[tuple[str, ...]]
READ_BATCH_MAX_BYTES: Final[int]
VNET_HDR_LEN: Final[int]
BIG_IP_LEN_MAX: Final[int]

# (family, src, dst, sport, dport, seq, ack, flags, window,
#  payload_start, payload_end, mss, wscale, sack_permitted, tsval, tsecr)
ParseResult = tuple[
    int, bytes, bytes, int, int, int, int, int, int, int, int, int, int, bool, int, int
]

def checksum(data: Buffer, initial: int = 0) -> int: ...
def parse(packet: Buffer, verify_checksum: bool = True, vnet: bool = False) -> ParseResult | int: ...
def build(
    family: int,
    src: Buffer,
    dst: Buffer,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: Buffer = b"",
    mss: int = 0,
    wscale: int = -1,
    sack_permitted: bool = False,
    tsval: int = -1,
    tsecr: int = 0,
    sack: tuple[int, ...] = (),
    gso_size: int = -1,
    split: bool = False,
) -> bytes | tuple[bytes, Buffer]: ...
def build_many(
    family: int,
    src: Buffer,
    dst: Buffer,
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    payload: Buffer,
    mss: int,
) -> list[bytes]: ...
def read_batch(fd: int, max_packets: int, bufsize: int) -> list[bytes]: ...
def write_batch(fd: int, packets: Iterable[Buffer]) -> int: ...
