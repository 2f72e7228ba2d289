"""The command line as an operator meets it, always through the real CLI process
(`python -m shim_integration.cli`): progress on a terminal (a real pty) and nothing extra
elsewhere, SIGTERM in the middle of convert and merge, FIFOs and directories where files
belong, `verity format` on a file that already carries a tree (checked with veritysetup),
and a sweep of bad input over every file-taking subcommand: each must end in one line on
stderr and a non-zero exit, never a traceback or a hang, and lose nothing."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pty
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from snapshotter.ingest.convert import convert_layer
from snapshotter.progress import ERASE_LINE, INTERVAL
from tests.support.helpers import assert_one_line_error, require_tool
from tests.support.layers import Entry, write_tar

CLI = [sys.executable, "-m", "shim_integration.cli"]
TIMEOUT = 60  # seconds any one CLI run may take here; a hang fails the test instead


def run_cli(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temp_files(directory: Path) -> list[str]:
    """What atomic_output leaves if its cleanup does not run: `.NAME.*.tmp`."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def layer(tmp_path_factory) -> Path:
    """A 24 MiB layer: big enough that reading it takes many 1 MiB reads."""
    d = tmp_path_factory.mktemp("layer")
    rng = random.Random(10)
    entries = [Entry("./", "dir"), Entry("data", "dir")]
    entries += [Entry(f"data/blob{i}", data=rng.randbytes(6 << 20)) for i in range(4)]
    entries += [Entry(f"data/small{i}", data=b"%d\n" % i) for i in range(50)]
    return write_tar(d / "layer.tar", entries)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    out = []
    for n in range(3):
        tar = write_tar(
            d / f"l{n}.tar",
            [Entry(f"layer{n}", "dir"), Entry(f"layer{n}/file", data=b"layer %d\n" % n)],
        )
        convert_layer(tar, d / f"l{n}.erofs")
        out.append(d / f"l{n}.erofs")
    return out


# --- progress -----------------------------------------------------------------------------


def run_on_pty(*args: str | Path) -> tuple[int, str, bytes, float]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe): (exit code, stdout,
    what reached the terminal, seconds)."""
    master, slave = pty.openpty()
    seen = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the slave side is gone
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    start = time.monotonic()
    try:
        proc = subprocess.run(
            [*CLI, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=slave,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        os.close(slave)
        reader.join(TIMEOUT)
        os.close(master)
    return proc.returncode, proc.stdout, bytes(seen), time.monotonic() - start


def redraws(tty: bytes, label: str) -> list[str]:
    text = tty.decode()
    return re.findall(re.escape(ERASE_LINE) + re.escape(label) + r": ([^\r]*)", text)


def test_convert_shows_progress_on_a_terminal_only(layer, tmp_path):
    rc, stdout, tty, seconds = run_on_pty("convert", layer, tmp_path / "tty.erofs", "--json")
    assert rc == 0, tty
    assert json.loads(stdout)["entries"] > 50  # stdout is untouched: clean JSON
    shown = redraws(tty, "convert")
    assert shown, tty
    total = layer.stat().st_size
    assert re.fullmatch(r"[\d.]+ [KMG]?i?B of [\d.]+ MiB read \(\d+%\)", shown[0]), shown
    assert tty.endswith(ERASE_LINE.encode()), tty[-80:]  # the line is erased at the end
    # Throttled: a few redraws a second, not one per 1 MiB read (the layer is 24 of them).
    assert len(shown) <= seconds / INTERVAL + 2, (len(shown), seconds, total)

    piped = run_cli("convert", layer, tmp_path / "pipe.erofs", "--json")
    assert piped.returncode == 0 and piped.stderr == ""  # nothing extra off a terminal
    assert json.loads(piped.stdout)["diff_id"] == json.loads(stdout)["diff_id"]
    assert sha256_of(tmp_path / "pipe.erofs") == sha256_of(tmp_path / "tty.erofs")


def test_merge_shows_progress_on_a_terminal_only(images, tmp_path):
    rc, stdout, tty, _ = run_on_pty("merge", tmp_path / "tty.fsmeta", *images, "--json")
    assert rc == 0, tty
    assert len(json.loads(stdout)["devices"]) == 3
    shown = redraws(tty, "merge")
    assert shown and shown[0].startswith("layer 1/3 "), tty
    assert tty.endswith(ERASE_LINE.encode()), tty[-80:]

    piped = run_cli("merge", tmp_path / "pipe.fsmeta", *images, "--json")
    assert piped.returncode == 0 and piped.stderr == ""
    assert sha256_of(tmp_path / "pipe.fsmeta") == sha256_of(tmp_path / "tty.fsmeta")


# --- SIGTERM ------------------------------------------------------------------------------


def wait_for_temp_file(directory: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not temp_files(directory):
        assert proc.poll() is None, f"exited ({proc.returncode}) before its temp file appeared"
        assert time.monotonic() < deadline, "no temp file appeared"
        time.sleep(0.01)


def test_sigterm_during_convert_leaves_no_temp_file(layer, tmp_path):
    """The layer comes through a pipe that stops half way, so the convert is certainly
    still running (its output a temp file) when the signal arrives."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [*CLI, "convert", "-", str(out_dir / "layer.erofs")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open(layer, "rb") as f:
            proc.stdin.write(f.read(8 << 20))
        proc.stdin.flush()
        wait_for_temp_file(out_dir, proc)
        time.sleep(0.2)  # let it consume what it was given and wait for more
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr
    assert b"Traceback" not in stderr, stderr
    assert list(out_dir.iterdir()) == []  # no temp file and no output


