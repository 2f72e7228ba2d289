"""The real veritysetup as the oracle of a blob's dm-verity tree, the two ways readers open it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def veritysetup_verify(
    blob: Path, *, table: str | None = None, sidecar: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`veritysetup verify` of BLOB (data and tree in one file), given exactly one of:

    - TABLE, a dm-verity table line: every parameter from the table, no superblock read (what
      a Kata reader's table makes the kernel do);
    - SIDECAR, containerd's `layer.erofs.dmverity`: only its root hash and superblock offset,
      every other parameter from the superblock there (what containerd's go-dmverity does).
    """
    if (table is None) == (sidecar is None):
        raise TypeError("veritysetup_verify needs exactly one of table= and sidecar=")
    if table is not None:
        (_, _, _, version, _, _, dbs, hbs, blocks, start, alg, root, salt) = table.split()
        args = [
            root,
            "--no-superblock",
            f"--format={version}",
            f"--hash={alg}",
            f"--data-block-size={dbs}",
            f"--hash-block-size={hbs}",
            f"--data-blocks={blocks}",
            f"--hash-offset={int(start) * int(hbs)}",
            f"--salt={salt}",
        ]
    else:
        assert sidecar is not None
        data = json.loads(sidecar.read_bytes())
        args = [data["roothash"], f"--hash-offset={data['hashoffset']}"]
    return subprocess.run(
        ["veritysetup", "verify", str(blob), str(blob), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
