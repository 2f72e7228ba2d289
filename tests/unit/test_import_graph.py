"""The import graph points one way: snapshotter -> passthrough -> shim_integration -> tests,
bench (issue 12). Read with `ast`, so every import counts: inside functions, inside
`if TYPE_CHECKING:`, relative ones. Also: `bench` uses of `tests` only `tests.support`, no
module under `tests/` imports a test module (shared helpers and fixtures live in
`tests/support/`), and product code never edits `sys.path` (the guest payload must import as
it is shipped).

Each rule is a function over a directory tree, checked on the repository and, to show it
can fail, on a tiny synthetic tree.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Rank of each top-level package: a module may import packages of its rank or lower.
RANKS = {"snapshotter": 0, "passthrough": 1, "shim_integration": 2, "tests": 3, "bench": 3}
PRODUCT = ("snapshotter", "passthrough", "shim_integration")
BENCH_MAY_IMPORT = ("tests.support",)  # the one part of `tests` the benchmarks may use

# TEMPORARY, for the lead to empty when the parallel branches of issue 12 merge: `tests/support/`
# (another branch) takes the helpers bench still imports here, and the guest branch removes
# the agent's sys.path edit. Each entry names exactly one importer and one module.
NOT_YET_MOVED: set[tuple[str, str]] = set()
SYS_PATH_NOT_YET_REMOVED: set[str] = set()


def _module_name(rel: Path) -> tuple[str, bool]:
    """Dotted name of the module at REL (relative to the root) and whether it is a package."""
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _python_files(root: Path, top: tuple[str, ...]) -> Iterator[tuple[Path, ast.Module]]:
    for package in top:
        for path in sorted((root / package).rglob("*.py")):
            yield path.relative_to(root), ast.parse(path.read_bytes(), filename=str(path))


def imports(rel: Path, tree: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, absolute dotted module) of every import in the module, relative ones resolved;
    `from X import a` yields X.a as well as X (a may be a submodule)."""
    name, is_package = _module_name(rel)
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def upward_imports(root: Path) -> list[str]:
    """Imports of a package of higher rank than the importer's."""
    found = []
    for rel, tree in _python_files(root, tuple(RANKS)):
        rank = RANKS[rel.parts[0]]
        for line, module in imports(rel, tree):
            top = module.partition(".")[0]
            if RANKS.get(top, -1) > rank:
                found.append(f"{rel}:{line}: imports {module}")
    return sorted(set(found))


def bench_imports_of_tests(root: Path, allowed: Collection[tuple[str, str]] = ()) -> list[str]:
    """`bench` modules importing a part of `tests` other than BENCH_MAY_IMPORT (and ALLOWED)."""
    found = []
    for rel, tree in _python_files(root, ("bench",)):
        for line, module in imports(rel, tree):
            if module != "tests" and not module.startswith("tests."):
                continue
            if any(module == ok or module.startswith(ok + ".") for ok in BENCH_MAY_IMPORT):
                continue
            if (str(rel), module) in allowed or any(
                (str(rel), module.rpartition(".")[0]) == entry for entry in allowed
            ):
                continue  # `from tests.x import name` also yields tests.x.name
            found.append(f"{rel}:{line}: imports {module}")
    return sorted(set(found))


def _test_module_of(module: str) -> str | None:
    """The test module (`test_*` or `conftest`) MODULE is or lies in, if any."""
    parts = module.split(".")
    if parts[0] != "tests":  # a bare `import test_x` is a sibling test module too
        return parts[0] if parts[0].startswith("test_") or parts[0] == "conftest" else None
    for cut, part in enumerate(parts[1:], start=2):
        if part.startswith("test_") or part == "conftest":
            return ".".join(parts[:cut])
    return None


def imports_of_test_modules(root: Path) -> list[str]:
    """Modules under `tests/` importing a test module: what two test modules share belongs in
    `tests/support/` (pytest collects test modules; one importing another runs its tests'
    module-level code twice and ties two tiers together)."""
    found = []
    for rel, tree in _python_files(root, ("tests",)):
        for line, module in imports(rel, tree):
            target = _test_module_of(module)
            if target is not None:
                found.append(f"{rel}:{line}: imports {target}")
    return sorted(set(found))


def _is_sys_path(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    )


