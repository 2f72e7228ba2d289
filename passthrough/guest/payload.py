"""What the guest image carries of this repository: the one list, used by vm-images/rootfs.py
to copy the files into the guest root (under GUEST_DIR, which the guest's init puts on
PYTHONPATH) and as that image's rebuild key, and by tests/unit/test_guest_payload.py to import the
guest from a directory holding only these files.

Everything here runs under Debian bookworm's python3 with python3-cryptography and
python3-pyudev (vm-images/rootfs.py INCLUDE): standard library otherwise.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: Where the payload lies in the guest root (the init's PYTHONPATH).
GUEST_DIR = "usr/lib/erofs-passthrough"
#: The agent's environment and command line in the guest (vm-images/init.sh gets them from the
#: initramfs' /etc/ep-agent.env): the payload, then Debian's packages (pyudev, cryptography);
#: `-S` skips site (its path set-up costs start-up time under TCG).
GUEST_PYTHONPATH = f"/{GUEST_DIR}:/usr/lib/python3/dist-packages"
AGENT_ARGV = ("/usr/bin/python3", "-S", "-m", "passthrough.guest")
#: The repository's root, the base of the paths below.
REPO = Path(__file__).resolve().parents[2]
#: The payload's modules, by repository path; the agent is `python3 -m passthrough.guest`.
MODULES = (
    "passthrough/__init__.py",
    "passthrough/agent_protocol.py",
    "passthrough/guest/__init__.py",
    "passthrough/guest/__main__.py",
    "passthrough/guest/disks.py",
    "passthrough/guest/dm.py",
    "passthrough/guest/files.py",
    "passthrough/guest/images.py",
    "passthrough/guest/lockdown.py",
    "passthrough/guest/mounts.py",
    "passthrough/guest/payload.py",
    "passthrough/guest/server.py",
    "passthrough/guest/state.py",
    "passthrough/guest/verify.py",
    "snapshotter/__init__.py",
    "snapshotter/accel.py",
    "snapshotter/errors.py",
    "snapshotter/fsmount.py",
    "snapshotter/fsutil.py",
    "snapshotter/manifest.py",
    "snapshotter/verity/__init__.py",
    *(
        f"snapshotter/verity/{name}.py"
        for name in (
            "builder",
            "coverage",
            "digests",
            "files",
            "geometry",
            "hashing",
            "info",
            "parallel",
            "params",
            "superblock",
            "tree",
            "verify",
        )
    ),
)


def files() -> dict[str, bytes]:
    """Each payload file's repository path and bytes."""
    return {rel: (REPO / rel).read_bytes() for rel in MODULES}


def agent_env() -> str:
    """/etc/ep-agent.env of the initramfs: shell assignments init.sh reads."""
    return f"EP_PYTHONPATH={GUEST_PYTHONPATH}\nEP_AGENT='{' '.join(AGENT_ARGV)}'\n"


def module_names() -> list[str]:
    names = []
    for rel in MODULES:
        name = rel.removesuffix(".py").replace("/", ".")
        names.append(name.removesuffix(".__init__"))
    return names


def import_all() -> None:
    """Import every payload module (`python3 -m passthrough.guest --check`): one that imports
    something outside the payload fails here, not at the guest's boot."""
    for name in module_names():
        if name != "passthrough.guest.__main__":
            importlib.import_module(name)