def test_sigterm_during_merge_leaves_no_temp_file(tmp_path):
    """80 layers of 4,000 entries each take seconds to merge here; the signal comes as soon
    as the merge's output exists (as a temp file)."""
    entries = [Entry(f"d{i}", "dir") for i in range(20)]
    entries += [Entry(f"d{i % 20}/f{i}", data=b"%d" % i) for i in range(4000)]
    convert_layer(write_tar(tmp_path / "many.tar", entries), tmp_path / "many.erofs")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [
            *CLI,
            "merge",
            str(out_dir / "image.fsmeta"),
            *[str(tmp_path / "many.erofs")] * 80,
            "--verity",
            "--flat",
            str(out_dir / "image.flat"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_temp_file(out_dir, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr
    assert b"Traceback" not in stderr, stderr
    assert list(out_dir.iterdir()) == []


# --- verity format on a file that already has a tree --------------------------------------


def test_verity_format_refuses_a_second_appended_tree(tmp_path):
    veritysetup = require_tool("veritysetup")
    data = tmp_path / "data.img"
    data.write_bytes(random.Random(3).randbytes(5 * 4096 + 100))
    first = run_cli("verity", "format", data, "--json")
    assert first.returncode == 0, first.stderr
    info = json.loads(first.stdout)
    formatted = sha256_of(data)

    again = run_cli("verity", "format", data)
    assert_one_line_error(again, "already ends with a dm-verity tree", "--force")
    assert sha256_of(data) == formatted  # unchanged
    subprocess.run(
        [
            veritysetup,
            "verify",
            str(data),
            str(data),
            info["root_hash"],
            f"--hash-offset={info['hash_offset']}",
        ],
        check=True,
        timeout=TIMEOUT,
    )

    forced = run_cli("verity", "format", data, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["hash_offset"] > info["hash_offset"]


@pytest.mark.parametrize("block_sizes", [(4096, 4096), (512, 4096), (4096, 1024)])
def test_verity_format_recognises_a_tree_veritysetup_appended(tmp_path, block_sizes):
    veritysetup = require_tool("veritysetup")
    dbs, hbs = block_sizes
    data = tmp_path / "data.img"
    blocks = 37
    data.write_bytes(random.Random(4).randbytes(blocks * dbs))
    subprocess.run(
        [
            veritysetup,
            "format",
            str(data),
            str(data),
            f"--data-blocks={blocks}",
            f"--hash-offset={blocks * dbs}",
            f"--data-block-size={dbs}",
            f"--hash-block-size={hbs}",
        ],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    before = sha256_of(data)
    proc = run_cli("verity", "format", data)
    assert_one_line_error(
        proc, "already ends with a dm-verity tree", f"superblock at byte {blocks * dbs}"
    )
    assert sha256_of(data) == before


def test_verity_format_accepts_data_that_merely_contains_a_superblock(tmp_path):
    """A verity superblock inside the data (here: a whole formatted image, then more data) is
    not an appended tree: only one that ends the file with matching geometry counts."""
    inner = tmp_path / "inner.img"
    inner.write_bytes(random.Random(5).randbytes(3 * 4096))
    assert run_cli("verity", "format", inner).returncode == 0
    data = tmp_path / "data.img"
    data.write_bytes(inner.read_bytes() + random.Random(6).randbytes(2 * 4096))
    proc = run_cli("verity", "format", data, "--json")
    assert proc.returncode == 0, proc.stderr


# --- FIFOs and directories ----------------------------------------------------------------


@pytest.fixture()
def odd_files(tmp_path, images) -> dict[str, Path]:
    """A FIFO without a writer, a directory, a unix socket, and a good image."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    directory = tmp_path / "dir"
    directory.mkdir()
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    return {"fifo": fifo, "dir": directory, "sock": sock_path, "image": images[0]}


@pytest.mark.parametrize("kind,what", [("fifo", "a FIFO"), ("dir", "a directory")])
@pytest.mark.parametrize(
    "command",
    [
        ["key", "show", "{in}"],
        ["convert", "{in}", "{tmp}/out.erofs"],
        ["merge", "{tmp}/out.fsmeta", "{image}", "{in}"],
        ["inspect", "{in}"],
        ["verity", "format", "{in}"],
        ["verity", "verify", "{in}", "--root-hash", "00", "--hash-offset", "4096"],
        ["verity", "verify", "{image}", "--root-hash", "00", "--hash-file", "{in}"],
    ],
)
def test_fifo_or_directory_as_input_is_one_line(odd_files, tmp_path, command, kind, what):
    argv = [
        a.format(**{"in": odd_files[kind], "tmp": tmp_path, "image": odd_files["image"]})
        for a in command
    ]
    proc = run_cli(*argv)  # a FIFO read without a writer would hang: TIMEOUT fails that
    assert_one_line_error(proc, f"is {what}, not a regular file")
    assert not (tmp_path / "out.erofs").exists() and not (tmp_path / "out.fsmeta").exists()
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize(
    "kind,what", [("dir", "a directory"), ("fifo", "a FIFO"), ("sock", "a socket")]
)
@pytest.mark.parametrize(
    "command",
    [
        ["convert", "{layer}", "{out}"],
        ["merge", "{out}", "{image}"],
        ["merge", "{tmp}/ok.fsmeta", "{image}", "--flat", "{out}"],
        ["verity", "format", "{data}", "--hash-file", "{out}"],
    ],
)
def test_directory_or_special_file_as_output_is_one_line(odd_files, tmp_path, command, kind, what):
    """Refused before any work: nothing replaces the FIFO or socket, nothing lands inside
    the directory."""
    layer = write_tar(tmp_path / "small.tar", [Entry("f", data=b"x")])
    data = tmp_path / "data.img"
    data.write_bytes(bytes(8192))
    out = odd_files[kind]
    argv = [
        a.format(layer=layer, out=out, image=odd_files["image"], tmp=tmp_path, data=data)
        for a in command
    ]
    proc = run_cli(*argv)
    assert_one_line_error(proc, f"is {what}")
    assert out.is_dir() if kind == "dir" else not out.is_file() and out.exists()
    if kind == "dir":
        assert list(out.iterdir()) == []
    assert temp_files(tmp_path) == []
    assert not (tmp_path / "ok.fsmeta").exists()


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "{tar}", "{tar}"],
        ["merge", "{image}", "{image}"],
        ["merge", "{tmp}/a.fsmeta", "{image}", "--flat", "{image}"],
        ["merge", "{tmp}/a.fsmeta", "{image}", "--flat", "{tmp}/a.fsmeta"],
        ["verity", "format", "{image}", "--hash-file", "{image}"],
    ],
)
def test_output_that_is_an_input_is_refused(tmp_path, images, command):
    """The rename at the end would replace the input (a layer the fsmeta points into, the
    data whose tree was just computed): refused before any work, the input intact."""
    image = tmp_path / "layer.erofs"
    image.write_bytes(images[0].read_bytes())
    tar = write_tar(tmp_path / "small.tar", [Entry("f", data=b"x")])
    before = {p: sha256_of(p) for p in (image, tar)}
    proc = run_cli(*[a.format(tar=tar, image=image, tmp=tmp_path) for a in command])
    assert_one_line_error(proc)
    assert {p: sha256_of(p) for p in (image, tar)} == before
    assert not (tmp_path / "a.fsmeta").exists() and temp_files(tmp_path) == []


def test_convert_reads_a_pipe_given_as_standard_input(layer, tmp_path):
    """The documented way to convert from a pipe or FIFO: `-` and a redirection."""
    with open(layer, "rb") as f:
        proc = subprocess.run(
            [*CLI, "convert", "-", str(tmp_path / "stdin.erofs"), "--json"],
            stdin=f,
            capture_output=True,
            timeout=TIMEOUT,
        )
    assert proc.returncode == 0, proc.stderr
    via_file = run_cli("convert", layer, tmp_path / "file.erofs", "--json")
    assert json.loads(proc.stdout)["diff_id"] == json.loads(via_file.stdout)["diff_id"]
    assert sha256_of(tmp_path / "stdin.erofs") == sha256_of(tmp_path / "file.erofs")


def test_convert_json_gives_a_compressed_layers_blob_digest(layer, tmp_path):
    """`--json` prints the blob digest (sha256 of the bytes read); the plain line, which is
    converted without it, gives the same diffID and image."""
    gz = tmp_path / "layer.tar.gz"
    gz.write_bytes(gzip.compress(layer.read_bytes(), compresslevel=1))
    proc = run_cli("convert", gz, tmp_path / "json.erofs", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["compression"] == "gzip"
    assert got["compressed_digest"] == "sha256:" + sha256_of(gz)
    assert got["diff_id"] == "sha256:" + sha256_of(layer)
    plain = run_cli("convert", gz, tmp_path / "plain.erofs")
    assert plain.returncode == 0, plain.stderr
    assert f"diff_id {got['diff_id']}" in plain.stdout
    assert sha256_of(tmp_path / "plain.erofs") == sha256_of(tmp_path / "json.erofs")


# --- no traceback on bad input ------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, images) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    garbage = d / "garbage"
    garbage.write_bytes(random.Random(7).randbytes(10000))
    empty = d / "empty"
    empty.touch()
    truncated = d / "truncated.erofs"
    truncated.write_bytes(images[0].read_bytes()[:1100])
    tar = write_tar(d / "ok.tar", [Entry("f", data=b"x")])
    data = d / "data.img"
    data.write_bytes(random.Random(8).randbytes(3 * 4096))
    return {
        "garbage": garbage,
        "empty": empty,
        "truncated": truncated,
        "tar": tar,
        "data": data,
        "image": images[0],
        "missing": d / "missing",
        "dir": d,
    }


SWEEP = [
    # (argv, a piece of the expected message)
    (["convert", "{missing}", "{out}"], "no such file"),
    (["convert", "{garbage}", "{out}"], "tar"),
    (["convert", "{tar}", "{out}", "--block-size", "3"], "block size 3"),
    (["convert", "{tar}", "{out}", "--diff-id", "sha256:00"], "diffID"),
    (["convert", "{tar}", "{missing}/x/out.erofs"], "no such directory"),
    (["inspect", "{missing}"], "no such file"),
    (["inspect", "{garbage}"], "not an EROFS image"),
    (["inspect", "{empty}"], "too small"),
    (["inspect", "{truncated}"], "{truncated}"),
    (["merge", "{out}", "{missing}"], "no such file"),
    (["merge", "{out}", "{garbage}"], "not an EROFS image"),
    (["merge", "{out}", "{image}", "{truncated}"], "{truncated}"),
    (["merge", "{out}", "{image}", "--tag", "a", "--tag", "b"], "2 --tag values for 1"),
    (["merge", "{out}", "{image}", "--tag", "x" * 65], "longer than 64 bytes"),
    (["verity", "format", "{missing}"], "no such file"),
    (["verity", "format", "{empty}"], "empty"),
    (
        ["verity", "format", "{data}", "--data-block-size", "3", "--hash-file", "{out}"],
        "data block size 3",
    ),
    (
        ["verity", "format", "{data}", "--hash-block-size", "0", "--hash-file", "{out}"],
        "hash block size 0",
    ),
    (["verity", "format", "{data}", "--salt", "zz", "--hash-file", "{out}"], "salt"),
    (["verity", "format", "{data}", "--uuid", "zz", "--hash-file", "{out}"], "UUID"),
    (["verity", "format", "{data}", "--digest", "zz", "--hash-file", "{out}"], "digest"),
    (["verity", "verify", "{missing}", "--root-hash", "00", "--hash-offset", "0"], "no such file"),
    (
        ["verity", "verify", "{data}", "--root-hash", "00", "--hash-offset", "-5"],
        "--hash-offset -5",
    ),
    (["verity", "verify", "{data}", "--root-hash", "00", "--hash-offset", "4096"], "superblock"),
    (
        ["verity", "verify", "{data}", "--root-hash", "00", "--hash-offset", "99999999999"],
        "superblock",
    ),
    (
        ["verity", "verify", "{data}", "--root-hash", "00", "--hash-offset", "9" * 25],
        "not a possible file offset",
    ),
    (
        ["verity", "verify", "{data}", "--root-hash", "00", "--hash-file", "{missing}"],
        "no such file",
    ),
    (
        [
            "verity",
            "verify",
            "{data}",
            "--root-hash",
            "zz",
            "--no-superblock",
            "--salt",
            "-",
            "--hash-file",
            "{garbage}",
            "--data-blocks",
            "0",
        ],
        "--data-blocks 0",
    ),
    (["attach", "--qmp", "{missing}", "{data}"], "No such file"),
    (["attach", "--qmp", "{garbage}", "{data}"], "not a unix socket"),
    (["attach", "--qmp", "{garbage}", "{dir}"], "is a directory"),
    (["attach", "--qmp", "{garbage}", "{missing}"], "No such file"),
    (["detach", "--qmp", "{missing}", "dev0"], "No such file"),
    (["detach", "--qmp", "{garbage}", "dev0"], "not a unix socket"),
    (["key", "generate", "{missing}/x/k"], "no such directory"),
    (["key", "generate", "{dir}", "--force"], "is a directory"),
    (["key", "show", "{dir}"], "is a directory"),
    (["key", "show", "{missing}"], "no such file"),
    (["key", "show", "{garbage}"], "{garbage}"),
]


@pytest.mark.parametrize(
    "argv,expected", SWEEP, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(SWEEP)]
)
def test_bad_input_is_one_line_and_loses_nothing(bad_inputs, tmp_path, argv, expected):
    names = {k: str(v) for k, v in bad_inputs.items()} | {"out": str(tmp_path / "out")}
    before = {k: sha256_of(v) for k, v in bad_inputs.items() if v.is_file()}
    proc = run_cli(*[a.format(**names) for a in argv])
    assert_one_line_error(proc, expected.format(**names))
    assert not (tmp_path / "out").exists()
    assert temp_files(tmp_path) == [] and temp_files(bad_inputs["dir"]) == []
    assert {k: sha256_of(v) for k, v in bad_inputs.items() if v.is_file()} == before


def unprivileged_root() -> list[str]:
    """Run as root without the capabilities that bypass file permissions, so that a mode
    000 file is unreadable (the venv's interpreter lives under /root: another user could
    not start it)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_DAC_OVERRIDE with setpriv (runs in CI as root)")
    return [require_tool("setpriv"), "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize(
    "command",
    [
        ["convert", "{unreadable}", "{tmp}/out.erofs"],
        ["convert", "{tar}", "{readonly_dir}/out.erofs"],
        ["inspect", "{unreadable}"],
        ["merge", "{tmp}/out.fsmeta", "{unreadable}"],
        ["merge", "{readonly_dir}/out.fsmeta", "{image}"],
        ["verity", "format", "{unreadable}"],
        ["verity", "format", "{readonly}"],
        ["verity", "format", "{image}", "--hash-file", "{readonly_dir}/hash"],
        ["verity", "verify", "{unreadable}", "--root-hash", "00", "--hash-offset", "0"],
    ],
)
def test_unreadable_or_unwritable_is_one_line(bad_inputs, tmp_path, command):
    prefix = unprivileged_root()
    unreadable = tmp_path / "unreadable"
    unreadable.write_bytes(bad_inputs["image"].read_bytes())
    unreadable.chmod(0)
    readonly = tmp_path / "readonly"
    readonly.write_bytes(bytes(8192))
    readonly.chmod(0o444)
    readonly_dir = tmp_path / "ro"
    readonly_dir.mkdir(mode=0o555)
    names = {
        "unreadable": unreadable,
        "readonly": readonly,
        "readonly_dir": readonly_dir,
        "tmp": tmp_path,
        "tar": bad_inputs["tar"],
        "image": bad_inputs["image"],
    }
    proc = subprocess.run(
        [*prefix, *CLI, *[a.format(**names) for a in command]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert_one_line_error(proc)
    assert re.search("permission denied", proc.stderr, re.IGNORECASE), proc.stderr
    assert ".tmp" not in proc.stderr  # the file named is the user's, not a temp name
    assert readonly.read_bytes() == bytes(8192)
    assert list(readonly_dir.iterdir()) == [] and temp_files(tmp_path) == []


def test_sigterm_during_verity_format_restores_the_data(tmp_path):
    """An appending format first pads DATA to the hash offset; a SIGTERM while it hashes (a
    sparse 256 MiB file takes a while) must truncate DATA back to what it was."""
    data = tmp_path / "data.img"
    size = (256 << 20) + 100
    with open(data, "wb") as f:
        f.seek(size - 100)  # a hole, then 100 bytes
        f.write(b"the end of the data".ljust(100, b"."))
    assert data.stat().st_size == size
    proc = subprocess.Popen(
        [*CLI, "verity", "format", str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while data.stat().st_size == size:  # padded once the hashing starts
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    assert proc.returncode == 143, stderr
    assert b"Traceback" not in stderr, stderr
    assert data.stat().st_size == size
    with open(data, "rb") as f:
        f.seek(size - 100)
        assert f.read() == b"the end of the data".ljust(100, b".")


def test_disk_full_is_one_line_naming_the_output(layer, tmp_path):
    """A real full filesystem (a 1 MiB tmpfs) under a 24 MiB layer's output."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (runs in CI as root)")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        proc = run_cli("convert", layer, small / "layer.erofs")
        assert_one_line_error(proc, f"{small / 'layer.erofs'}: no space left on device")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_qmp_socket_nobody_listens_on_is_one_plain_line(odd_files, tmp_path):
    """A stale socket file (its QEMU is gone): the reason in words, not qemu.qmp's reprs."""
    data = tmp_path / "data.img"
    data.write_bytes(bytes(4096))
    proc = run_cli("attach", "--qmp", odd_files["sock"], data)
    assert_one_line_error(proc, "is gone (connection refused)")
    assert "Error(" not in proc.stderr
