"""The guest agent's request handling on the host, without a guest: the parts that do not need
a guest kernel (dispatch, error replies, the verity table line, hashing a tree). The guest
tests (test_vm_guest.py) run the same code as PID 1 of a real guest."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from pathlib import Path

from passthrough.guest import agent
from passthrough.guest_volume import verity_params


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


def test_verity_table_line() -> None:
    fields = verity_params({"root_hash": "ab" * 32, "salt": "cd" * 32, "data_block_size": 4096,
                            "hash_block_size": 4096, "hash_offset": 40960, "hash_type": 1,
                            "superblock": True}, "/dev/vdb")
    assert fields["data_blocks"] == 10 and fields["hash_start_block"] == 11
    assert agent.verity_table(fields) == (
        f"0 80 verity 1 /dev/vdb /dev/vdb 4096 4096 10 11 sha256 {'ab' * 32} {'cd' * 32}")
    nosalt = dict(fields, salt="", hash_device="/dev/vdc")
    assert agent.verity_table(nosalt).endswith(f" {'ab' * 32} -")
    assert " /dev/vdb /dev/vdc " in agent.verity_table(nosalt)


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

    req = {"id": 1, "op": "open_image", "name": "c1", "devices": [{"serial": "nope"}],
           "manifest": base64.b64encode(b"{}").decode(),
           "signature": base64.b64encode(b"{}").decode()}
    refused = _call(req)
    assert refused["errno"] == errno.EPERM
    assert "refused: the guest booted without trusted keys (ep.trusted_keys=)" in refused["error"]
    assert _call({**req, "manifest": "!!"})["error"] == "refused: manifest is not base64"
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
    image = agent.Image("x", "sha256:0")
    image.result = {"rootfs": str(tmp_path)}
    saved = list(agent._LOCKED)
    agent._LOCKED[:] = [True]
    agent.IMAGES["x"] = image
    try:
        for req in ({"op": "verity_open", "name": "v", "table": "0 8 zero"},
                    {"op": "mount", "source": "/dev/vdb"}, {"op": "run", "argv": ["true"]},
                    {"op": "read_file", "path": "/etc/hostname"},
                    {"op": "read_file", "path": str(tmp_path / "data" / ".." / ".." / "etc")},
                    {"op": "hash_tree", "root": "/etc"}):
            reply = _call({"id": 1, **req})
            assert reply["errno"] == errno.EPERM, req
            assert reply["error"].startswith("refused: ") and "ep.lockdown=1" in reply["error"]
        inside = _call({"id": 2, "op": "read_file", "path": str(tmp_path / "data" / "f")})
        assert inside["ok"] and inside["result"]["size"] == 6
        # A link out of the image resolves inside it (openat2 RESOLVE_IN_ROOT): the image's
        # /etc/hostname if it has one, never the guest's.
        assert _call({"id": 5, "op": "read_file",
                      "path": str(tmp_path / "escape")})["errno"] == errno.ENOENT
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "hostname").write_bytes(b"the image's\n")
        confined = _call({"id": 6, "op": "read_file", "path": str(tmp_path / "escape")})
        assert base64.b64decode(confined["result"]["data"]) == b"the image's\n"
        assert _call({"id": 3, "op": "hash_tree", "root": str(tmp_path)})["ok"]
        assert _call({"id": 4, "op": "ping"})["ok"]
    finally:
        agent.IMAGES.pop("x", None)
        agent._LOCKED[:] = saved
    assert agent.locked() is False  # this host booted without ep.lockdown=1
    agent.check_lockdown("verity_open", {})  # so nothing is refused for lockdown
