"""Imports point down the layers only: math never imports models or recipes, recipes import everything below.

Each top-level module or package of tether has a layer; an import of another one must go to a strictly lower
layer. The table is the architecture (see the README's module list); a new module gets a row here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tether"
LAYERS = {
    "tether.kl": 0, "tether.stats": 0, "tether.config": 0, "tether.testing": 0, "tether.distributed": 0,
    "tether.run_dir": 0,
    "tether.losses": 1, "tether.logprobs": 1, "tether.models": 1, "tether.reference": 1, "tether.data": 1,
    "tether.rewards": 1, "tether.checkpoints": 1,
    "tether.tasks": 2, "tether.prefix": 2, "tether.sampling": 2, "tether.head_divergence": 2, "tether.diagnose": 2,
    "tether.rollout": 3,
    "tether.eval": 4, "tether.training": 4, "tether.inference": 4, "tether.group_filter": 4,
    "tether.online_step": 5, "tether.merge": 5,
    "tether.recipes": 6,
    "tether.cli": 7,
    "tether.__main__": 8,
}


def top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tether":
            if node.module == "tether":  # from tether import kl
                out += [f"tether.{a.name}" for a in node.names]
            else:
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "tether"]
    return out


FILES = sorted(p for p in ROOT.rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_imports_point_down(path):
    module = top(".".join(path.relative_to(ROOT.parent).with_suffix("").parts))
    assert module in LAYERS, f"{module} has no layer: add it to LAYERS in {__file__}"
    for dep in imports(path):
        dep = top(dep)
        if dep == module:
            continue
        assert dep in LAYERS, f"{path}: imports {dep}, which has no layer"
        assert LAYERS[dep] < LAYERS[module], (f"{path}: {module} (layer {LAYERS[module]}) imports {dep} "
                                              f"(layer {LAYERS[dep]}); imports must point to a lower layer")
