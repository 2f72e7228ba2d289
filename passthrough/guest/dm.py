"""Device-mapper through dmsetup: open, query and remove dm-verity devices. The table line
comes from the host (`verity_open`) or from a signed manifest (`images`), built by
`snapshotter.verity.VerityInfo.table_line` in both cases."""

from __future__ import annotations

import errno
import os

from passthrough.guest.state import AgentError, AgentState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def dmsetup(*args: str) -> str:
    import subprocess

    env = dict(os.environ, DM_DISABLE_UDEV="1")  # no udev here: dmsetup makes the nodes itself
    proc = subprocess.run(["dmsetup", *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise AgentError(f"dmsetup {args[0]} failed: {proc.stderr.strip()}", errno.EIO)
    return proc.stdout


def create(state: AgentState, name: str, table: str) -> str:
    """A read-only dm device NAME with TABLE; returns its node."""
    dmsetup("create", name, "--readonly", "--table", table)
    state.dm.append(name)
    return f"/dev/mapper/{name}"


def remove(state: AgentState, name: str) -> None:
    dmsetup("remove", name)
    if name in state.dm:
        state.dm.remove(name)


def op_verity_open(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    table = req["table"]
    if not isinstance(table, str) or " verity " not in table:
        raise AgentError("verity_open needs table=<a dm-verity table line>", errno.EINVAL)
    return {"device": create(state, req["name"], table), "table": table}


def op_verity_status(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    out = dmsetup("status", req["name"]).split()
    # "0 N verity V|C": C once a corrupted block has been read
    return {"status": out, "corrupted": out[-1] == "C" if out else None}


def op_verity_close(state: AgentState, req: dict[str, Any]) -> dict[str, Any]:
    remove(state, req["name"])
    return {"removed": req["name"]}
