"""Import boundaries of the package layout, checked by walking the source's AST (nothing of the project is imported).

Each package runs in its own process, so what a package imports decides what that process loads:

1. `serve/http/` (the FastAPI ingress) never loads torch, vllm or transformers, directly or through our own modules
   (imports of `serve.*` / `sae.*` / ... are followed transitively, with the `__init__.py` of every package on the way).
2. Only `serve/engine/` imports `vllm` (scope: `serve/`, `sae/`, `trainer/`, `clients/`).
3. `serve/engine/worker/` (imported by string inside vLLM's worker processes) imports nothing of ours but `sae*`,
   `serve.engine.codec` and `serve.engine.worker*`.
4. `sae/` (pure torch library) imports neither `serve` nor `trainer`.
5. `serve` and `trainer` do not import each other.
6. `clients/` (the SDK/CLI) imports nothing of ours.

Every `import` / `from ... import` statement in a file counts, at module level or in functions, classes, `try` blocks;
only the body of `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`) is skipped, since it never runs (its `else:` does).
Relative imports are resolved to absolute names; `from a.b import c` imports the module `a.b.c` when `a/b/c.py` or
`a/b/c/__init__.py` exists, else the name `c` of `a.b`. Imports done by string (`importlib`, vLLM's plugin entry points)
are not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # no engine, no cluster: runs in the first tier

ROOT = Path(__file__).resolve().parents[1]
OURS = ("serve", "sae", "trainer", "clients")  # our top-level packages (the scope of every rule)
HEAVY = ("torch", "vllm", "transformers")


# ---------------------------------------------------------------------------------------------------------- the walker


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of the tree, in source order, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    found = []
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    yield from sorted(found, key=lambda n: (n.lineno, n.col_offset))


def module_name(path: Path, root: Path = ROOT) -> str:
    """`serve/http/api.py` -> `serve.http.api`; `serve/http/__init__.py` -> `serve.http`."""
    parts = list(path.resolve().relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module `name` under `root` (`a/b.py` or `a/b/__init__.py`), or None (third-party / a name)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _resolve_base(path: Path, node: ast.ImportFrom, root: Path) -> str:
    """The absolute module a `from X import ...` statement imports from, relative levels resolved."""
    if not node.level:
        return node.module or ""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]  # a plain module's package is its parent
    up = node.level - 1
    if up > len(package):
        raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
    base = package[: len(package) - up]
    if node.module:
        base.append(node.module)
    return ".".join(base)


@cache
def _parsed(path: Path) -> tuple[ast.Module, list[str]]:
    source = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(source, filename=str(path))
    except SystemError:
        # CPython 3.11's AST conversion keeps one recursion counter per interpreter; a thread another test left
        # running can make it raise "AST constructor recursion depth mismatch". Parsing again gives the real tree.
        tree = ast.parse(source, filename=str(path))
    return tree, source.splitlines()


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module, line) for each module the file imports (once per line), relative imports resolved.

    `import a.b.c` gives `a.b.c`; `from a.b import c` gives `a.b.c` where that is a module of ours, else `a.b`.
    """
    tree, _ = _parsed(path)
    out: list[tuple[str, int]] = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
            continue
        base = _resolve_base(path, node, root)
        for alias in node.names:
            sub = f"{base}.{alias.name}" if base else alias.name
            out.append((sub if alias.name != "*" and module_file(sub, root) else base, node.lineno))
    return list(dict.fromkeys(out))  # `from x import a, b` of names: `x` once for the line


def statement(path: Path, lineno: int) -> str:
    """The source line `lineno` of `path`, stripped (what the failure messages quote)."""
    return _parsed(path)[1][lineno - 1].strip()


def where(path: Path, lineno: int, root: Path = ROOT) -> str:
    return f"{path.relative_to(root)}:{lineno}: {statement(path, lineno)}"