def sys_path_edits(root: Path, allowed: Collection[str] = ()) -> list[str]:
    """Product modules that change `sys.path`: a method call on it (append, insert, ...),
    an assignment to it, to an item or slice of it, or an augmented one (`+=`), or
    `from sys import path`."""
    found = []
    for rel, tree in _python_files(root, PRODUCT):
        if str(rel) in allowed:
            continue
        for node in ast.walk(tree):
            edit = None
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and _is_sys_path(node.func.value)
            ):
                edit = f"sys.path.{node.func.attr}()"
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if _is_sys_path(target) or (
                        isinstance(target, ast.Subscript) and _is_sys_path(target.value)
                    ):
                        edit = "assignment to sys.path"
            elif (
                isinstance(node, ast.ImportFrom)
                and node.module == "sys"
                and any(alias.name == "path" for alias in node.names)
            ):
                edit = "from sys import path"
            if edit:
                found.append(f"{rel}:{node.lineno}: {edit}")
    return sorted(found)


# --- the repository ---------------------------------------------------------------------


def test_no_upward_import() -> None:
    assert upward_imports(REPO) == []


def test_bench_imports_only_tests_support() -> None:
    assert bench_imports_of_tests(REPO, NOT_YET_MOVED) == []


def test_no_test_module_imports_another() -> None:
    assert imports_of_test_modules(REPO) == []


def test_not_yet_moved_lists_only_what_is_still_there() -> None:
    """The temporary allowances shrink as the moves land: a stale entry fails here."""
    still = {tuple(f.split(": imports ")) for f in bench_imports_of_tests(REPO)}
    still = {(where.rpartition(":")[0], module) for where, module in still}
    stale = {
        entry
        for entry in NOT_YET_MOVED
        if not any(
            w == entry[0] and (m == entry[1] or m.startswith(entry[1] + ".")) for w, m in still
        )
    }
    assert stale == set()
    assert {f.partition(":")[0] for f in sys_path_edits(REPO)} == SYS_PATH_NOT_YET_REMOVED


def test_product_code_leaves_sys_path_alone() -> None:
    assert sys_path_edits(REPO, SYS_PATH_NOT_YET_REMOVED) == []


def test_package_inits_stay_light() -> None:
    """Importing a package loads no compressor and nothing of a layer above it (issue 12:
    package `__init__`s stay light; the format must be importable without isal/zstandard)."""
    code = (
        "import sys\n"
        "import snapshotter, snapshotter.erofs, snapshotter.fsmeta, snapshotter.ingest\n"
        "import snapshotter.service, snapshotter.verity\n"
        "heavy = {'zstandard', 'isal', 'isal.isal_zlib', 'grpc', 'cryptography', 're2',\n"
        "         'snapshotter.ingest.streams', 'snapshotter.erofs.writer', 'passthrough',\n"
        "         'shim_integration', 'qemu.qmp'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# --- each rule can fail -----------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_upward_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "snapshotter/__init__.py": "",
            "snapshotter/ok.py": "import os\nfrom snapshotter import errors\n",
            "snapshotter/late.py": "def f():\n    import passthrough.qmp\n",
            "snapshotter/typed.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from shim_integration.shim import Shim\n"
            ),
            "passthrough/__init__.py": "",
            "passthrough/rel.py": "from . import attach\nfrom ..tests import helpers\n",
            "shim_integration/x.py": "import snapshotter, passthrough\n",
            "bench/b.py": "import tests.support\nimport shim_integration\n",
            "tests/t.py": "import bench\n",
        },
    )
    assert upward_imports(root) == [
        "passthrough/rel.py:2: imports tests",
        "passthrough/rel.py:2: imports tests.helpers",
        "snapshotter/late.py:2: imports passthrough.qmp",
        "snapshotter/typed.py:3: imports shim_integration.shim",
        "snapshotter/typed.py:3: imports shim_integration.shim.Shim",
    ]


def test_bench_import_of_tests_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "bench/a.py": "import tests.support.layers\nfrom tests.support import tar\n",
            "bench/b.py": "from tests.helpers import mounted\n",
            "bench/c.py": "from tests import layers\n",
        },
    )
    assert bench_imports_of_tests(root) == [
        "bench/b.py:1: imports tests.helpers",
        "bench/b.py:1: imports tests.helpers.mounted",
        "bench/c.py:1: imports tests",
        "bench/c.py:1: imports tests.layers",
    ]
    assert bench_imports_of_tests(root, {("bench/b.py", "tests.helpers")}) == [
        "bench/c.py:1: imports tests",
        "bench/c.py:1: imports tests.layers",
    ]


