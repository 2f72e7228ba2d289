"""Build of the optional C extensions; everything else is in pyproject.toml.

- `snapshotter.verity._hashrun` (snapshotter/verity/_hashrun.c, ours) hashes dm-verity blocks
  with libcrypto and the GIL released;
- `snapshotter.ingest._tarhdr` (snapshotter/ingest/_tarhdr.c, ours) parses tar header blocks;
- `snapshotter.fsmeta._mergescan` (snapshotter/fsmeta/_mergescan.c, ours) reads a layer
  directory's entries and their inodes in one call for the merge (merge.py `SCAN`);
- `snapshotter.fsmeta._mergepack` (snapshotter/fsmeta/_mergepack.c, ours) is the metadata
  writer's inode-table and directory-block loops (format.py `pack_inode_table` and its
  neighbours).

`optional=True`: without a compiler, Python headers or libssl-dev the install still succeeds
and the pure-Python code is used (hashing.py, tarstream.py, merge.py, format.py).
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            "snapshotter.verity._hashrun",
            ["snapshotter/verity/_hashrun.c"],
            libraries=["crypto"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "snapshotter.ingest._tarhdr",
            ["snapshotter/ingest/_tarhdr.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "snapshotter.fsmeta._mergescan",
            ["snapshotter/fsmeta/_mergescan.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "snapshotter.fsmeta._mergepack",
            ["snapshotter/fsmeta/_mergepack.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
