"""The package's layering: each module imports only modules of its own or a lower layer (lazy imports
inside functions count), there is no import cycle, teacher inference needs no engine or optimizer, and
the trainer never branches on where the teacher signal comes from."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pd_dist"

# Bottom up (README "How it works").
LAYERS = [
    ["configlib", "runtime", "monitor", "logits", "schedules", "store", "store.codec", "store.format",
     "store.reader", "store.writer", "bridge", "layout", "topology", "models", "data", "data.config", "data.corpus", "data.documents",
     "data.indexed", "data.prepare", "data.dataset", "losses", "config"],
    ["inference", "spool"],
    ["online", "signals"],
    ["student", "pipeline", "checkpoint", "trainer"],
    ["run", "generate"],
    ["evaluate", "sweep", "report"],
    ["cli", "plan"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name != "__init__" else ""] = f
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """pd_dist modules `name` imports anywhere in its body (relative and absolute forms)."""
    pkg_parts = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[:len(pkg_parts) - (node.level - 1)] if node.level > 1 else pkg_parts
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("pd_dist"):
                mod = node.module.removeprefix("pd_dist").lstrip(".")
            else:
                continue
            targets = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("pd_dist").lstrip(".") for a in node.names
                       if a.name.startswith("pd_dist")]
        found.update(t for t in targets if t in modules and t not in ("", name))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items() if m}


def test_every_module_has_a_layer():
    assert set(_graph()) <= set(RANK), set(_graph()) - set(RANK)


def test_imports_go_down_the_layers():
    bad = [f"{a} (layer {RANK[a]}) imports {b} (layer {RANK[b]})"
           for a, deps in _graph().items() for b in deps if RANK[b] > RANK[a]]
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, trail):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_teacher_inference_needs_no_engine_or_optimizer():
    text = (PKG / "inference.py").read_text()
    for word in ("deepspeed", "optim", "trainer", "engine"):
        assert f"import {word}" not in text and f"from .{word}" not in text and f"torch.{word}" not in text


def test_trainer_does_not_branch_on_the_signal_source():
    tree = ast.parse((PKG / "trainer.py").read_text())
    modes = {"none", "colocated", "online", "offline"}
    compared = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                for c in [n.left, *n.comparators] if isinstance(c, ast.Constant) and c.value in modes]
    assert not compared, "trainer.py compares against a distill.mode value"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"ColocatedTeacher", "OnlineTeacher", "StoredLogits", "NoTeacher"}
