"""`erofs-passthrough attach|detach`: hotplug files into a running QEMU over its QMP socket."""

from __future__ import annotations

import argparse
import functools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from passthrough.errors import PassthroughError
from passthrough.transports import TRANSPORTS
from snapshotter.errors import EpError
from snapshotter.fsutil import file_kind

if TYPE_CHECKING:
    from passthrough.attach import Attachment


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--qmp", required=True, type=Path, help="QEMU's QMP unix socket")
    common.add_argument(
        "--storage-daemon",
        type=Path,
        default=None,
        metavar="SOCK",
        help="qemu-storage-daemon's QMP socket for vhost-user-blk (default: "
        "qsd.sock next to the QMP socket if there is one, else a daemon attach "
        "starts for the VM and stops after its last detach or the VM's exit)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object (also for an error: {"error": ...})',
    )

    p = subparsers.add_parser(
        "attach", parents=[common], help="attach files read-only to a running QEMU"
    )
    p.add_argument("--transport", choices=TRANSPORTS, default="virtio-blk")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_attach)

    p = subparsers.add_parser(
        "detach", parents=[common], help="unplug devices (by device id or attached file)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds to wait for the guest to release a device",
    )
    p.add_argument("devices", nargs="+", metavar="DEVICE|FILE")
    p.set_defaults(func=cmd_detach)


def _json_errors(
    command: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """With --json, an error is also one JSON object on stdout ({"error": message}) before the
    usual one line on stderr and exit status 1, so a caller parsing stdout always gets JSON."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except EpError as exc:
            if args.json:
                print(json.dumps({"error": str(exc)}), flush=True)
            raise

    return run


def _print(args: argparse.Namespace, key: str, atts: list[Attachment]) -> None:
    if args.json:
        print(json.dumps({key: [a.to_json() for a in atts]}, indent=2))
        return
    for a in atts:
        print(
            f"{a.device_id} {a.transport} port={a.root_port} pci={a.pci_slot} "
            f"serial={a.serial} {a.file or ''}".rstrip()
        )


def _check_qmp_socket(args: argparse.Namespace) -> None:
    """Name a missing or wrong QMP socket path plainly, before connecting to it."""
    try:
        mode = os.stat(args.qmp).st_mode
    except OSError as exc:
        raise PassthroughError(f"QMP socket {args.qmp}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise PassthroughError(f"QMP socket {args.qmp}: is {file_kind(mode)}, not a unix socket")


@_json_errors
def cmd_attach(args: argparse.Namespace) -> int:
    """All or nothing: if one file fails, the files this call attached are detached again."""
    from passthrough.attach import Attacher
    from passthrough.qmp import QmpSession

    for f in args.files:  # refuse the whole call up front rather than half of it later
        try:
            mode = os.stat(f).st_mode
        except OSError as exc:
            raise PassthroughError(f"cannot attach {f}: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise PassthroughError(
                f"cannot attach {f}: is {file_kind(mode)}, not a regular file or a block device"
            )
    _check_qmp_socket(args)
    with QmpSession(args.qmp) as qmp, Attacher(qmp, args.storage_daemon) as attacher:
        before = {a.device_id for a in attacher.attached()}
        done: list[Attachment] = []
        try:
            for f in args.files:
                done.append(attacher.attach(f, args.transport))
        except PassthroughError as exc:
            undone = []
            for att in reversed(done):
                if att.device_id in before:
                    continue
                try:
                    attacher.detach(att.device_id)
                    undone.append(att.device_id)
                except PassthroughError as undo_exc:
                    raise PassthroughError(
                        f"{exc}; and detaching {att.device_id} again failed: {undo_exc}"
                    ) from exc
            suffix = f" (detached again: {', '.join(undone)})" if undone else ""
            raise PassthroughError(f"{exc}{suffix}") from exc
        _print(args, "attached", done)
    return 0


@_json_errors
def cmd_detach(args: argparse.Namespace) -> int:
    from passthrough.attach import Attacher
    from passthrough.qmp import QmpSession

    _check_qmp_socket(args)
    with QmpSession(args.qmp) as qmp, Attacher(qmp, args.storage_daemon) as attacher:
        done = [attacher.detach(d, timeout=args.timeout) for d in args.devices]
        _print(args, "detached", done)
    return 0
