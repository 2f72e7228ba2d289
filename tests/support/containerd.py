"""What the containerd tests share: the containerd versions, the snapshotter names, the image
they pull and the script a container lists it with, and our store's key for a snapshot."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from shim_integration.testbed.containerd_dist import from_suite
from shim_integration.testbed.containerd_private import system_dist
from tests.support.helpers import require_tool

VERSIONS = {
    "1.6": system_dist,
    "1.7": lambda: from_suite("trixie"),
    "2.1": lambda: from_suite("sid"),
}
OURS, THEIRS = "erofs-py", "overlayfs"
IMAGE = "example.com/erofs-py/test:1"

# The container prints its view of /data and /bin: type, mode, owner, size, links, mtime
# (directories: no size/links/mtime, those differ between file systems), then file checksums.
LIST_SCRIPT = (
    "for f in $(find /data /bin -xdev | sort); do "
    "if [ -d $f ]; then stat -c '%n d %a %u:%g' $f; "
    "else stat -c '%n %F %a %u:%g %s %h %Y' $f; fi; done; "
    "find /data -type f | sort | xargs md5sum"
)


def image_layers() -> list[list[tuple]]:
    busybox = Path(require_tool("busybox")).read_bytes()
    return [
        [
            ("dir", "bin", 0o755),
            ("file", "bin/busybox", busybox, 0o755),
            ("symlink", "bin/sh", "busybox"),
            ("dir", "data", 0o755),
            ("file", "data/gone", b"removed by layer 2\n", 0o644),
            ("dir", "data/olddir", 0o755),
            ("file", "data/olddir/x", b"x\n", 0o644),
            ("dir", "data/opq", 0o755),
            ("file", "data/opq/hidden", b"h\n", 0o644),
            ("file", "data/replaced", b"v1\n", 0o644),
        ],
        [
            (
                "file",
                "data/xattr",
                b"has xattrs\n",
                0o640,
                {"user.test": b"x1", "user.other": b"\x00\x01"},
            ),
            ("link", "data/xattr-link", "data/xattr", 0o640),
            ("whiteout", "data/gone"),
            ("whiteout", "data/olddir"),
            ("file", "data/replaced", b"v2\n", 0o600),
            ("dir", "data/sub", 0o700),
            ("file", "data/sub/deep", b"deep\n", 0o644),
        ],
        # Real layers carry their parent directories. (Without the data/sub entry, a layer
        # image built from the tar alone gets an implicit data/sub that shadows the lower
        # one's mode in the overlay; the walking differ copies the lower one up instead.)
        [
            ("opaque", "data/opq"),
            ("file", "data/opq/new", b"n\n", 0o644),
            ("symlink", "data/link", "sub/deep"),
            ("dir", "data/sub", 0o700),
            ("file", "data/sub/second", b"2\n", 0o755),
        ],
    ]


def store_key(serve_root: Path, containerd_key: str) -> str:
    """Our store's key for a snapshot containerd knows as CONTAINERD_KEY (containerd prefixes
    its namespace and an id: default/<n>/<key>)."""
    db = sqlite3.connect(f"file:{serve_root / 'metadata.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT key FROM snapshots").fetchall()
    finally:
        db.close()
    keys = [k for (k,) in rows if k.endswith("/" + containerd_key)]
    assert len(keys) == 1, rows
    return keys[0]
