"""A QEMU launcher for test and demo guests: q35 under TCG (KVM selectable), guest RAM as a
shared memfd (vhost-user needs it), a pool of pcie-root-ports for hotplug, QMP on a unix socket,
the guest agent's virtio-serial port, and one qemu-storage-daemon for vhost-user-blk exports.

Files of one VM live in its work directory: qmp.sock and qsd.sock (QEMU's and the storage
daemon's QMP, for attach/detach tools), qmp-vm.sock and qsd-vm.sock (the launcher's own
monitors: a QMP monitor serves one client at a time, so the launcher keeps out of the tools'
way), agent.sock, console.log, qemu.log, qsd.log, and the vhost-user sockets attach makes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from passthrough import procs
from passthrough.agent_client import AgentClient
from passthrough.agent_protocol import AGENT_PORT, LOCKDOWN_ON, encode_trusted_keys
from passthrough.errors import AgentFailure, PassthroughError, VmFailure
from passthrough.guest_image import GuestImage
from passthrough.qmp import QmpSession
from passthrough.storage_daemon import StorageDaemon

ROOT_PORT_PREFIX = "ep-rp"
FIRST_PORT_SLOT = 8  # root ports at 00:08.0 ... (8 functions per slot), fixed devices below
# Fast boot under TCG (docs/passthrough.md, "Boot"): no mitigations, no crypto self tests, no TSC
# calibration; panic=-1 + -no-reboot make a dead guest end QEMU instead of hanging.
BOOT_ARGS = (
    "console=ttyS0",
    "quiet",
    "panic=-1",
    "mitigations=off",
    "cryptomgr.notests=1",
    "tsc=reliable",
    "no_timer_check",
    "random.trust_cpu=on",
)
COMMAND_LINE_MAX = 2047  # x86's COMMAND_LINE_SIZE is 2048 with the NUL


@dataclass
class VmConfig:
    kernel: Path | None = None
    initrd: Path | None = None
    kernel_args: list[str] = field(default_factory=list)
    root_image: Path | None = None
    root_serial: str | None = None
    memory_mib: int = 256
    accel: str = field(default_factory=lambda: os.environ.get("EROFS_PASSTHROUGH_ACCEL", "tcg"))
    cpus: int = 1
    root_ports: int = 16
    paused: bool = False  # -S: no guest runs (QMP-only tests)
    # PEM public keys the guest trusts for signed image manifests, given on the kernel command
    # line (ep.trusted_keys=<base64 PEM>,...): per boot, standing in for attestation initdata.
    trusted_keys: list[bytes] = field(default_factory=list)
    # ep.lockdown=1: the agent serves only signed images and what runs inside them.
    lockdown: bool = False
    storage_daemon: bool = True
    qemu: str = "qemu-system-x86_64"

    @classmethod
    def for_guest(cls, image: GuestImage, **overrides: object) -> VmConfig:
        return cls(
            kernel=image.kernel,
            initrd=image.initrd,
            kernel_args=list(image.kernel_args),
            root_image=image.root_image,
            root_serial=image.root_serial,
            **overrides,  # type: ignore[arg-type]
        )


def root_port_id(index: int) -> str:
    return f"{ROOT_PORT_PREFIX}{index}"


class Vm:
    """One QEMU process (and its storage daemon). Use as a context manager, or start()/stop()."""

    def __init__(self, config: VmConfig, workdir: Path | None = None) -> None:
        if config.root_ports > 32:
            raise VmFailure("at most 32 root ports (4 slots of 8 functions)")
        self.config = config
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="ep-vm-"))
        self.qmp_path = self.workdir / "qmp.sock"
        self.own_qmp_path = self.workdir / "qmp-vm.sock"
        self.qsd_path = self.workdir / "qsd.sock"
        self.agent_path = self.workdir / "agent.sock"
        self.console_path = self.workdir / "console.log"
        self.log_path = self.workdir / "qemu.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.qsd: StorageDaemon | None = None
        self._qmp: QmpSession | None = None
        self.started_at = 0.0

    def argv(self) -> list[str]:
        c = self.config
        mem = f"{c.memory_mib}M"
        argv = [
            shutil.which(c.qemu) or c.qemu,
            "-machine",
            f"q35,accel={c.accel},memory-backend=mem",
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-m",
            mem,
            "-cpu",
            "max",
            "-smp",
            str(c.cpus),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"socket,id=qmp-vm,path={self.own_qmp_path},server=on,wait=off",
            "-mon",
            "chardev=qmp-vm,mode=control",
            "-chardev",
            f"file,id=con,path={self.console_path}",
            "-serial",
            "chardev:con",
            "-device",
            "virtio-serial-pci,id=vser,bus=pcie.0,addr=0x3",
            "-chardev",
            f"socket,id=agent,path={self.agent_path},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT}",
        ]
        for i in range(c.root_ports):
            slot, fn = FIRST_PORT_SLOT + i // 8, i % 8
            mf = ",multifunction=on" if fn == 0 else ""
            argv += [
                "-device",
                f"pcie-root-port,id={root_port_id(i)},bus=pcie.0,"
                f"chassis={i + 1},slot={i + 1},addr={slot:#x}.{fn}{mf}",
            ]
        if c.kernel:
            argv += ["-kernel", str(c.kernel), "-append", self.command_line()]
            if c.initrd:
                argv += ["-initrd", str(c.initrd)]
        if c.root_image:
            argv += [
                "-blockdev",
                f"driver=file,node-name=rootfile,read-only=on,filename={c.root_image}",
                "-blockdev",
                "driver=raw,node-name=root,read-only=on,file=rootfile",
                "-device",
                f"virtio-blk-pci,drive=root,bus=pcie.0,addr=0x2,serial={c.root_serial}",
            ]
        if c.paused:
            argv.append("-S")
        return argv

    def command_line(self) -> str:
        args = [*BOOT_ARGS, *self.config.kernel_args]
        if self.config.trusted_keys:
            # The guest agent opens only images signed by one of these keys (docs/kata.md).
            args.append(encode_trusted_keys(self.config.trusted_keys))
        if self.config.lockdown:
            args.append(LOCKDOWN_ON)
        line = " ".join(args)
        if len(line) > COMMAND_LINE_MAX:
            raise VmFailure(
                f"kernel command line of {len(line)} bytes exceeds "
                f"{COMMAND_LINE_MAX} (too many trusted keys?)"
            )
        return line

    def start(self, timeout: float = 20.0) -> Vm:
        self.started_at = time.monotonic()
        try:
            if self.config.storage_daemon:
                self.qsd = StorageDaemon(
                    self.qsd_path, self.workdir / "qsd.log", self.workdir / "qsd-vm.sock"
                ).start()
            self.proc = procs.spawn(self.argv(), self.log_path)
            # QEMU makes them in argv order
            for sock in (self.qmp_path, self.own_qmp_path, self.agent_path):
                procs.wait_socket(sock, self.proc, timeout, self.log_path)
            # The sockets exist before QEMU sets the machine up (and may still fail, e.g. on a
            # bad accelerator); the QMP greeting comes only from a running main loop.
            try:
                self.qmp.cmd("query-status")
            except PassthroughError as exc:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
                state = (
                    f"exited with {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else "does not answer on QMP"
                )
                raise VmFailure(f"QEMU {state}: {procs.tail(self.log_path)} ({exc})") from None
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def qmp(self) -> QmpSession:
        """A QMP session on the launcher's own monitor (tests use it to inspect QEMU)."""
        if self._qmp is None or not self._qmp.alive:
            self._qmp = QmpSession(self.own_qmp_path)
        return self._qmp

    def console_tail(self, lines: int = 30) -> str:
        return procs.tail(self.console_path, lines)

    def console_summary(self, lines: int = 8) -> str:
        """Our init's messages and the kernel's panic line, then the console's last lines
        (a panic's stack trace would otherwise push the reason out of any tail)."""
        try:
            text = self.console_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no console output)"
        notes = [ln for ln in text if "ep-init:" in ln or "Kernel panic" in ln]
        return "\n".join([*notes, "...", *text[-lines:]])

    def wait_agent(self, timeout: float = 60.0) -> AgentClient:
        """Connect to the guest agent and wait for its first answer (= guest booted)."""
        client = AgentClient(self.agent_path, timeout=timeout, alive=lambda: self.alive)
        try:
            client.ping()
        except AgentFailure as exc:
            client.close()
            raise VmFailure(
                f"guest agent not ready: {exc}\n--- console ---\n"
                f"{self.console_summary()}\n--- qemu ---\n"
                f"{procs.tail(self.log_path)}"
            ) from None
        client.timeout = 60.0
        return client

    def stop(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        procs.stop(self.proc)
        if self.qsd is not None:
            self.qsd.stop()
        if self._own_workdir and os.environ.get("EROFS_PASSTHROUGH_KEEP_VM") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
