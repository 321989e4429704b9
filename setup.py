"""Builds the native parts; everything else is in pyproject.toml.

- native/fastpath.c as proxyvpn._fastpath: the per-packet fast path (parse, build,
  batched TUN reads and writes).
- The modules listed in proxyvpn/_compiled.py, compiled from their Python source with
  mypyc (part of mypy, a build requirement). Without mypy, or with PROXYVPN_NO_MYPYC=1,
  they are left to run interpreted: the same behaviour, more CPU per byte.
"""

import os
import runpy
import sys

from setuptools import Extension, setup

COMPILED = runpy.run_path("proxyvpn/_compiled.py")["COMPILED"]


def mypyc_modules() -> list:
    if os.environ.get("PROXYVPN_NO_MYPYC") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("setup.py: mypy (mypyc) is not installed: the stack stays interpreted",
              file=sys.stderr)
        return []
    paths = [name.replace(".", "/") + ".py" for name in COMPILED]
    # group_name: one shared library, proxyvpn__mypyc, instead of one named by a hash.
    return mypycify(["--ignore-missing-imports", *paths], group_name="proxyvpn")


setup(
    ext_modules=[
        Extension(
            "proxyvpn._fastpath",
            sources=["native/fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
        *mypyc_modules(),
    ]
)
