"""Lockdown: with `ep.lockdown=1` on the kernel command line the host gets only what a runtime
needs: signed images, and commands and reads confined to an open image's root. Without it the
raw ops (verity_open, mount, run anywhere, ...) are a test and debugging surface that would let
the host mount anything."""

from __future__ import annotations

from passthrough.agent_protocol import LOCKDOWN_ON
from passthrough.guest.state import AgentState, refusal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOCKDOWN_OPS = frozenset(
    {
        "ping",
        "block_devices",
        "wait_block",
        "wait_block_gone",
        "open_image",
        "close_image",
        "images",
        "teardown",
        "mounts",
        "verity_status",
        "run",
        "hash_tree",
        "read_file",
    }
)


def check_lockdown(state: AgentState, op: str, req: dict[str, Any]) -> None:
    """Refuse what a locked-down agent does not serve. A path counts as inside an image when
    it is lexically inside its root: what it then resolves to is confined to that root when it
    is opened (hash_tree's fd walk, read_file's openat2)."""
    if not state.locked:
        return
    why = None
    if op not in LOCKDOWN_OPS:
        why = f"{op} is not served in lockdown"
    elif op == "run" and req.get("image") is None:
        why = "run needs image=NAME (an open image's root) in lockdown"
    elif (
        op in ("hash_tree", "read_file")
        and state.image_root_of(str(req.get("root") or req.get("path") or "")) is None
    ):
        why = f"{op} outside an open image's root in lockdown"
    if why:
        raise refusal(f"{why} ({LOCKDOWN_ON})")
