"""The `serve` configuration: defaults, then a TOML file, then command-line flags.

Every key is a field of `ServeConfig` with its meaning in the field's metadata; the checks, the
error messages and the key list in `serve --help` are all derived from those fields, so adding a
key is adding a field. Values are checked against the field's type without conversion: TOML
`vm_mode = "false"` is an error, not `bool("false")`. Every problem is reported, one line each.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import stat
import tomllib
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from snapshotter.erofs.limits import DEFAULT_LIMITS, Limits
from snapshotter.errors import InvalidArgument
from snapshotter.service.mounts import CLASSIC, MOUNT_STYLES

MAX_CONFIG_BYTES = 1 << 20  # a configuration file is a few lines; refuse anything bigger
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(InvalidArgument):
    """The configuration is wrong; one problem per line. `serve` exits 2, as for bad usage."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _meta(meaning: str, **checks: Any) -> dict[str, Any]:
    """A key's metadata: its meaning for --help and the checks beyond its type."""
    return {"help": meaning, **checks}


@dataclass
class ServeConfig:
    root: Path = field(
        default=Path("/var/lib/erofs-passthrough"),
        metadata=_meta("state directory: metadata.db and snapshots/ (one serve per root)"),
    )
    address: Path = field(
        default=Path("/run/erofs-passthrough/snapshotter.sock"),
        metadata=_meta("unix socket of the Snapshots, Diff and Health services (mode 0600)"),
    )
    containerd_address: Path = field(
        default=Path("/run/containerd/containerd.sock"),
        metadata=_meta("containerd's socket: the differ reads layer blobs from its content store"),
    )
    workers: int = field(
        default=16, metadata=_meta("gRPC worker threads (calls served at once)", min=1, max=1024)
    )
    containerd_content: str = field(
        default="",
        metadata=_meta(
            "containerd's content store directory (<containerd root>/io.containerd.content.v1"
            ".content): the differ hands a layer's blob file there to its conversion worker "
            "instead of streaming it over the Content API; empty: always stream",
            path=True,
        ),
    )
    convert_workers: int = field(
        default=0,
        metadata=_meta(
            "conversion worker processes (the differ's and Commit's layer conversions run in "
            "them, in parallel); 0: one per CPU",
            min=0,
            max=1024,
        ),
    )
    grace_seconds: float = field(
        default=5.0,
        metadata=_meta("on SIGTERM, in-flight calls get this long", min=0.0, max=3600.0),
    )
    log_level: str = field(
        default="info",
        metadata=_meta("debug logs every RPC; JSON lines on stderr", choices=LOG_LEVELS),
    )
    # Container rootfs snapshots (not unpacks) get VM-mode mounts (fsmeta + devices) unless
    # their labels say otherwise (containerd.io/snapshot/erofs.vm-mode).
    vm_mode: bool = field(
        default=False,
        metadata=_meta(
            "container snapshots get VM-mode mounts (fsmeta + block devices) unless their labels "
            "say otherwise"
        ),
    )
    # A private key (erofs-passthrough key generate): VM-mode chains get a signed manifest.
    signing_key: str = field(
        default="",
        metadata=_meta(
            "private key file (erofs-passthrough key generate): VM-mode chains get a signed "
            "root-hash manifest; empty: unsigned",
            path=True,
        ),
    )
    kata_verity: bool = field(
        default=False,
        metadata=_meta(
            "layer and fsmeta dm-verity trees without a salt, so every Kata reader of the "
            "volume options loads the same table (docs/kata.md); applies to layers stored after"
        ),
    )
    mount_style: str = field(
        default=CLASSIC,
        metadata=_meta(
            'the mounts non-VM-mode snapshots get: "classic" (host-mounted layers under bind, '
            'erofs or overlay mounts; every containerd from 1.6 mounts them) or "containerd-2.3" '
            "(containerd main's erofs snapshotter shape: an erofs mount per layer with "
            "X-containerd.dmverity=<sidecar>, then format/mkdir/overlay; for containerd 2.3+ and "
            "Kata runtime-rs; docs/containerd.md)",
            choices=MOUNT_STYLES,
        ),
    )
    # Tail packing of the layers the differ and Commit convert (docs/containerd.md: off, and
    # why, with the numbers).
    tail_packing: bool = field(
        default=False,
        metadata=_meta(
            "layers stored after get each file's last partial block inline after its inode "
            "when it fits, as mkfs.erofs and `convert` do (smaller layers; each VM-mode "
            "chain's fsmeta then carries those tails); off: whole blocks, as containerd's own "
            "erofs differ (-Enoinline_data) and `publish` write them"
        ),
    )
    # Pre-built layers keyed by diffID, containerd's layer_content_caches (layer_cache.py).
    layer_caches: list[Path] = field(
        default_factory=list,
        metadata=_meta(
            "read-only directories of pre-built layers keyed by diffID, in containerd's "
            "layer_content_caches layout (<algo>/<xx>/<hex>.erofs + .dmverity; `ctr images "
            "build-erofs-cache` or `erofs-passthrough publish --out-cache` fill one), searched in "
            "order: a checked hit is copied into the snapshot, and the layer is neither read "
            "from the content store nor converted (docs/containerd.md)"
        ),
    )
    # The differ's ceilings on one tar layer (snapshotter.erofs.limits.Limits).
    max_tar_bytes: int = field(
        default=DEFAULT_LIMITS.max_tar_bytes,
        metadata=_meta("a layer may decompress to at most this many tar bytes", min=1),
    )
    max_image_bytes: int = field(
        default=DEFAULT_LIMITS.max_image_bytes,
        metadata=_meta("a layer's EROFS image may be at most this many bytes", min=1),
    )
    max_entries: int = field(
        default=DEFAULT_LIMITS.max_entries,
        metadata=_meta("a layer may have at most this many tar entries", min=1),
    )
    max_metadata_bytes: int = field(
        default=DEFAULT_LIMITS.max_metadata_bytes,
        metadata=_meta(
            "memory a layer's inode tree (names, link targets, xattrs, chunk indexes) may take",
            min=1,
        ),
    )

    def limits(self) -> Limits:
        """The differ's per-layer ceilings: the four configurable ones, the rest defaults."""
        return dataclasses.replace(
            DEFAULT_LIMITS,
            max_tar_bytes=self.max_tar_bytes,
            max_image_bytes=self.max_image_bytes,
            max_entries=self.max_entries,
            max_metadata_bytes=self.max_metadata_bytes,
        )


