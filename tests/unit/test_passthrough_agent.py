"""The guest agent's request handling on the host, without a guest: the parts that do not need
a guest kernel (dispatch, error and refusal replies, lockdown, hashing a tree). The guest
tests (test_vm_guest.py) run the same code as PID 1 of a real guest."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest

from passthrough.agent_protocol import REFUSED_ERRNO
from passthrough.guest.server import Agent
from passthrough.guest.state import AgentState, Image

agent = Agent(AgentState(locked=False))


def _call(req: dict | bytes) -> dict:
    line = req if isinstance(req, bytes) else json.dumps(req).encode()
    reply = agent.handle(line)
    json.dumps(reply)  # always serialisable: it goes back over the port
    return reply


def test_errors_become_replies_with_errno(tmp_path: Path) -> None:
    assert _call(b"{not json")["ok"] is False
    bad = _call({"id": 1, "op": "nope"})
    assert (bad["id"], bad["ok"], bad["errno"]) == (1, False, errno.EINVAL)
    missing = _call({"id": 2, "op": "read_file", "path": str(tmp_path / "gone")})
    assert (missing["ok"], missing["errno"]) == (False, errno.ENOENT)
    no_arg = _call({"id": 3, "op": "verity_open"})
    assert no_arg["ok"] is False and "bad request" in no_arg["error"]
    ping = _call({"id": 4, "op": "ping"})
    assert ping["ok"] and ping["result"]["pid"] == os.getpid()


def test_verity_open_takes_a_table_line() -> None:
    """The agent builds no table line of its own: the host sends VerityInfo's."""
    for bad in ({"name": "v", "table": 7}, {"name": "v", "table": "0 8 zero"}):
        reply = _call({"id": 1, "op": "verity_open", **bad})
        assert (reply["ok"], reply["errno"]) == (False, errno.EINVAL)


def test_hash_tree_and_read_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x" * 3000)
    (tmp_path / "l").symlink_to("d/f")
    tree = _call({"id": 1, "op": "hash_tree", "root": str(tmp_path)})["result"]["entries"]
    assert tree["d/f"]["sha256"] == hashlib.sha256(b"x" * 3000).hexdigest()
    assert tree["d/f"]["size"] == 3000 and tree["l"]["target"] == "d/f" and "d" in tree
    part = _call({"id": 2, "op": "read_file", "path": str(tmp_path / "d/f"), "offset": 2990})
    assert part["result"]["size"] == 10


def test_open_image_refusals_on_a_guest_without_keys() -> None:
    """This host booted without ep.trusted_keys=: a well-formed request is refused for that,
    before the agent looks for any disk; malformed ones are EINVAL."""
    import base64

    req = {
        "id": 1,
        "op": "open_image",
        "name": "c1",
        "devices": [{"serial": "nope"}],
        "manifest": base64.b64encode(b"{}").decode(),
        "signature": base64.b64encode(b"{}").decode(),
    }
    refused = _call(req)
    assert (refused["errno"], refused["refused"]) == (errno.EPERM, True)
    assert refused["error"] == "the guest booted without trusted keys (ep.trusted_keys=)"
    bad64 = _call({**req, "manifest": "!!"})
    assert (bad64["error"], bad64["refused"]) == ("manifest is not base64", True)
    assert "refused" not in _call({**req, "devices": []})  # a bad request is no refusal
    assert _call({**req, "name": "../x"})["errno"] == errno.EINVAL
    assert _call({**req, "devices": []})["errno"] == errno.EINVAL
    assert _call({"id": 2, "op": "close_image", "name": "c1"})["errno"] == errno.ENOENT
    assert _call({"id": 3, "op": "images"})["result"] == {"images": {}}


def test_lockdown_serves_only_signed_images_and_their_roots(tmp_path: Path) -> None:
    """ep.lockdown=1: raw dm-verity/mount ops and commands or reads outside an open image's
    root are refused; inside one they are served."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_bytes(b"inside")
    (tmp_path / "escape").symlink_to("/etc/hostname")
    state = AgentState(locked=True)
    state.add_image(Image("x", "sha256:0", rootfs=str(tmp_path)))
    locked = Agent(state)

    def call(req: dict) -> dict:
        return locked.handle(json.dumps(req).encode())

    for req in (
        {"op": "verity_open", "name": "v", "table": "0 8 zero"},
        {"op": "mount", "source": "/dev/vdb"},
        {"op": "run", "argv": ["true"]},
        {"op": "read_file", "path": "/etc/hostname"},
        {"op": "read_file", "path": str(tmp_path / "data" / ".." / ".." / "etc")},
        {"op": "hash_tree", "root": "/etc"},
    ):
        reply = call({"id": 1, **req})
        assert (reply["errno"], reply.get("refused")) == (REFUSED_ERRNO, True), req
        assert "ep.lockdown=1" in reply["error"]
    inside = call({"id": 2, "op": "read_file", "path": str(tmp_path / "data" / "f")})
    assert inside["ok"] and inside["result"]["size"] == 6
    # A link out of the image resolves inside it (openat2 RESOLVE_IN_ROOT): the image's
    # /etc/hostname if it has one, never the guest's.
    assert (
        call({"id": 5, "op": "read_file", "path": str(tmp_path / "escape")})["errno"]
        == errno.ENOENT
    )
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hostname").write_bytes(b"the image's\n")
    confined = call({"id": 6, "op": "read_file", "path": str(tmp_path / "escape")})
    assert base64.b64decode(confined["result"]["data"]) == b"the image's\n"
    assert call({"id": 3, "op": "hash_tree", "root": str(tmp_path)})["ok"]
    assert call({"id": 4, "op": "ping"})["ok"]
    state.forget_image("x")
    assert call({"id": 7, "op": "hash_tree", "root": str(tmp_path)})["refused"] is True


@pytest.mark.skipif(
    "ep.lockdown=1" in Path("/proc/cmdline").read_text().split(),
    reason="this host booted with ep.lockdown=1",
)
def test_lockdown_is_read_from_the_kernel_command_line() -> None:
    state = AgentState()
    assert state.locked is False  # this host booted without ep.lockdown=1
    assert "refused" not in Agent(state).handle(b'{"id": 1, "op": "verity_close"}')