def py_files(*dirs: str, root: Path = ROOT) -> list[Path]:
    return sorted(f for d in dirs for f in (root / d).rglob("*.py") if "__pycache__" not in f.parts)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`, `a.b.c`]: importing a module runs every enclosing package's `__init__` first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def heavy_imports(
    start: Iterable[Path], heavy: tuple[str, ...] = HEAVY, root: Path = ROOT, ours: tuple[str, ...] = OURS
) -> list[str]:
    """Each import of a `heavy` package reachable from the `start` files through our own modules, as the chain of
    `file:line: statement` that reaches it (breadth-first, so each chain is a shortest one)."""
    chains: dict[Path, list[str]] = {}  # file -> the import chain that reached it
    queue: list[Path] = []

    def visit(file: Path | None, chain: list[str]) -> None:
        if file is not None and file not in chains:
            chains[file] = chain
            queue.append(file)

    for path in start:
        for parent in _with_parents(module_name(path, root)):
            visit(module_file(parent, root), [])
    problems: list[str] = []
    while queue:
        file = queue.pop(0)
        for name, lineno in imports_of(file, root):
            step = chains[file] + [where(file, lineno, root)]
            if _top(name) in heavy:
                problems.append(" -> ".join(step))
            elif _top(name) in ours:
                for parent in _with_parents(name):
                    visit(module_file(parent, root), step)
    return problems


def forbidden_imports(files: Iterable[Path], allowed, root: Path = ROOT) -> list[str]:
    """`file:line: statement (imports X)` for each direct import X of the files for which `allowed(X)` is false."""
    return [
        f"{where(f, lineno, root)}  (imports {name})"
        for f in files
        for name, lineno in imports_of(f, root)
        if not allowed(name)
    ]


def _report(rule: str, problems: list[str]) -> str:
    return f"{rule} -- {len(problems)} violation(s):\n  " + "\n  ".join(problems)


# ------------------------------------------------------------------------------------------------------------ the rules


def test_layout_exists():
    """Guard against the rules passing vacuously after a move/rename."""
    for d in (
        "serve/http",
        "serve/replica",
        "serve/directory",
        "serve/engine",
        "serve/engine/worker",
        "serve/launch",
        "sae",
        "trainer",
        "clients",
    ):
        assert py_files(d), f"no Python files under {d}/ -- update tests/test_boundaries.py to the new layout"
    assert module_file("serve.engine.codec"), "serve/engine/codec.py is gone -- update rule 3"


def test_http_never_loads_torch_vllm_transformers():
    problems = heavy_imports(py_files("serve/http"))
    rule = "rule 1: serve/http/ must not import torch/vllm/transformers, even transitively"
    assert not problems, _report(rule, problems)


def test_only_engine_imports_vllm():
    files = [f for f in py_files(*OURS) if not f.is_relative_to(ROOT / "serve/engine")]
    problems = forbidden_imports(files, lambda name: _top(name) != "vllm")
    assert not problems, _report("rule 2: only serve/engine/ may import vllm", problems)


def _worker_may_import(name: str) -> bool:
    if _top(name) not in OURS:
        return True
    return _within(name, "sae") or name == "serve.engine.codec" or _within(name, "serve.engine.worker")


def test_worker_imports_only_sae_codec_and_itself():
    problems = forbidden_imports(py_files("serve/engine/worker"), _worker_may_import)
    assert not problems, _report(
        "rule 3: serve/engine/worker/ may import of ours only sae*, serve.engine.codec, serve.engine.worker*", problems
    )


@pytest.mark.parametrize(
    ("package", "forbidden", "rule"),
    [
        ("sae", ("serve", "trainer"), "rule 4: sae/ must not import serve or trainer"),
        ("serve", ("trainer",), "rule 5: serve/ must not import trainer"),
        ("trainer", ("serve",), "rule 5: trainer/ must not import serve"),
        ("clients", ("serve", "sae", "trainer"), "rule 6: clients/ must import nothing of ours"),
    ],
    ids=["sae-not-serve-trainer", "serve-not-trainer", "trainer-not-serve", "clients-not-ours"],
)
def test_package_does_not_import(package, forbidden, rule):
    problems = forbidden_imports(py_files(package), lambda name: _top(name) not in forbidden)
    assert not problems, _report(rule, problems)


# -------------------------------------------------------------------------------------------- the walker on a toy tree


def test_walker_resolves_relative_imports_and_skips_type_checking(tmp_path):
    files = {
        "pkg/__init__.py": "from . import a\nfrom .sub import thing\n",
        "pkg/a.py": (
            "import os.path\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    import torch\nelse:\n    import json\n"
            "def f():\n    from .sub import deep\n    from .sub.deep import name\n"
        ),
        "pkg/sub/__init__.py": "from ..a import f\nfrom . import *\n",
        "pkg/sub/deep.py": "import typing, vllm.config\n",
        "other.py": "import pkg.a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = {rel: imports_of(tmp_path / rel, tmp_path) for rel in files}
    assert got["pkg/__init__.py"] == [("pkg.a", 1), ("pkg.sub", 2)]  # `thing` is a name of pkg.sub
    assert got["pkg/a.py"] == [("os.path", 1), ("typing", 2), ("json", 6), ("pkg.sub.deep", 8), ("pkg.sub.deep", 9)]
    assert got["pkg/sub/__init__.py"] == [("pkg.a", 1), ("pkg.sub", 2)]
    assert got["pkg/sub/deep.py"] == [("typing", 1), ("vllm.config", 1)]
    # transitively: other -> pkg (its __init__) -> pkg.sub.deep -> vllm; torch (TYPE_CHECKING only) is not reported
    chains = heavy_imports([tmp_path / "other.py"], root=tmp_path, ours=("pkg",))
    assert len(chains) == 1 and chains[0].endswith("pkg/sub/deep.py:1: import typing, vllm.config"), chains
