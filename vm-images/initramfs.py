"""The guest initramfs: static busybox, the kernel modules in load order, dmsetup and its
libraries (taken from the guest root tree, so they match the guest's libc), and `init.sh`.

Written as an uncompressed newc cpio: the kernel unpacks it faster than it would decompress one.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
from pathlib import Path

from common import (
    BuildError,
    apt_download,
    candidate_versions,
    digest,
    run,
    source_digest,
    write_atomic,
)
from kernel import Kernel

from passthrough.guest.payload import agent_env

# What the guest needs before its root is mounted (modules.dep adds the dependencies).
TOP_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "erofs",
    "sha256_ssse3",
    "dm-verity",
    "overlay",
)  # overlay: the writable upper over an opened image (agent open_image)
BUSYBOX_PACKAGE = "busybox-static"
LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")


def module_order(modules_dir: Path, top: tuple[str, ...] = TOP_MODULES) -> list[Path]:
    """TOP and their dependencies from modules.dep, each after everything it needs."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.removesuffix(".ko").replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in order:
            return
        if mod in stack:
            raise BuildError(f"module dependency cycle through {mod}")
        for dep in deps.get(mod, []):
            visit(dep, (*stack, mod))
        order.append(mod)

    for name in top:
        mod = by_name.get(name.replace("-", "_"))
        if mod is None:
            raise BuildError(f"module {name} not in {modules_dir}/modules.dep")
        visit(mod, ())
    return [modules_dir / m for m in order]


def _elf_needed(data: bytes) -> tuple[str | None, list[str]]:
    """(PT_INTERP, DT_NEEDED names) of a 64-bit little-endian ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise BuildError("not a 64-bit ELF")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interp = None
    loads: list[tuple[int, int, int]] = []
    dynamic = None
    for i in range(phnum):
        p_type, _f, off, vaddr, _pa, filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize
        )
        if p_type == 3:
            interp = data[off : off + filesz].rstrip(b"\0").decode()
        elif p_type == 1:
            loads.append((vaddr, off, filesz))
        elif p_type == 2:
            dynamic = (off, filesz)
    if dynamic is None:
        return interp, []
    entries = [struct.unpack_from("<qQ", data, dynamic[0] + i) for i in range(0, dynamic[1], 16)]
    strtab_va = next(v for t, v in entries if t == 5)
    strtab = next(off + strtab_va - va for va, off, sz in loads if va <= strtab_va < va + sz)
    names = []
    for tag, val in entries:
        if tag == 1:
            end = data.index(b"\0", strtab + val)
            names.append(data[strtab + val : end].decode())
    return interp, names


def _resolve(tree: Path, path: str) -> Path:
    """PATH inside TREE with symlinks resolved relative to TREE (not to the host's /)."""
    parts = [p for p in path.split("/") if p]
    cur = tree
    hops = 0
    while parts:
        cur = cur / parts.pop(0)
        if cur.is_symlink():
            hops += 1
            if hops > 40:
                raise BuildError(f"symlink loop at {path}")
            target = str(cur.readlink())
            rest = [p for p in target.split("/") if p]
            cur = tree if target.startswith("/") else cur.parent
            parts = rest + parts
    return cur


def elf_closure(tree: Path, binary: str) -> dict[str, Path]:
    """BINARY and every library it loads: {path in the initramfs: file in TREE}."""
    files: dict[str, Path] = {}
    todo = [binary]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        src = _resolve(tree, name)
        if not src.is_file():
            raise BuildError(f"{name} not found in the guest tree")
        files[name] = src
        interp, needed = _elf_needed(src.read_bytes())
        if interp:
            todo.append(interp)
        for lib in needed:
            for d in LIB_DIRS:
                if _resolve(tree, f"{d}/{lib}").is_file():
                    todo.append(f"/{d}/{lib}")
                    break
            else:
                raise BuildError(f"{binary} needs {lib}, not in the guest tree")
    return files


class Cpio:
    """A newc ("070701") archive built in memory, everything owned by root, mtime 0."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nameb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))
        self.ino += 1

    def mkdir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.mkdir(name.rpartition("/")[0])
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue() + b"\0" * (-self.buf.tell() % 512)


def build_initramfs(root: Path, kernel: Kernel, tree: Path, tree_key: str) -> Path:
    version = candidate_versions([BUSYBOX_PACKAGE])[BUSYBOX_PACKAGE]
    key = digest(
        kernel.release,
        kernel.version,
        version,
        tree_key,
        source_digest("initramfs.py", "init.sh"),
        agent_env(),
        *TOP_MODULES,
    )
    final = root / f"initramfs-{key}.cpio"
    if final.exists():
        return final
    deb = apt_download(BUSYBOX_PACKAGE, version, root / "debs")
    busybox = run(["dpkg-deb", "--fsys-tarfile", deb], text=False).stdout
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "newroot", "run", "tmp", "sbin", "etc", "lib/modules"):
        cpio.mkdir(d)
    cpio.add_chardev("dev/console", 5, 1)
    cpio.add_chardev("dev/null", 1, 3)
    cpio.add_file("bin/busybox", _member(busybox, "./bin/busybox"), 0o755)
    cpio.add_file("init", (Path(__file__).parent / "init.sh").read_bytes(), 0o755)
    names = []
    for ko in module_order(kernel.modules):
        name = ko.name.removesuffix(".ko")
        names.append(name)
        cpio.add_file(f"lib/modules/{name}.ko", ko.read_bytes())
    cpio.add_file("etc/ep-agent.env", agent_env().encode())
    cpio.add_file("etc/modules.order", ("\n".join(names) + "\n").encode())
    for dest, src in sorted(elf_closure(tree, "/sbin/dmsetup").items()):
        cpio.add_file(dest, src.read_bytes(), 0o755)
    write_atomic(final, cpio.finish())
    return final


def _member(tar_bytes: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        fh = tar.extractfile(name)
        if fh is None:
            raise BuildError(f"{name} missing from the package")
        return fh.read()
