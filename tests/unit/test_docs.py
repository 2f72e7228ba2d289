"""The docs point at things that exist: every repository path, module and doc section that
README.md and docs/*.md name (and every docs/ reference in the code) is there, and no doc sends
a reader outside the repository.

What counts as a repository path: a word with a `/` whose first component is a top-level entry
of the checkout (`snapshotter/...`, `tests/...`, `vm-images/build`, `docs/`). Upstream paths
(`fs/erofs/super.c`, `plugins/snapshots/erofs/erofs.go`) start elsewhere and are not checked.
A dotted name starting with one of our packages (`snapshotter.verity.worker`,
`shim_integration.shim.devices_of`) must be a module, or a name its module defines.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("snapshotter", "passthrough", "shim_integration", "tests", "bench")

# A path-like word: components of name characters joined by `/`, optionally `./`- or
# `../`-relative. It stops at `<`, `*`, `{`, so `tests/fuzz/examples/*.json` checks the folder.
PATH_WORD = re.compile(r"(?<![\w./~$-])((?:\.\.?/)*[\w.-]+(?:/[\w.-]+)*/?)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE_WORD = re.compile(r"(?<![\w./-])((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_]\w*)+)")
# Named by the docs but added by other branches of the same restructure (issue 12), merged
# after this one. Each entry must be removed once it exists: test_pending_is_still_pending.
PENDING: frozenset[str] = frozenset()
SECTION_REF = re.compile(r"(docs/\w+\.md),? \"([^\"]+)\"")


def _tracked() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()


@cache
def _top_level() -> frozenset[str]:
    names = {p.split("/", 1)[0] for p in _tracked()}
    return frozenset(n for n in names if not n.startswith(".git") or n == ".ci")


def repo_paths(text: str) -> list[str]:
    """The words of TEXT that name a path inside the repository (by their first component)."""
    found = []
    for m in PATH_WORD.finditer(text):
        word = m.group(1).rstrip(".")
        if "/" not in word or word.startswith("../"):
            continue
        first = word.removeprefix("./").split("/", 1)[0]
        if first in _top_level():
            found.append(word)
    return found


def outside_paths(text: str) -> list[str]:
    """Words that climb out of the tree they are read from (`../shared/x`), links aside."""
    without_links = LINK.sub("]()", text)
    return [m.group(1) for m in PATH_WORD.finditer(without_links) if m.group(1).startswith("../")]


def _names_bound(node: ast.AST) -> list[str]:
    """The module-level names NODE binds (or lists in `__all__`)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return [a.asname or a.name.split(".")[0] for a in node.names]
    if not isinstance(node, (ast.Assign, ast.AnnAssign)):
        return []
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    names = [t.id for t in targets if isinstance(t, ast.Name)]
    if "__all__" in names and isinstance(node.value, (ast.List, ast.Tuple)):
        names += [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return names


def _defines(module: Path, name: str) -> bool:
    tree = ast.parse(module.read_text(), str(module))
    return any(name in _names_bound(node) for node in ast.walk(tree))


def module_problem(dotted: str) -> str | None:
    """None if DOTTED is a module or package of ours, or a name one of them defines."""
    parts = dotted.split(".")
    here = REPO
    for i, part in enumerate(parts):
        if (here / part).is_dir():
            here = here / part
            continue
        if (here / f"{part}.py").is_file():
            here = here / f"{part}.py"
            rest = parts[i + 1 :]
            break
        rest = parts[i:]
        here = here / "__init__.py"
        break
    else:
        return None
    if not rest:
        return None
    if not here.is_file():
        return f"{dotted}: no module {here.relative_to(REPO)}"
    if not _defines(here, rest[0]):
        return f"{dotted}: {here.relative_to(REPO)} defines no {rest[0]!r}"
    return None


def _headings(doc: Path) -> list[str]:
    """Headings, and the bold or colon labels that open a paragraph (`**Salt.**`, `Which to
    pick:`): what a reference like docs/kata.md, "Salt" may name."""
    lines = doc.read_text().splitlines()
    return [line.lstrip("#").strip() for line in lines if line.startswith("#")] + [
        line.strip().removeprefix("**")
        for line in lines
        if line.startswith("**") or line.rstrip().endswith(":")
    ]


def section_problems(text: str) -> list[str]:
    problems = []
    for m in SECTION_REF.finditer(text):
        doc, section = REPO / m.group(1), m.group(2)
        if not doc.is_file():
            problems.append(f"{m.group(1)}: no such doc")
        elif not any(h.startswith(section) or f" {section}" in h for h in _headings(doc)):
            problems.append(f'{m.group(1)} has no section "{section}"')
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_repository_path_exists(doc: Path):
    text = doc.read_text()
    missing = sorted({w for w in repo_paths(text) if not (REPO / w).exists() and w not in PENDING})
    for target in LINK.findall(text):
        if "://" in target or target.startswith("#"):
            continue
        resolved = (doc.parent / target.split("#", 1)[0]).resolve()
        if not resolved.is_relative_to(REPO):
            missing.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            missing.append(target)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_doc_points_outside_the_repository(doc: Path):
    outside = outside_paths(doc.read_text())
    assert not outside, f"{doc.name} points outside the repository: {outside}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_module_named_exists(doc: Path):
    text = doc.read_text()
    problems = sorted(
        {p for w in set(MODULE_WORD.findall(text)) - PENDING if (p := module_problem(w))}
    )
    assert not problems, f"{doc.name}: {problems}"


def test_every_docs_reference_resolves():
    """docs/X.md (and its quoted section) named anywhere in the tree, code comments included."""
    problems = []
    for name in _tracked():
        path = REPO / name
        if path == Path(__file__).resolve():
            continue  # its own examples of broken references
        if path.suffix not in {".py", ".md", ".toml", ".service", ""} or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for ref in set(re.findall(r"(?<![\w/.])docs/[\w-]+\.md", text)):
            if not (REPO / ref).is_file() and ref not in PENDING:
                problems.append(f"{name}: {ref} does not exist")
        problems += [f"{name}: {p}" for p in section_problems(text)]
        if re.search(r"\bDESIGN(\.md| §)", text):
            problems.append(f"{name}: names DESIGN.md, which is docs/design.md")
    assert not problems, "\n".join(problems)


def test_pending_is_still_pending():
    """PENDING excuses only what does not exist yet: once a branch lands, its entry goes."""

    def exists(name: str) -> bool:
        if "/" in name or name.endswith(".md"):
            return (REPO / name).exists()
        as_path = REPO / name.replace(".", "/")
        return as_path.is_dir() or as_path.with_suffix(".py").is_file()

    landed = sorted(p for p in PENDING if exists(p))
    assert not landed, f"remove from PENDING, they exist now: {landed}"


def test_the_checks_can_fail():
    """Each rule above catches what it is for, on text made to break it."""
    text = (
        "See `snapshotter/no_such_module.py`, tests/nowhere/ and fs/erofs/super.c "
        "(upstream); run `python -m snapshotter.verity.no_such_worker`; "
        'read ../shared/design.md; docs/design.md "No such section".'
    )
    assert [w for w in repo_paths(text) if not (REPO / w).exists()] == [
        "snapshotter/no_such_module.py",
        "tests/nowhere/",
    ]
    assert outside_paths(text) == ["../shared/design.md"]
    assert outside_paths("[the unit](../contrib/serve.toml)") == []
    assert module_problem("snapshotter.verity.no_such_worker")
    assert module_problem("snapshotter.errors.NoSuchError")
    assert module_problem("snapshotter.errors.EpError") is None
    assert module_problem("snapshotter.verity.worker") is None
    assert section_problems(text) == ['docs/design.md has no section "No such section"']
