"""Build of the one optional C extension; everything else is in pyproject.toml.

`snapshotter.verity._hashrun` (snapshotter/verity/_hashrun.c, ours) hashes dm-verity blocks
with libcrypto and the GIL released. `optional=True`: without a compiler, Python headers or
libssl-dev the install still succeeds and the pure-Python loop is used (hashing.py).
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
        )
    ]
)
