"""containerd's filter syntax for List (`github.com/containerd/containerd/filters`), the part
snapshots use: `field`, `field==value`, `field!=value`, `field~=regexp`, selectors joined by
`,` (all must match); several filter strings match if any matches. Field paths are dotted;
a part may be quoted (`labels."containerd.io/gc.root"`); values may be quoted.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from snapshotter.errdefs import InvalidArgument

_PART = r'(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_/\-]+)'
_SELECTOR = re.compile(
    rf'\s*(?P<path>{_PART}(?:\.{_PART})*)\s*'
    rf'(?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,]*?))?\s*(?:,|$)'
)

Getter = Callable[[list[str]], str | None]


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_path(path: str) -> list[str]:
    return [_unquote(p) for p in re.findall(_PART, path)]


def _selectors(text: str) -> list[tuple[list[str], str | None, str]]:
    out: list[tuple[list[str], str | None, str]] = []
    pos = 0
    while pos < len(text):
        m = _SELECTOR.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidArgument(f"invalid filter {text!r} at {pos}")
        out.append((_split_path(m["path"]), m["op"], _unquote((m["value"] or "").strip())))
        pos = m.end()
    return out


def _matches(selector: tuple[list[str], str | None, str], get: Getter) -> bool:
    path, op, value = selector
    have = get(path)
    if op is None:
        return have is not None
    if op == "==":
        return have == value
    if op == "!=":
        return have != value
    return have is not None and re.search(value, have) is not None


def compile_filters(filters: list[str]) -> Callable[[Getter], bool]:
    """A predicate over a field getter; no filters match everything."""
    parsed = [_selectors(f) for f in filters if f.strip()]

    def predicate(get: Getter) -> bool:
        return not parsed or any(all(_matches(s, get) for s in sel) for sel in parsed)

    return predicate
