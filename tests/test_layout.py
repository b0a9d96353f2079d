"""The package's layout: no import circles, small modules, documented subpackages, old paths kept.

The import graph is read from the source with :mod:`ast` (nothing is imported), so a circle is
found even when one of its imports sits inside a function: a lazy import only hides a circle
until someone moves it to the top of the file.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

from dbprepro._compat import MOVED

PKG = "dbprepro"
SRC = Path(__file__).resolve().parents[1] / "src" / PKG
MAX_LINES = 400

# Modules still over MAX_LINES that are being split in another refactoring; remove each name
# once its module is split (the test fails for any other module over the limit).
OVER_400_TO_SPLIT: set[str] = set()  # every module is split now; keep it empty


def _modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = path.relative_to(src.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """Follow ``_compat.MOVED`` from a path with no module: an old path imports its new module."""
    seen = set()
    while name not in modules and name in MOVED and name not in seen:
        seen.add(name)
        name = MOVED[name]
    return name


def _targets(modules: dict[str, Path], importer: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package modules one import statement executes (with the packages around them)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            is_pkg = modules[importer].name == "__init__.py"
            base = importer.split(".") if is_pkg else importer.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        mod = _resolve(mod, modules)
        names = [_resolve(f"{mod}.{a.name}", modules) for a in node.names]
        names = [n if n in modules else mod for n in names]
    out = set()
    for name in (_resolve(n, modules) for n in names):
        if name != PKG and not name.startswith(PKG + "."):
            continue
        parts = name.split(".")
        for i in range(2, len(parts) + 1):  # dbprepro.a.b runs dbprepro.a first
            prefix = ".".join(parts[:i])
            if prefix in modules and not (importer + ".").startswith(prefix + "."):
                out.add(prefix)
    out.discard(importer)
    return out


def import_graph(lazy: bool, modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    """module -> the package modules it imports; ``lazy`` adds the imports inside functions."""
    graph: dict[str, set[str]] = {m: set() for m in modules}

    def visit(module: str, node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)) and (lazy or not inside):
                graph[module] |= _targets(modules, module, child)
            visit(module, child, inside)

    for module, path in modules.items():
        visit(module, ast.parse(path.read_text(), str(path)), False)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_graph_reader_catches_the_old_lazy_circle(tmp_path):
    """The imports of 0.1's checkpoints -> data -> datasets_cifar -> checkpoints circle, one of
    them inside a function: invisible at module level, caught when lazy imports count."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""x."""\nfrom . import _compat\n')
    (pkg / "_compat.py").write_text("")
    (pkg / "io.py").write_text("")
    (pkg / "checkpoints.py").write_text("from .data import sha256_file\n")
    (pkg / "data.py").write_text("from .io import savez\n\ndef prepare_split():\n"
                                 "    from .datasets_cifar import load_cifar10_parts\n")
    (pkg / "datasets_cifar.py").write_text("from .checkpoints import download_hf\n")
    modules = _modules(pkg)
    assert find_cycle(import_graph(lazy=False, modules=modules)) is None
    assert find_cycle(import_graph(lazy=True, modules=modules)) == [
        "dbprepro.checkpoints", "dbprepro.data", "dbprepro.datasets_cifar", "dbprepro.checkpoints"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_at_module_level():
    cycle = find_cycle(import_graph(lazy=False))
    assert cycle is None, "module-level import circle: " + " -> ".join(cycle)


def test_no_import_circle_counting_imports_inside_functions():
    # e.g. the old checkpoints -> data (sha256_file) -> datasets_cifar (lazy) -> checkpoints
    cycle = find_cycle(import_graph(lazy=True))
    assert cycle is None, "import circle (counting imports inside functions): " + " -> ".join(cycle)


def test_modules_are_at_most_400_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    over = {m: n for m, n in sizes.items() if n > MAX_LINES and m not in OVER_400_TO_SPLIT}
    assert not over, f"modules over {MAX_LINES} lines (split them): {over}"
    done = sorted(m for m in OVER_400_TO_SPLIT if sizes.get(m, 0) <= MAX_LINES)
    assert not done, f"remove from OVER_400_TO_SPLIT (now split or gone): {done}"


def test_every_subpackage_has_a_docstring():
    packages = {m: p for m, p in MODULES.items() if p.name == "__init__.py"}
    assert len(packages) > 1
    missing = [m for m, p in packages.items() if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, f"subpackages without a docstring: {missing}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_still_import_as_the_new_module(old):
    new = MOVED[old]
    targets = (new,) if isinstance(new, str) else new
    assert old not in MODULES, f"{old} moved to {new} but a module is still at the old path"
    for target in targets:
        assert target in MODULES, f"{old} maps to {target}, which is not a module of the package"
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    if isinstance(new, str):  # the same module object: monkeypatching either name patches both
        assert module is importlib.import_module(new)
    else:  # split in several: every public name of each is there
        for target in targets:
            mod = importlib.import_module(target)
            own = [k for k, v in vars(mod).items() if not k.startswith("_") and getattr(v, "__module__", None) == target]
            assert own and all(getattr(module, k) is getattr(mod, k) for k in own), target
    assert any(issubclass(w.category, DeprecationWarning) and targets[0] in str(w.message) for w in caught), \
        f"importing {old} did not warn that it moved to {new}"


def test_every_rule_runs_the_stage_of_its_name_in_the_module_of_its_rule_file():
    """A reader of ``workflow/rules/<file>.smk`` finds what rule R runs without a registry: the
    function R of ``dbprepro/pipeline/<file>.py`` (and that is what the stage runner calls)."""
    import re

    from dbprepro import pipeline

    rules_dir = SRC.parents[1] / "workflow" / "rules"
    seen = 0
    for smk in sorted(rules_dir.glob("*.smk")):
        text = smk.read_text()
        for rule in re.findall(r"^\s*rule (\w+):", text, flags=re.M):
            seen += 1
            module = importlib.import_module(f"dbprepro.pipeline.{smk.stem}")
            assert callable(getattr(module, rule, None)), f"{smk.name}: rule {rule} has no {module.__name__}.{rule}"
            assert pipeline.STAGES[rule] is getattr(module, rule)
        if re.search(r"^\s*rule \w+:", text, flags=re.M):
            assert f"src/dbprepro/pipeline/{smk.stem}.py" in text.splitlines()[0], f"{smk.name}: first line names its module"
    assert seen == len(pipeline.STAGES) >= 30
