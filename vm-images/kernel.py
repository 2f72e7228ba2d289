"""The guest kernel: Debian's cloud kernel package, downloaded (never installed) and unpacked.

From the bzImage we extract `vmlinux` (the ELF inside the compressed payload): QEMU boots it
directly through its PVH entry point, which skips the real-mode setup and the decompressor.
`depmod -b` regenerates modules.dep, which the package leaves to its postinst.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import BuildError, apt_download, apt_fields, run, source_digest, staging_dir

META_PACKAGE = "linux-image-cloud-amd64"
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    release: str  # uname -r
    vmlinux: Path
    modules: Path  # .../lib/modules/<release>


def resolve_package() -> tuple[str, str]:
    """The versioned image package the cloud meta package points at, and its version."""
    depends = apt_fields([META_PACKAGE])[META_PACKAGE].get("Depends", "")
    m = re.search(r"(linux-image-[0-9][^ ,]*-cloud-amd64) \(= ([^)]+)\)", depends)
    if not m:
        raise BuildError(f"cannot resolve {META_PACKAGE}'s kernel package from apt-cache")
    return m.group(1), m.group(2)


def _decompress_payload(bzimage: bytes) -> bytes:
    """The ELF inside a bzImage (boot protocol >= 2.08 gives payload offset and length)."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise BuildError("not a bzImage (no HdrS signature)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    # The kernel build appends the decompressed size (le32) to every payload.
    expected = struct.unpack("<I", payload[-4:])[0]
    magic = payload[:4]
    if magic == b"\x02\x21\x4c\x18":  # lz4 legacy frame (CONFIG_KERNEL_LZ4, Debian's choice)
        argv = ["lz4", "-dc"]
    elif magic[:2] == b"\x1f\x8b":
        argv = ["gzip", "-dc"]
    elif magic[:4] == b"\xfd7zX":
        argv = ["xz", "-dc"]
    elif magic == b"\x28\xb5\x2f\xfd":
        argv = ["zstd", "-dc"]
    else:
        raise BuildError(f"unknown kernel payload compression (magic {magic.hex()})")
    try:
        proc = subprocess.run(argv, input=payload[:-4], capture_output=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"{argv[0]} missing (run .ci/setup)") from exc
    elf = proc.stdout
    if proc.returncode != 0 or len(elf) != expected or elf[:4] != b"\x7fELF":
        raise BuildError(
            f"{argv[0]} gave {len(elf)} bytes (want {expected}): {proc.stderr[-500:]!r}"
        )
    return elf


def _has_pvh_note(elf: bytes) -> bool:
    """True if the ELF carries XEN_ELFNOTE_PHYS32_ENTRY (what QEMU needs to boot it as PVH)."""
    if elf[4] != 2:  # ELFCLASS64
        return False
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def build_kernel(root: Path) -> Kernel:
    package, version = resolve_package()
    release = package.removeprefix("linux-image-")
    key = f"kernel-{release}-{version}-{source_digest('kernel.py')[:8]}".replace(":", "_")
    final = root / key

    def describe() -> Kernel:
        return Kernel(package, version, release, final / "vmlinux", final / "lib/modules" / release)

    if (final / "vmlinux").exists():
        return describe()
    deb = apt_download(package, version, root / "debs")
    with staging_dir(final) as tmp:
        run(["dpkg-deb", "-x", deb, tmp])
        bzimage = (tmp / "boot" / f"vmlinuz-{release}").read_bytes()
        elf = _decompress_payload(bzimage)
        if not _has_pvh_note(elf):
            raise BuildError("vmlinux has no PVH entry note (CONFIG_PVH off?)")
        (tmp / "vmlinux").write_bytes(elf)
        run(["depmod", "-b", tmp, release])
        (tmp / "boot" / f"vmlinuz-{release}").unlink()
    return describe()
