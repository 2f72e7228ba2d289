"""Build of the optional C extensions; everything else is in pyproject.toml.

`snapshotter.verity._hashrun` (snapshotter/verity/_hashrun.c, ours) hashes dm-verity blocks
with libcrypto and the GIL released. `optional=True`: without a compiler, Python headers or
libssl-dev the install still succeeds and the pure-Python loop is used (hashing.py).
`snapshotter.fsmeta._mergescan` (snapshotter/fsmeta/_mergescan.c, ours) reads a layer
directory's entries and their inodes in one call for the merge; without it, the pure path
(merge.py `SCAN`). `snapshotter.fsmeta._mergepack` (snapshotter/fsmeta/_mergepack.c, ours)
is the metadata writer's inode-table and directory-block loops, compiled (format.py
`pack_inode_table` and its neighbours; without it, their pure loops).
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
            "snapshotter.fsmeta._mergescan",
            ["snapshotter/fsmeta/_mergescan.c"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
        Extension(
            "snapshotter.fsmeta._mergepack",
            ["snapshotter/fsmeta/_mergepack.c"],
            extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
            optional=True,
        ),
    ]
)
