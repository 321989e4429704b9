"""Builds the C fast path (native/fastpath.c) as proxyvpn._fastpath; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxyvpn._fastpath",
            sources=["native/fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        )
    ]
)
