"""The package's layering: each module imports only modules of its own or a lower layer (lazy imports
inside functions count), there is no import cycle, teacher inference needs no engine or optimizer, and
the trainer never branches on where the teacher signal comes from."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "pd_dist"

# Bottom up (README "How it works"): a folder (or a top-level module) per floor. A module's floor is
# its folder's; imports inside a floor may go either way as long as they form no cycle.
LAYERS = [
    ["core"],
    ["store", "cluster"],
    ["models", "pipeline_layers", "data"],
    ["config"],
    ["teacher"],
    ["signals"],
    ["train"],
    ["run"],
    ["explore"],
    ["cli"],
    ["entry"],  # the script files launchers start by path
]
FLOOR = {room: i for i, layer in enumerate(LAYERS) for room in layer}


def floor(module: str) -> int:
    return FLOOR[module.split(".")[0]]




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
    assert {m.split(".")[0] for m in _graph()} <= set(FLOOR), {m for m in _graph() if m.split(".")[0] not in FLOOR}


def test_imports_go_down_the_layers():
    bad = [f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
           for a, deps in _graph().items() for b in deps if floor(b) > floor(a)]
    assert not bad, bad


def test_the_teacher_package_imports_no_student_optimizer_trainer_or_orchestration():
    """A teacher rank and the generation job load only the teacher side: by the import graph (every
    import in pd_dist/teacher/, lazy ones included), by the text (no optimizer is built there), and by
    what importing the whole package actually loads."""
    graph = _graph()
    teacher = [m for m in graph if m.startswith("teacher.")]
    assert {"teacher.inference", "teacher.pipelined", "teacher.server", "teacher.serve", "teacher.stores",
            "teacher.generate"} <= set(teacher)
    bad = [f"{a} imports {b}" for a in teacher for b in graph[a]
           if b.split(".")[0] in ("train", "signals", "run", "explore", "cli")]
    assert not bad, bad
    for m in teacher:
        text = (PKG / (m.replace(".", "/") + ".py")).read_text()
        for word in ("torch.optim", "AdamW", "deepspeed.ops", "optimizer="):
            assert word not in text, f"{m} mentions {word}"
    code = ("import sys, pd_dist.teacher.serve, pd_dist.teacher.generate, pd_dist.teacher.stores; "
            "print(sorted(m for m in sys.modules if m.startswith('pd_dist.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PKG.parent).stdout
    loaded = eval(out)
    assert not [m for m in loaded if m.split(".")[1] in ("train", "signals", "run", "explore", "cli")], loaded


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
    text = (PKG / "teacher" / "inference.py").read_text()
    for word in ("deepspeed", "optim", "trainer", "engine"):
        assert f"import {word}" not in text and f"from .{word}" not in text and f"torch.{word}" not in text


def test_trainer_does_not_branch_on_the_signal_source():
    tree = ast.parse((PKG / "train" / "trainer.py").read_text())
    modes = {"none", "colocated", "online", "offline"}
    compared = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)
                for c in [n.left, *n.comparators] if isinstance(c, ast.Constant) and c.value in modes]
    assert not compared, "trainer.py compares against a distill.mode value"
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"ColocatedTeacher", "OnlineTeacher", "StoredLogits", "NoTeacher"}
