"""The shape of the code (README "Layout"): common/ by job with imports only going downward, no import cycles, one
logger, short functions, the HU window written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# common's sub-packages, bottom first: each may import only those of a lower rank (train and infer are siblings)
RANK = {"core": 0, "volume": 1, "networks": 2, "storage": 3, "evaluation": 4, "train": 5, "infer": 5}
PROJECT = ("common", "coarse_base_seg", "fine_efficient_seg", "data_prepare", "benchmarks", "predict")
SKIP = {".venv", ".git", "__pycache__", "demo_output", "fixtures"}


def _sources(*tops: str) -> list[Path]:
    files = []
    for top in tops:
        path = ROOT / top
        if path.suffix == ".py":
            files.append(path)
            continue
        files += [p for p in path.rglob("*.py") if not SKIP & set(p.relative_to(ROOT).parts)]
    return sorted(files)


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every project module `path` imports, at the top or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [n for n in names if n.split(".")[0] in PROJECT]
    return out


def test_common_imports_only_go_downward():
    problems = []
    for path in _sources("common"):
        parts = path.relative_to(ROOT / "common").parts
        own = parts[0] if len(parts) > 1 else None  # None: a top-level module of common, above every sub-package
        for name in _imports(path):
            top = name.split(".")
            if top[0] != "common":
                problems.append(f"{path.relative_to(ROOT)} imports {name} (common imports no stage or benchmark)")
            elif len(top) > 1 and top[1] in RANK and own in RANK and top[1] != own and RANK[top[1]] >= RANK[own]:
                problems.append(f"{path.relative_to(ROOT)} ({own}) imports {name}")
            elif own in RANK and len(top) > 1 and top[1] not in RANK and not top[1].startswith("_"):
                if (ROOT / "common" / f"{top[1]}.py").is_file():
                    problems.append(f"{path.relative_to(ROOT)} ({own}) imports the top-level module {name}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    files = _sources(*PROJECT[:-1], "predict.py")
    modules = {_module(p): p for p in files}

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in modules:
                return ".".join(parts)
            parts.pop()
        return None

    graph = {m: {t for n in _imports(p) if (t := resolve(n)) and t != m} for m, p in modules.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, cycles


def test_common_is_split_by_job():
    top_modules = sorted(p.name for p in (ROOT / "common").glob("*.py"))
    assert len(top_modules) <= 8, top_modules
    packages = sorted(p.parent.name for p in (ROOT / "common").glob("*/__init__.py"))
    assert set(RANK) <= set(packages), packages
    for name in packages:
        doc = ast.get_docstring(ast.parse((ROOT / "common" / name / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"common/{name}/__init__.py must say what it owns and may import"


def test_one_logger_configured_by_entry_points_only():
    """Modules log through common.core.logger's "semiseg" logger; no module makes its own, and the library prints
    nothing (only the command lines at common's top level and in the stages do)."""
    problems = []
    for path in _sources(*PROJECT[:-1], "predict.py"):
        if path == ROOT / "common" / "core" / "logger.py":
            continue
        text = path.read_text(encoding="utf-8")
        library = path.relative_to(ROOT).parts[0] == "common" and path.parent != ROOT / "common"
        for pattern in (r"logging\.getLogger\(", r"logging\.basicConfig\(") + ((r"\bprint\(",) if library else ()):
            if re.search(pattern, text):
                problems.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert not problems, problems


def test_functions_fit_on_a_screen():
    long = []
    for path in _sources(*PROJECT[:-1], "predict.py", "tests"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 70:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long


def test_the_hu_window_default_is_written_once():
    literal = re.compile(r"-325(\.0)?\s*,\s*325")
    holders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
               if not SKIP & set(p.relative_to(ROOT).parts) and literal.search(p.read_text(encoding="utf-8"))]
    assert holders == ["common/core/defaults.py"], holders
