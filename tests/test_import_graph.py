"""The package's import graph: stages import only earlier stages and the low modules, and nothing imports in a circle.

Read from the source (``import`` statements anywhere in a file, those inside functions included), so a late
import cannot hide an upward dependency.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dpo4rec"
STAGES = ["data", "prompts", "generate", "encode", "recommend", "reward", "align", "heldout", "drift", "report"]
"""The stages in pipeline order, each a subpackage whose output the next ones read."""
TOP = {"cli", "run", "__main__"}
"""What chains the stages: may import anything."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the dpo4rec modules it imports (``from dpo4rec.x import y`` counts y when it is a module)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpo4rec":
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "dpo4rec"}
        graph[name] = found - {name}
    return graph


def part(module: str) -> str:
    """``dpo4rec.reward.stage`` -> ``reward``; ``dpo4rec.stats`` -> ``stats``."""
    return module.split(".")[1] if "." in module else module


def test_stages_import_only_earlier_stages_and_low_modules():
    wrong = []
    for module, targets in imports().items():
        here = part(module)
        for target in targets:
            there = part(target)
            if here in TOP or there == here or there == "dpo4rec":
                continue
            if there in TOP:
                wrong.append(f"{module} imports {target} (the top: cli and run chain the stages)")
            elif there in STAGES and (here not in STAGES or STAGES.index(there) > STAGES.index(here)):
                wrong.append(f"{module} imports {target} ({there} comes after {here})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle():
    graph = imports()
    state, stack, cycles = {}, [], []

    def visit(node):  # depth-first search; a grey node met again closes a cycle
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "grey":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "black"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_graph_is_read():  # the checks above would pass on an empty graph
    graph = imports()
    assert "dpo4rec.reward.stage" in graph["dpo4rec.run"] and "dpo4rec.stats" in graph["dpo4rec.heldout.stage"]
