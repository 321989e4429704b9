"""Typed errors. The CLI turns each into one line on stderr and an exit code.

Every error carries structured fields so callers (and tests) never parse messages.
"""

from __future__ import annotations


class ProxyVpnError(Exception):
    """Base class: an expected failure with a message fit for the user."""

    exit_code: int = 1


class ConfigError(ProxyVpnError):
    """Bad configuration: a malformed URL, a missing file, conflicting flags."""

    exit_code = 2


class PrivilegeError(ProxyVpnError):
    """The process lacks CAP_NET_ADMIN (or group membership) for what was asked."""

    exit_code = 77  # EX_NOPERM from sysexits.h


class AlreadyRunningError(ProxyVpnError):
    """Another `proxyvpn up` holds the state directory."""

    def __init__(self, pid: int | None, state_dir: str) -> None:
        self.pid = pid
        self.state_dir = state_dir
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"proxyvpn is already running ({who}, state in {state_dir}); "
            "run `proxyvpn down` first"
        )


class ApplyError(ProxyVpnError):
    """One operation of the plan failed; everything before it was rolled back."""

    def __init__(self, op: object, cause: BaseException | str) -> None:
        self.op = op
        self.cause = cause
        # summary() is one line even for ops whose command() is long (the nft ruleset).
        describe = getattr(op, "summary", None) or getattr(op, "command", None)
        what = describe() if callable(describe) else str(op)
        super().__init__(f"failed to apply `{what}`: {cause}")


class ProxyError(ProxyVpnError):
    """The upstream proxy answered a CONNECT with a non-2xx status."""

    def __init__(self, status: int, reason: str = "", target: str = "") -> None:
        self.status = status
        self.reason = reason
        self.target = target
        super().__init__(f"proxy refused CONNECT {target}: {status} {reason}".rstrip())

    @property
    def auth_failed(self) -> bool:
        """407 (RFC 9110 §15.5.8); some proxies (tinyproxy, measured) answer 401."""
        return self.status in (401, 407)


class ProxyUnreachableError(ProxyVpnError):
    """No proxy address accepted a TCP connection within the timeout."""

    def __init__(self, addresses: tuple[str, ...], cause: str) -> None:
        self.addresses = addresses
        self.cause = cause
        super().__init__(f"proxy unreachable at {', '.join(addresses) or '(no address)'}: {cause}")


class ProxyProtocolError(ProxyVpnError):
    """The proxy sent bytes that are not a valid HTTP response to CONNECT."""


class UntrustedStateError(ProxyVpnError):
    """The state directory records something proxyvpn would not have written (a forged or
    corrupted journal, a lock pid that is not proxyvpn): nothing was undone or signalled.

    The directory belongs to the user who ran `up`, while `down` may run as root; so what
    it says is checked against what proxyvpn can produce before anything is acted on.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"refusing to act on {where}: {reason} (nothing was undone or "
                         "stopped; the files are left in place)")
