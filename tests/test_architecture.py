"""The package's structure: one direction of imports (counting imports inside functions), a registry that
every listing of methods reads, and a quick `import hf_lowrank`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import hf_lowrank

PACKAGE = Path(hf_lowrank.__file__).parent
# DESIGN.md's order: a module may import only modules listed before it (or inside its own package).
LAYERS = ["version", "registry", "config", "linalg", "layers", "targets", "methods", "sharding", "surgery",
          "serialization", "summary", "inject", "history", "controller", "diagnostics", "hub", "trainer", "cli"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports explicitly, anywhere in its body (functions included)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph):
    """A list of modules forming a cycle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_check_catches_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return LAYERS.index(top)


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert set(LAYERS) >= {m.split(".")[1] for m in graph if "." in m}, "a new module needs a place in LAYERS"
    upward = [(a, b) for a, edges in graph.items() if a != "hf_lowrank" for b in edges
              if b != "hf_lowrank" and _layer(b) > _layer(a)]
    assert not upward, upward
    # no module imports the package root (which imports them)
    assert not [a for a, edges in graph.items() if "hf_lowrank" in edges]


def test_import_is_light():
    """`import hf_lowrank` (needed before every load) does not pull the Trainer, the Hub code or matplotlib."""
    code = ("import sys, hf_lowrank\n"
            "heavy = [m for m in ('hf_lowrank.trainer', 'hf_lowrank.hub', 'hf_lowrank.diagnostics', 'matplotlib',"
            " 'transformers.trainer') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert hf_lowrank.LowRankTrainer.__name__ == 'LowRankTrainer' and callable(hf_lowrank.push_to_hub)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_registry_lists_the_builtin_methods_everywhere():
    from hf_lowrank.methods import Method, method_class, method_names

    assert set(method_names()) >= {"oialr", "inrank", "svd"}
    for name in ("oialr", "inrank", "svd"):
        cls = method_class(name)
        assert issubclass(cls, Method) and cls.name == name and cls.title and cls.card_description
    with pytest.raises(ValueError, match="oialr"):  # the error lists the registered methods
        hf_lowrank.LowRankConfig(method="nope")


def test_knob_ownership_is_declared_in_field_metadata():
    from hf_lowrank.config import knob_owner, method_fields

    assert knob_owner("delay_steps") == "oialr" and knob_owner("freeze_step") == "inrank"
    assert knob_owner("rank_fraction") == "svd" and knob_owner("target_modules") is None
    names = {f.name for f in method_fields("oialr")}
    assert "sigma_cutoff" in names and "init_rank" not in names and "target_modules" in names
