"""Layering: the package's imports form no cycle, and no library module imports the CLI.

Read from the source (every `import` anywhere in a file, also inside functions), so an
import that runs only on some path counts too. `kernels/` is installed as gptfast.kernels.
"""
import ast
from pathlib import Path

import gptfast

PACKAGE = Path(gptfast.__file__).resolve().parent
ROOTS = {"gptfast": PACKAGE, "gptfast.kernels": PACKAGE.parent / "kernels"}


def modules() -> dict[str, Path]:
    """{dotted name: file} for every module of the package."""
    found = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if prefix == "gptfast" and parts[0] == "kernels":
                continue  # a stray copy; the installed one is ROOTS["gptfast.kernels"]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module `name` (at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_sees_the_package():
    edges = graph()
    assert {"gptfast.train", "gptfast.finetune.classify", "gptfast.kernels", "gptfast.cli"} <= set(edges)
    assert "gptfast.evaluation" in edges["gptfast.train"]  # relative imports resolve
    assert "gptfast.train" in edges["gptfast.finetune.classify"]  # `from ..train import ...`


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_library_module_imports_the_cli():
    importers = sorted(name for name, deps in graph().items() if "gptfast.cli" in deps)
    assert importers == [], f"library modules importing gptfast.cli (the CLI is on top): {importers}"


def test_files_is_a_bottom_module_used_directly():
    """gptfast.files imports nothing of the package, so any module may use its atomic writes;
    a module that only writes files takes them from there, not through gptfast.checkpoint
    (which pulls in the model)."""
    edges = graph()
    assert edges["gptfast.files"] == set(), f"gptfast.files imports {sorted(edges['gptfast.files'])}"
    plotting = edges["gptfast.plotting"]
    assert plotting <= {"gptfast.files"}, f"gptfast.plotting imports {sorted(plotting)}"
    assert "gptfast.checkpoint" not in edges["gptfast.lora"] | edges["gptfast.finetune"]
