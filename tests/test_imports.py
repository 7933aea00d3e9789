"""The import arrows between blockrag's modules, pinned so the package keeps its shape.

Every ``import`` in the package is read with ``ast`` (module level and function level alike: a lazy
import is still an arrow). Modules sit in layers; a module may import modules of its own layer or of a
lower one, never of a higher one:

    0 leaves   errors, fp8, atomic, hf, aio, kernels, fused   (import no other blockrag module but errors)
    1 core     rope, masks, template, kv, results, prompt, decode, encoder, assemble, attention, graphs
    2 store    store.*                                         (kv never imports store)
    3 engine   engine, blocks (the block source), testing, every other top-level module, the ``blockrag`` facade
    4 apps     index.*, train.*, eval.*, tasks.*, bench.*
    5 entry    cli, *.cli, __main__, serve.*                   (nothing below imports a CLI or the server)

and on top of the layers:

* no circles among blockrag modules (not even through lazy imports);
* no module of the package imports an integration (``langchain_blockrag``, ``llama_index``);
* only the top-level ``blockrag.cli`` imports a subcommand module (``blockrag.<pkg>.cli``): one ``main``,
  subcommands registered there explicitly; only ``python -m blockrag`` (``__main__``) imports ``blockrag.cli``;
* leaves import nothing from blockrag but ``blockrag.errors``.

A new top-level module lands in layer 3 unless it is listed here; put it lower when it is lower.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "blockrag"

LEAVES = {"errors", "fp8", "atomic", "hf", "aio", "kernels", "fused"}
CORE = {"rope", "masks", "template", "kv", "results", "prompt", "decode", "encoder", "assemble", "attention", "graphs"}
APPS = ("index", "train", "eval", "tasks", "bench")
INTEGRATIONS = ("langchain_blockrag", "llama_index")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_entry(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in ("cli", "__main__") or (len(parts) > 1 and parts[1] == "serve")


def layer(name: str) -> int:
    if _is_entry(name):
        return 5
    parts = name.split(".")
    if len(parts) == 1:
        return 3  # the facade
    top = parts[1]
    if top in LEAVES:
        return 0
    if top in CORE:
        return 1
    if top == "store":
        return 2
    if top in APPS:
        return 4
    return 3


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The blockrag module an import refers to (the longest known prefix), or None if outside the package."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(blockrag modules imported, other top-level packages imported) by one module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from blockrag.x import y``: y may itself be a module
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            resolved = _resolve(target, known)
            if resolved is not None and resolved != name:
                inside.add(resolved)
            elif resolved is None:
                outside.add(target.split(".")[0])
    # ``from blockrag.x import y`` adds both blockrag.x and (if y is a module) blockrag.x.y; keep the most
    # specific one, so a package __init__ counts only where the import really goes through it.
    specific = {m for m in inside if not any(o != m and o.startswith(m + ".") for o in inside)}
    return specific, outside


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known)[0] for name, path in known.items()}


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: a function-level import and a relative import are arrows (negative control)."""
    known = {"blockrag": Path("x"), "blockrag.a": Path("x"), "blockrag.b": Path("x"), "blockrag.p": Path("x"),
             "blockrag.p.c": Path("x")}
    source = tmp_path / "a.py"
    source.write_text("import os\n\ndef f():\n    from blockrag.b import thing\n    from .p import c\n")
    inside, outside = imports_of("blockrag.a", source, known)
    assert inside == {"blockrag.b", "blockrag.p.c"} and outside == {"os"}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles(graph):
    assert _cycles(graph) == []


def test_no_arrow_points_up(graph):
    upward = sorted(f"{a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
                    for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_kv_never_imports_store(graph):
    assert not {m for m in graph["blockrag.kv"] if m.startswith("blockrag.store")}


def test_leaves_import_only_errors(graph):
    for name, targets in graph.items():
        if layer(name) == 0:
            assert targets <= {"blockrag.errors"}, (name, targets)


def test_only_the_top_level_cli_imports_subcommands(graph):
    importers = sorted(a for a, targets in graph.items() for b in targets
                       if b.endswith(".cli") and b != "blockrag.cli" and a != "blockrag.cli")
    assert importers == []
    assert [a for a, targets in graph.items() if "blockrag.cli" in targets] in ([], ["blockrag.__main__"])


def test_the_package_never_imports_an_integration():
    known = modules()
    offenders = sorted(name for name, path in known.items()
                       if imports_of(name, path, known)[1] & set(INTEGRATIONS))
    assert offenders == []
