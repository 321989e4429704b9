"""Fixtures for integration tests that need root and real network namespaces."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nslib import Netns, is_root  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.netns)
            if not is_root():
                # CI runs as root: there a skip would hide a missing test, so stop instead.
                if os.environ.get("CI") == "true":
                    pytest.exit("CI must run the netns tests as root", returncode=1)
                item.add_marker(pytest.mark.skip(reason="needs root (network namespaces)"))


@pytest.fixture
def ns() -> Iterator[Netns]:
    """A fresh, empty network namespace (loopback up), always removed."""
    with Netns.create("pvt") as created:
        yield created


@pytest.fixture
def lab():
    """client -- router(proxy) -- server namespaces, tinyproxy started; always removed."""
    from topology import available_congestion, build_lab, remove_lab

    built = build_lab()
    try:
        # The namespaces would inherit the host's default congestion control (bbr on some
        # hosts): the lab runs Linux's own default instead, unless a run asks for another.
        congestion = os.environ.get("PROXYVPN_TEST_CONGESTION", "cubic")
        if congestion != "host" and congestion in available_congestion():
            built.set_congestion(congestion)
        built.start_tinyproxy()
        yield built
    finally:
        remove_lab(built)
