"""Build of the optional C extensions; everything else is in pyproject.toml.

- `snapshotter.verity._hashrun` (snapshotter/verity/_hashrun.c, ours) hashes dm-verity blocks
  with libcrypto and the GIL released;
- `snapshotter.ingest._tarhdr` (snapshotter/ingest/_tarhdr.c, ours) parses tar header blocks.

`optional=True`: without a compiler, Python headers or libssl-dev the install still succeeds
and the pure-Python code is used (hashing.py, tarstream.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "snapshotter.verity._hashrun",
            ["snapshotter/verity/_hashrun.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
        Extension(
            "snapshotter.ingest._tarhdr",
            ["snapshotter/ingest/_tarhdr.c"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
    ]
)
