"""The guest root: a Debian minbase tree (debootstrap, cached), turned into a verity-protected
EROFS image with the guest agent in it.

`make_verified_erofs` is the one place that decides which tools build the image: Debian's
mkfs.erofs + veritysetup until the project's own converter is in, then our converter.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path

from common import (
    HERE,
    BuildError,
    candidate_versions,
    commit_file,
    digest,
    run,
    source_digest,
    staging_dir,
    write_json,
)

from passthrough.guest import payload

SUITE = "bookworm"
MIRROR = os.environ.get("EROFS_PASSTHROUGH_MIRROR", "http://deb.debian.org/debian")
# python3-cffi-backend: python3-cryptography needs it through a virtual package that
# debootstrap does not resolve.
INCLUDE = ("python3", "python3-cryptography", "python3-cffi-backend", "python3-pyudev", "dmsetup")
PRUNE = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
BLOCK = 4096
# File mtimes are kept (python checks its .pyc files by them); files we add get this one.
FIXED_TIME = 1700000000
TREE_RECIPE = 1  # bump when build_tree changes what it produces


def tree_key() -> str:
    versions = candidate_versions(INCLUDE)
    debootstrap = candidate_versions(["debootstrap"])["debootstrap"]
    return digest(
        SUITE,
        MIRROR,
        debootstrap,
        json.dumps(versions, sort_keys=True),
        repr((INCLUDE, PRUNE, TREE_RECIPE)),
    )


def build_tree(root: Path, key: str) -> Path:
    """The debootstrap'd tree (slow, ~1 min): built once per key."""
    final = root / f"tree-{key}"
    if (final / "etc/debian_version").exists():
        return final
    with staging_dir(final) as tmp:
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                tmp,
                MIRROR,
            ]
        )
        for rel in PRUNE:
            target = tmp / rel
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        (tmp / payload.GUEST_DIR).mkdir(parents=True, exist_ok=True)
        versions = run(["chroot", tmp, "dpkg-query", "-W", "-f=${Package} ${Version}\n"]).stdout
        (tmp / "etc/erofs-passthrough-packages").write_text(versions)
    return final


def _with_debian_tools(
    tree: Path, extras: dict[str, tuple[bytes, int]], out: Path, salt: str
) -> dict:
    """mkfs.erofs (1.5, from a directory) + `veritysetup format`, tree appended to the data."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage.") as stage_dir:
        stage = Path(stage_dir) / "root"
        run(["cp", "-al", tree, stage])  # hard links: cheap, and the cached tree stays as is
        for rel, (data, mode) in extras.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # never write through a link into the cached tree
            path.write_bytes(data)
            path.chmod(mode)
        tmp = out.with_name(f".{out.name}.tmp")
        uuid = f"{salt[:8]}-{salt[8:12]}-{salt[12:16]}-{salt[16:20]}-{salt[20:32]}"
        # No -T and no SOURCE_DATE_EPOCH: both overwrite every file's mtime, and python then
        # finds all its .pyc files stale (and recompiles on every start, slow under TCG).
        run(["mkfs.erofs", "--quiet", "--all-root", "--preserve-mtime", f"-U{uuid}", tmp, stage])
    size = tmp.stat().st_size
    data_blocks = -(-size // BLOCK)
    hash_offset = data_blocks * BLOCK
    proc = run(
        [
            "veritysetup",
            "format",
            tmp,
            tmp,
            f"--data-blocks={data_blocks}",
            f"--hash-offset={hash_offset}",
            f"--salt={salt}",
            f"--uuid={uuid}",
            f"--data-block-size={BLOCK}",
            f"--hash-block-size={BLOCK}",
        ]
    )
    m = re.search(r"Root hash:\s*([0-9a-f]{64})", proc.stdout)
    if not m:
        raise BuildError(f"veritysetup printed no root hash: {proc.stdout}")
    commit_file(tmp, out)
    return {
        "root_hash": m.group(1),
        "salt": salt,
        "hash_offset": hash_offset,
        "data_blocks": data_blocks,
        "data_block_size": BLOCK,
        "hash_block_size": BLOCK,
        "hash_type": 1,
        "builder": "mkfs.erofs+veritysetup",
    }


def _with_our_converter(
    tree: Path, extras: dict[str, tuple[bytes, int]], out: Path, salt: str
) -> dict:
    """`erofs-passthrough convert TAR OUT --verity --json` over a tar of the tree + extras."""
    cli = shutil.which("erofs-passthrough") or str(HERE.parent / ".venv/bin/erofs-passthrough")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".stage.") as stage_dir:
        tar_path = Path(stage_dir) / "rootfs.tar"
        write_tree_tar(tree, extras, tar_path)
        tmp = out.with_name(f".{out.name}.tmp")
        proc = run([cli, "convert", tar_path, tmp, "--verity", "--json"])
    info = json.loads(proc.stdout)["verity"]
    commit_file(tmp, out)
    data_blocks = info["hash_offset"] // info["data_block_size"]
    return {**info, "data_blocks": data_blocks, "builder": "erofs-passthrough convert"}


def write_tree_tar(tree: Path, extras: dict[str, tuple[bytes, int]], dest: Path) -> None:
    """A deterministic tar of TREE (sorted, root-owned, real mtimes) with EXTRAS replacing files."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(tree):
            dirnames.sort()
            for name in [*sorted(dirnames), *sorted(filenames)]:
                path = Path(dirpath) / name
                rel = path.relative_to(tree).as_posix()
                if rel in extras:
                    continue
                info = tar.gettarinfo(str(path), arcname=rel)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                if info.isreg():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                else:
                    tar.addfile(info)
        have = set(tar.getnames())
        for rel, (data, mode) in sorted(extras.items()):
            for parent in reversed(Path(rel).parents[:-1]):  # directories the tree lacks
                if parent.as_posix() not in have:
                    have.add(parent.as_posix())
                    d = tarfile.TarInfo(parent.as_posix())
                    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, FIXED_TIME
                    tar.addfile(d)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), stat.S_IMODE(mode), FIXED_TIME
            tar.addfile(info, io.BytesIO(data))


