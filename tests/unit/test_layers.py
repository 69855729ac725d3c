"""The package's structure: imports go one way, down the layers, and no module grows past a size
a reader can hold. Imports are read from the source (AST), function-local ones included."""
from __future__ import annotations

import ast
from pathlib import Path

import kfuse

ROOT = Path(kfuse.__file__).parent
MAX_LINES = 700

# Lower layers never import higher ones. Modules of one layer import each other only within their
# own package (kfuse.passes.autofuse may import kfuse.passes.fold; kfuse.capture may not import
# kfuse.kernels). Shape inference runs the reference functions, so ops sits below ir.
LAYERS = [
    ("kfuse.errors", "kfuse._version"),
    ("kfuse.config", "kfuse.report", "kfuse.verify", "kfuse.models"),
    ("kfuse.progress",),
    ("kfuse.ops",),
    ("kfuse.ir",),
    ("kfuse.rewrite", "kfuse.kernels", "kfuse.cost", "kfuse.capture"),
    ("kfuse.passes",),
    ("kfuse.backends",),
    ("kfuse.runtime",),
    ("kfuse.artifact",),
    ("kfuse.api",),
    ("kfuse.dynamo_graph",),
    ("kfuse.dynamo_step",),
    ("kfuse.dynamo", "kfuse.cli", "kfuse.testing", "kfuse.serving"),
    ("kfuse",),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def imports(path: Path, me: str | None = None) -> set[str]:
    """kfuse modules that `path` (module `me`) imports anywhere in its body."""
    me = me or module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kfuse")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kfuse":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if is_module(sub) else target)
    found.discard(me)
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer entry that holds the module)."""
    best = None
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if (name == e or name.startswith(e + ".")) and (best is None or len(e) > len(best[1])):
                best = (i, e)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best


GRAPH = {module_name(p): imports(p) for p in sorted(ROOT.rglob("*.py"))}


def test_imports_go_down_the_layers():
    wrong = []
    for mod, deps in GRAPH.items():
        li, entry = layer_of(mod)
        for d in deps:
            lj, dentry = layer_of(d)
            if lj > li or (lj == li and dentry != entry and mod != "kfuse"):
                wrong.append(f"{mod} (layer {li}) imports {d} (layer {lj})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    state: dict[str, int] = {}      # 1: on the current path, 2: done

    def visit(m, path):
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if d.startswith("kfuse") and m.startswith(d + "."):
                continue            # a module importing its own package: Python loads the package first anyway
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [m])


def test_modules_stay_small():
    big = {module_name(p): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_checker_sees_function_local_imports(tmp_path):
    """The walk must not miss the imports that dodge a cycle at run time."""
    deps = GRAPH["kfuse.runtime"]
    assert "kfuse.backends" in deps and "kfuse.runtime.memplan" in deps
    probe = tmp_path / "autofuse.py"
    probe.write_text((ROOT / "passes" / "autofuse.py").read_text()
                     + "\n\ndef _late():\n    from ..runtime import build_program\n")
    assert "kfuse.runtime" in imports(probe, "kfuse.passes.autofuse")
