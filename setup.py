"""Only the optional native part; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[
    # UDP sends from a native thread (src/bootherd/udpsend.py falls back without it).
    Extension("bootherd._udpsend", ["src/bootherd/_udpsend.c"], optional=True,
              extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]),
])
