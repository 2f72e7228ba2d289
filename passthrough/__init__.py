"""Attaching verified devices to QEMU guests over QMP.

- `qmp`: synchronous QMP sessions (qemu.qmp) for QEMU and qemu-storage-daemon
- `attach`: virtio-blk / vhost-user-blk attach and detach, state read back from QEMU
- `vm`, `storage_daemon`, `procs`: the test/demo VM launcher and its helper processes
- `guest_image`: the kernel, initramfs and verified root built by vm-images/build
- `agent_client`, `guest_volume`: the host side of the guest agent protocol
- `agent_protocol`: that protocol's one definition (port, requests, replies, `ep.*` arguments)
- `guest`: the guest program (the agent), shipped in the guest image (`guest/payload.py`)
- `cli`: `erofs-passthrough attach|detach`

See docs/passthrough.md.
"""
