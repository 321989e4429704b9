"""The modules that setup.py compiles with mypyc, and the switch to run them interpreted.

They are the per-packet and per-connection path: the TCP state machine, the engine
around it and the proxy side (dial, tunnel, transport). relay/connect.py stays
interpreted: its functions promise a ValueError for any bad argument, which compiled
annotations would turn into TypeErrors, and it runs once per connection.

Compiled, the same source runs as C: attribute access and calls between its
classes become struct loads and C calls, and the interpreter's share of a byte's cost
shrinks (see README, Performance). The .py files stay the one source: without the build
(no mypy at hand) they run interpreted, only slower.

Compiled code checks its annotations at run time, so they must be true (a ``float``
where ``int`` is declared is a TypeError there, not here): keep them honest, and
``mypy`` clean on these files.

Two faults of the compiled classes that derive from asyncio's (mypyc 2.4), both found the
hard way: a weak reference to an instance crashes the process when the instance dies (so
nothing here takes one), and an inherited slot is not freed with the instance
(SocketTransport leaves BaseTransport's ``_extra`` unset for that reason).

``PROXYVPN_INTERPRETED=1`` imports them from their .py source even when the compiled
ones are built: for pdb, for py-spy (which does not see inside compiled functions), and
for the tests that prove the source alone still works.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

COMPILED: tuple[str, ...] = (
    "proxyvpn.netstack.events",
    "proxyvpn.netstack.seq",
    "proxyvpn.netstack.sendbuf",
    "proxyvpn.netstack.tcp",
    "proxyvpn.aio.flow",
    "proxyvpn.aio.engine",
    "proxyvpn.relay.transport",
    "proxyvpn.relay.dial",
)
"""Dotted names; setup.py turns them into paths."""

ENV = "PROXYVPN_INTERPRETED"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of COMPILED as their .py files, ahead of the extension."""

    def find_spec(self, name: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if name not in COMPILED or not path:
            return None
        source = Path(path[0]) / (name.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(name, source) if source.is_file() else None


def install_if_asked() -> None:
    """Put the source finder first on sys.meta_path if PROXYVPN_INTERPRETED=1."""
    if os.environ.get(ENV) == "1" and not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a compiled extension, not from its source."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def loaded() -> dict[str, bool]:
    """{module of COMPILED: whether it was imported compiled} (importing them all)."""
    return {name: is_compiled(importlib.import_module(name)) for name in COMPILED}
