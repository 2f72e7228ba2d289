"""The table every Kata reader derives (tests/support/kata_readers.py), opened in a guest
kernel's dm-verity (this host's kernel has no device-mapper; the shared test guest has)."""

from __future__ import annotations

from pathlib import Path

import pytest

from passthrough.agent_client import AgentClient
from passthrough.attach import Attacher
from passthrough.guest_volume import find_disk
from snapshotter.ingest.convert import convert_layer
from snapshotter.verity import KATA_VERITY
from tests.support.kata_readers import DEVICE, layer_option, sample_layer_tar, tables_of

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.slow]


def test_the_table_every_reader_derives_opens_the_layer_in_a_guest(
    tmp_path: Path, agent: AgentClient, attacher: Attacher
) -> None:
    """What the Kata agent does with the volume, in a real guest kernel: the layer hotplugged
    as a virtio disk, the readers' one table loaded with `dmsetup create` on it (the disk is
    data and hash device both, as the agent names the source twice), then the EROFS on the
    dm device mounted and its files read through dm-verity."""
    tar, diff_id, files = sample_layer_tar(tmp_path)
    blob = tmp_path / "layer.erofs"
    info = convert_layer(tar, blob, expected_diff_id=diff_id, verity=KATA_VERITY).verity
    tables = tables_of(layer_option(info, blob))
    assert len(set(tables.values())) == 1, tables
    att = attacher.attach(blob, "virtio-blk")
    disk = find_disk(agent, att)["path"]
    name = "kata-readers"
    dmsetup = ("env", "DM_DISABLE_UDEV=1", "dmsetup")  # no udev in the guest: dmsetup makes nodes
    created = agent.run(
        *dmsetup,
        "create",
        name,
        "--readonly",
        "--table",
        tables["kata-types"].replace(DEVICE, disk),
    )
    assert created["rc"] == 0, created["stderr"]
    try:
        mnt = agent.mount(f"/dev/mapper/{name}")
        try:
            for rel, data in files.items():
                assert agent.read_file(f"{mnt}/{rel}") == data
            status = agent.run("dmsetup", "status", name)["stdout"]
            assert status.split()[3] == "V", status  # dm-verity: no corruption seen
        finally:
            agent.umount(mnt)
    finally:
        agent.run(*dmsetup, "remove", name)