def make_verified_erofs(
    tree: Path, extras: dict[str, tuple[bytes, int]], out: Path, salt: str
) -> dict:
    """TREE (+ EXTRAS: path -> (bytes, mode)) as EROFS with a dm-verity tree appended.

    Our own converter builds it (the guest that checks our images boots from one);
    `_with_debian_tools` is the same recipe with mkfs.erofs 1.5 + veritysetup, kept as the
    fallback and cross-check (set EROFS_PASSTHROUGH_GUEST_BUILDER=debian).
    """
    if os.environ.get("EROFS_PASSTHROUGH_GUEST_BUILDER") == "debian":
        return _with_debian_tools(tree, extras, out, salt)
    return _with_our_converter(tree, extras, out, salt)


def converter_digest() -> str:
    """Hash of the sources of the converter that builds the image (its packages: the builder,
    not the guest's content, which guest_files gives): a changed converter rebuilds it."""
    package = HERE.parent / "snapshotter"
    files = sorted(p for d in ("erofs", "ingest", "verity") for p in (package / d).glob("*.py"))
    return digest(*(f.read_bytes() for f in files))


def guest_files() -> dict[str, tuple[bytes, int]]:
    """What the project adds to the guest tree: the guest payload (passthrough/guest/payload.py)
    under its directory. Its bytes are part of the root image's key."""
    return {f"{payload.GUEST_DIR}/{rel}": (data, 0o644) for rel, data in payload.files().items()}


def build_root_image(root: Path, tree: Path, key: str) -> tuple[Path, dict]:
    extras = guest_files()
    builder = os.environ.get("EROFS_PASSTHROUGH_GUEST_BUILDER", "ours")
    image_key = digest(
        key,
        *(f"{rel}:{mode}".encode() + data for rel, (data, mode) in sorted(extras.items())),
        source_digest("rootfs.py"),
        builder,
        converter_digest(),
    )
    final = root / f"root-{image_key}.img"
    meta_path = root / f"root-{image_key}.json"
    if final.exists() and meta_path.exists():
        return final, json.loads(meta_path.read_text())
    salt = hashlib.sha256(f"salt {image_key}".encode()).hexdigest()  # fixed per image
    verity = make_verified_erofs(tree, extras, final, salt)
    write_json(meta_path, verity)
    return final, verity
