"""The code's layout: modules import each other in one direction (no cycle, lazy imports included), the
served model never imports the training package, and no module outgrows one job."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion_dist", "data_prep")
MAX_LINES = 400
SERVING = ("fusion_dist.registry", "fusion_dist.export", "fusion_dist.predict", "fusion_dist.pyfunc_model")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & set(known)
            found |= subs or {node.module}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(f, known) - {m} for m, f in known.items()}


def test_imports_form_no_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])


def test_serving_code_does_not_import_training():
    g = graph()
    for start in SERVING:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += g[m]
        assert not {m for m in seen if m.startswith("fusion_dist.train")}, start


def test_no_module_outgrows_one_job():
    long = {m: n for m, f in modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long
