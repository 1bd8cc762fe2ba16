"""The layers import downward only: kernels ← runtime ← passes ← compiler (DESIGN.md, Layout)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each folder may import from the package (by module prefix); compiler/ may import everything.
ALLOWED = {
    "kernels": ("moe_ascend.kernels",),
    "runtime": ("moe_ascend.kernels", "moe_ascend.runtime"),
    "passes": ("moe_ascend.kernels", "moe_ascend.runtime.topology", "moe_ascend.passes"),
}


def package_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                                                     if node.module == "moe_ascend.runtime"]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.startswith("moe_ascend.")]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(folder):
    upward = [f"{path.relative_to(ROOT)}:{line} imports {name}"
              for path in sorted((ROOT / folder).rglob("*.py"))
              for line, name in package_imports(path)
              if not name.startswith(ALLOWED[folder])
              and not (name == "moe_ascend.runtime" and folder == "runtime")]
    assert upward == []