_TYPES: dict[str, Any] = get_type_hints(ServeConfig)
_TYPE_NAMES = {
    Path: "a path",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _describe(value: object) -> str:
    """VALUE as TOML would name and spell it: `string "false"`, `integer 3`, `table {...}`."""
    if isinstance(value, bool):
        kind, text = "boolean", str(value).lower()
    elif isinstance(value, int):
        kind, text = "integer", str(value)
    elif isinstance(value, float):
        kind, text = "float", repr(value)
    elif isinstance(value, str):
        kind, text = "string", json.dumps(value)
    elif isinstance(value, list):
        kind, text = "array", json.dumps(value, default=str)
    elif isinstance(value, dict):
        kind, text = "table", json.dumps(value, default=str)
    else:
        kind, text = type(value).__name__, str(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def toml_literal(value: object) -> str:
    """A default as it would be written in the TOML file."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path | str):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return repr(value)


def _check(f: Field, value: object, from_file: bool) -> tuple[object, str | None]:
    """(the value to use, None) or (None, what is wrong with VALUE for key F)."""
    want = _TYPES[f.name]
    if want == list[Path]:
        if not isinstance(value, list):
            return None, f"must be an array of absolute paths, got {_describe(value)}"
        paths = []
        for i, item in enumerate(value):
            checked, problem = _check_path(item.absolute() if isinstance(item, Path) else item)
            if problem is not None:
                return None, f"item {i + 1} {problem}"
            paths.append(checked)
        return paths, None
    if want is Path:
        if isinstance(value, Path):  # a flag: relative to the working directory, as usual
            return value.absolute(), None
        return _check_path(value)
    ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        return None, f"must be {_TYPE_NAMES[want]}, got {_describe(value)}"
    meta = f.metadata
    if want is float and not math.isfinite(value):  # type: ignore[arg-type]
        return None, f"must be a finite number, got {_describe(value)}"
    if "min" in meta and value < meta["min"]:
        return None, f"must be at least {meta['min']}, got {_describe(value)}"
    if "max" in meta and value > meta["max"]:
        return None, f"must be at most {meta['max']}, got {_describe(value)}"
    if "choices" in meta and value not in meta["choices"]:
        return None, f"must be one of {', '.join(meta['choices'])}, got {_describe(value)}"
    if meta.get("path") and value and from_file and not os.path.isabs(str(value)):
        return None, f"must be an absolute path, got {_describe(value)}"
    return value, None


def _check_path(value: object) -> tuple[Path | None, str | None]:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value:
        return None, f"must be a non-empty path string, got {_describe(value)}"
    if "\0" in value:
        return None, "must not contain a NUL byte"
    if not os.path.isabs(value):
        return None, f"must be an absolute path, got {_describe(value)}"
    return Path(value), None


def read_config_file(path: Path) -> dict[str, object]:
    """The TOML table in PATH; ConfigError (one line) when it cannot be read or parsed."""
    where = f"config {path}"
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read: {exc.strerror}"]) from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the start, a directory cannot be read
        raise ConfigError([f"{where}: not a regular file"])
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError([f"{where}: larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read: {exc.strerror}"]) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{where}: not UTF-8 text (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: not valid TOML: {exc}"]) from None


def load_config(path: Path | None, **overrides: object) -> ServeConfig:
    """Defaults, then FILE.toml's keys (ServeConfig's field names), then OVERRIDES (flags; None
    means not given). Raises ConfigError listing every problem."""
    by_name = {f.name: f for f in fields(ServeConfig)}
    config = ServeConfig()
    problems: list[str] = []
    sources: list[tuple[str, dict[str, object], bool]] = []
    if path is not None:
        sources.append((f"config {path}", read_config_file(path), True))
    sources.append(("option", {k: v for k, v in overrides.items() if v is not None}, False))
    for where, values, from_file in sources:
        for name, value in values.items():
            f = by_name.get(name)
            if f is None:
                hint = difflib.get_close_matches(name.replace("-", "_"), by_name, n=1)
                also = f" (did you mean '{hint[0]}'?)" if hint else ""
                problems.append(f"{where}: unknown key '{name}'{also}")
                continue
            checked, problem = _check(f, value, from_file)
            if problem is not None:
                label = f"key '{name}'" if from_file else f"--{name.replace('_', '-')}"
                problems.append(f"{where}: {label} {problem}")
            else:
                setattr(config, name, checked)
    if problems:
        raise ConfigError(problems)
    return config


def _default(f: Field) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def keys_help() -> str:
    """Every config key with its default and meaning, for `serve --help`."""
    lines = ["configuration keys (TOML file given with --config; flags override the file):"]
    for f in fields(ServeConfig):
        default = _default(f)
        lines.append(f"  {f.name} = {toml_literal(default)}")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def example_toml() -> str:
    """contrib/serve.toml: every key commented out at its default, with its meaning."""
    import textwrap

    out = [
        "# /etc/erofs-passthrough/serve.toml: erofs-passthrough serve --config FILE",
        "# Every key, commented out at its default; `erofs-passthrough serve --help` lists "
        "them too.",
    ]
    for f in fields(ServeConfig):
        out.append("")
        out.extend(f"# {line}" for line in textwrap.wrap(f.metadata["help"], 96))
        out.append(f"#{f.name} = {toml_literal(_default(f))}")
    return "\n".join(out) + "\n"
