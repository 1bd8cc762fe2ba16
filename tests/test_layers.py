"""The layers import downward only (kernels ← runtime ← passes ← compiler, DESIGN.md, Layout), and no module imports
itself through others, lazy imports included."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"kernels": "moe_ascend.kernels", "runtime": "moe_ascend.runtime", "passes": "moe_ascend.passes",
           "compiler": "moe_ascend.compiler"}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for its ``__init__``)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return found


MODULES = _modules()
# What each folder may import from the package (by module prefix); compiler/ may import everything.
ALLOWED = {
    "kernels": ("moe_ascend.kernels",),
    "runtime": ("moe_ascend.kernels", "moe_ascend.runtime"),
    "passes": ("moe_ascend.kernels", "moe_ascend.runtime.topology", "moe_ascend.passes"),
}


def package_imports(path: Path) -> list[tuple[int, str]]:
    """The package's modules (or packages) ``path`` imports, with their lines: ``from a.b import c`` counts as
    ``a.b.c`` where that is a module, else as ``a.b``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, _module(f"{node.module}.{alias.name}")) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, _module(alias.name)) for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("moe_ascend.")]


def _module(dotted: str) -> str:
    while dotted not in MODULES and "." in dotted:  # `from package import name`: the name may not be a module
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(folder):
    upward = [f"{path.relative_to(ROOT)}:{line} imports {name}"
              for path in sorted((ROOT / folder).rglob("*.py"))
              for line, name in package_imports(path)
              if not name.startswith(ALLOWED[folder])]
    assert upward == []


def module_graph() -> dict[str, set[str]]:
    """Every module of the package → the package's modules it imports (function-level imports included)."""
    return {name: {module for _, module in package_imports(path) if module in MODULES and module != name}
            for name, path in MODULES.items()}


def test_no_module_imports_itself_through_others():
    graph, cycles = module_graph(), []
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join(path[path.index(other):] + [other]))
            elif other not in state:
                visit(other, path + [other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


BUILD_A_TRANSFORMERS_MOE = """
import torch, transformers
config = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                    num_experts_per_tok=2)
print(tuple(transformers.MixtralForCausalLM(config)(torch.randint(0, 64, (1, 4))).logits.shape))
import kernels, moe_ascend.kernels
print(kernels.__file__ != moe_ascend.kernels.__file__, torch.ops.moe_ascend.topk_softmax.__name__)
"""


def test_the_repository_root_is_safe_to_work_in():
    # `python -c` from the root puts it first on sys.path, where kernels/ would shadow Hugging Face's `kernels`
    import subprocess
    import sys

    pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, "-c", BUILD_A_TRANSFORMERS_MOE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["(1,", "4,", "64)", "True", "topk_softmax"]
