"""containerd's filter syntax for List (`github.com/containerd/containerd/filters`), the part
snapshots use: `field`, `field==value`, `field!=value`, `field~=regexp`, selectors joined by
`,` (all must match); several filter strings match if any matches. Field paths are dotted;
a part may be quoted (`labels."containerd.io/gc.root"`); values may be quoted.

`~=` patterns are RE2 (Go's regexp syntax, as containerd compiles them) run by google-re2 in
linear time: a pattern such as `^(a+)+$` cannot stall the server the way a backtracking engine
would (Python's `re` holds the GIL while it backtracks). Each pattern is compiled once, when the
filter is parsed; an invalid one is InvalidArgument, as in containerd.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import re2

from snapshotter.errors import InvalidArgument

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the error comes back to the caller, not on our stderr

_PART = r'(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_/\-]+)'
# RE2 here too: with a backtracking engine, `[^,]*?` then `\s*` is quadratic in a run of spaces
# (a filter of a few kilobytes stalls the server; a request of megabytes would never end).
_SELECTOR = re2.compile(
    rf"\s*(?P<path>{_PART}(?:\.{_PART})*)\s*"
    rf'(?:(?P<op>==|!=|~=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^,]*?))?\s*(?:,|$)',
    _RE2_OPTIONS,
)

Getter = Callable[[list[str]], str | None]
Selector = tuple[list[str], str | None, str, "re2._Regexp | None"]


def compile_pattern(pattern: str) -> re2._Regexp:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else "invalid"
        reason = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        raise InvalidArgument(f"invalid filter regexp {pattern!r}: {reason}") from None


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def _split_path(path: str) -> list[str]:
    return [_unquote(p) for p in re.findall(_PART, path)]


def _selectors(text: str) -> list[Selector]:
    out: list[Selector] = []
    pos = 0
    while pos < len(text):
        m = _SELECTOR.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidArgument(f"invalid filter {text!r} at {pos}")
        value = _unquote((m["value"] or "").strip())
        pattern = compile_pattern(value) if m["op"] == "~=" else None
        out.append((_split_path(m["path"]), m["op"], value, pattern))
        pos = m.end()
    return out


def _matches(selector: Selector, get: Getter) -> bool:
    path, op, value, pattern = selector
    have = get(path)
    if op is None:
        return have is not None
    if op == "==":
        return have == value
    if op == "!=":
        return have != value
    return have is not None and pattern is not None and pattern.search(have) is not None


def compile_filters(filters: list[str]) -> Callable[[Getter], bool]:
    """A predicate over a field getter; no filters match everything."""
    parsed = [_selectors(f) for f in filters if f.strip()]

    def predicate(get: Getter) -> bool:
        return not parsed or any(all(_matches(s, get) for s in sel) for sel in parsed)

    return predicate