def test_test_module_import_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "tests/support/layers.py": "from tests.support.helpers import mounted\n",
            "tests/fuzz/targets.py": "from tests.support.layers import Entry\n",
            "tests/kernel/test_a.py": (
                "from tests.kernel.test_b import helper\nfrom tests.fuzz import targets\n"
            ),
            "tests/kernel/test_c.py": "def f():\n    from . import test_b\n",
            "tests/vm/test_d.py": "import tests.conftest\nimport test_e\n",
            "tests/vm/test_ok.py": "from tests.support.helpers import require_root\n",
        },
    )
    assert imports_of_test_modules(root) == [
        "tests/kernel/test_a.py:1: imports tests.kernel.test_b",
        "tests/kernel/test_c.py:2: imports tests.kernel.test_b",
        "tests/vm/test_d.py:1: imports tests.conftest",
        "tests/vm/test_d.py:2: imports test_e",
    ]


@pytest.mark.parametrize(
    "edit",
    [
        "sys.path.append('/x')",
        "sys.path.insert(0, '/x')",
        "sys.path = ['/x']",
        "sys.path[:0] = ['/x']",
        "sys.path += ['/x']",
    ],
)
def test_sys_path_edit_is_found(tmp_path: Path, edit: str) -> None:
    root = _tree(
        tmp_path,
        {
            "passthrough/guest/a.py": f"import sys\n\ndef f():\n    {edit}\n",
            "snapshotter/ok.py": "import sys\nprint(sys.path[0])\n",
            "bench/free.py": f"import sys\n{edit}\n",
        },
    )
    assert len(sys_path_edits(root)) == 1
    assert sys_path_edits(root)[0].startswith("passthrough/guest/a.py:4: ")
    assert sys_path_edits(root, {"passthrough/guest/a.py"}) == []


# --- the package APIs ----------------------------------------------------------------------

PACKAGES = [
    "snapshotter",
    "snapshotter.erofs",
    "snapshotter.ingest",
    "snapshotter.fsmeta",
    "snapshotter.service",
    "snapshotter.verity",
    "passthrough",
    "shim_integration",
    "shim_integration.testbed",
]


def _declared_names(package: str) -> tuple[list[str], set[str]]:
    """`__all__` of PACKAGE's __init__ and the names it imports (eagerly or for type checkers)."""
    tree = ast.parse((REPO / package.replace(".", "/") / "__init__.py").read_text())
    declared: list[str] = []
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            declared = list(ast.literal_eval(node.value))
        elif isinstance(node, ast.ImportFrom) and node.module not in (
            "__future__",
            "typing",
            "snapshotter.lazy_exports",
        ):
            imported |= {alias.asname or alias.name for alias in node.names}
    return declared, imported


@pytest.mark.parametrize("package", PACKAGES)
def test_package_all_resolves(package: str) -> None:
    """Every name in `__all__` is imported for type checkers and resolves at run time."""
    declared, imported = _declared_names(package)
    assert declared and len(declared) == len(set(declared))
    assert set(declared) == imported
    code = (
        f"import {package} as p\n"
        "missing = [n for n in p.__all__ if getattr(p, n, None) is None]\n"
        "print(missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_api_doc_names_exist() -> None:
    """Every dotted name docs/api.md cites (`package.module.Name`) imports."""
    text = (REPO / "docs" / "api.md").read_text()
    names = sorted(
        set(re.findall(r"`((?:snapshotter|passthrough|shim_integration)(?:\.\w+)+)", text))
    )
    assert len(names) > 20
    code = (
        "import importlib, sys\n"
        "missing = []\n"
        "for name in sys.argv[1:]:\n"
        "    parts = name.split('.')\n"
        "    for cut in range(len(parts), 0, -1):\n"
        "        try:\n"
        "            obj = importlib.import_module('.'.join(parts[:cut]))\n"
        "        except ModuleNotFoundError:\n"
        "            continue\n"
        "        try:\n"
        "            for attr in parts[cut:]:\n"
        "                obj = getattr(obj, attr)\n"
        "        except AttributeError:\n"
        "            missing.append(name)\n"
        "        break\n"
        "    else:\n"
        "        missing.append(name)\n"
        "print(missing)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_top_level_inits_need_nothing_else(tmp_path: Path) -> None:
    """The guest image ships `snapshotter/__init__.py` and `passthrough/__init__.py` with only
    a few of their modules: both must import alone, on the standard library."""
    for package in ("snapshotter", "passthrough"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_bytes(
            (REPO / package / "__init__.py").read_bytes()
        )
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import passthrough, snapshotter\n"
        "ours = ('snapshotter', 'passthrough')\n"
        "print(sorted(m for m in sys.modules if m.startswith(ours)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['passthrough', 'snapshotter']"
