"""The guest agent's protocol, the one definition both ends import: the virtio-serial port, the
requests and their fields, the reply shape (with its error and refusal encoding), and the
kernel command line arguments (`ep.*`) the host sets and the guest reads.

Standard library only: it ships in the guest (passthrough/guest/payload.py). One request per
line, one reply per line, JSON:

    -> {"id": 7, "op": "mount", "source": "/dev/mapper/l1", "target": "/run/ep/mnt/l1"}
    <- {"id": 7, "ok": true, "result": {...}}
    <- {"id": 7, "ok": false, "error": "mount: ...", "errno": 5}
    <- {"id": 7, "ok": false, "refused": true, "error": "the manifest ...", "errno": 1}

A refusal (`"refused": true`) is the guest declining on policy (a signature, a root hash,
lockdown), not failing: the host raises `passthrough.errors.Refused` for it.
"""

from __future__ import annotations

import errno

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: The virtio-serial port name QEMU gives the agent's channel (`virtserialport,name=`).
AGENT_PORT = "org.erofs-passthrough.agent"

#: Every request the agent serves and the fields it reads (docs/passthrough.md says what each
#: does); `timeout` is seconds the agent may wait, which the host adds to its reply deadline.
REQUESTS: dict[str, tuple[str, ...]] = {
    "ping": (),
    "run": ("argv", "input", "timeout", "image"),
    "block_devices": (),
    "wait_block": ("serial", "pci", "timeout"),
    "wait_block_gone": ("name", "timeout"),
    "verity_open": ("name", "table"),
    "verity_status": ("name",),
    "verity_close": ("name",),
    "mount": ("source", "target", "fstype", "options", "read_only"),
    "umount": ("target", "lazy"),
    "teardown": (),
    "hash_tree": ("root",),
    "read_file": ("path", "offset", "length"),
    "read_speed": ("path", "limit"),
    "mounts": (),
    "open_image": ("name", "devices", "manifest", "signature", "timeout", "upper_size"),
    "close_image": ("name",),
    "images": (),
}

#: The errno every refusal carries (the reply's `refused` field is what marks it).
REFUSED_ERRNO = errno.EPERM


def ok_reply(req_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def error_reply(
    req_id: Any, message: str, err: int | None, refused: bool = False
) -> dict[str, Any]:
    """A failed request; REFUSED marks a policy refusal (then ERR is REFUSED_ERRNO)."""
    reply: dict[str, Any] = {"id": req_id, "ok": False, "error": message, "errno": err}
    if refused:
        reply["refused"] = True
    return reply


def is_refusal(reply: dict[str, Any]) -> bool:
    return not reply.get("ok") and reply.get("refused") is True


# --- kernel command line -----------------------------------------------------------------------

#: The root disk's virtio serial (read by vm-images/init.sh).
ARG_ROOT = "ep.root"
#: The root's dm-verity table line, spaces as commas and `@` for the device (init.sh).
ARG_ROOT_TABLE = "ep.verity"
#: The program init.sh starts in the root instead of the agent.
ARG_INIT = "ep.init"
#: PEM public keys the agent trusts for signed manifests: base64, comma-separated.
ARG_TRUSTED_KEYS = "ep.trusted_keys"
#: `ep.lockdown=1`: the agent serves only signed images and what runs inside them.
ARG_LOCKDOWN = "ep.lockdown"
LOCKDOWN_ON = f"{ARG_LOCKDOWN}=1"
#: Stands for the root disk in ARG_ROOT_TABLE's value (init.sh puts /dev/vdX there).
ROOT_DEVICE_MARK = "@"


def cmdline_values(cmdline: str, name: str) -> list[str]:
    """The value of every `NAME=value` on CMDLINE, in order."""
    prefix = name + "="
    return [arg[len(prefix) :] for arg in cmdline.split() if arg.startswith(prefix)]


def encode_trusted_keys(pems: list[bytes]) -> str:
    """The kernel command line argument carrying PEMS."""
    import base64  # not at the guest's start-up: only the host encodes

    return f"{ARG_TRUSTED_KEYS}=" + ",".join(base64.b64encode(p).decode() for p in pems)


def encode_root_table(table: str) -> str:
    """ARG_ROOT_TABLE for a table line whose devices are ROOT_DEVICE_MARK."""
    if "," in table:
        raise ValueError(f"a table line with a comma cannot go on the command line: {table}")
    return f"{ARG_ROOT_TABLE}=" + table.replace(" ", ",")
