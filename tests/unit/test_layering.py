"""The import direction of every module in the package (walked with pkgutil, imports read from the AST,
function-level ones included), no import cycles, and the house rule: the core imports no Ray, MLflow or DVC."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import fssmeta

# Lower rank = lower layer; a module may import only modules of its own rank or below. Within a rank the
# cycle check keeps the graph a DAG. Prefixes, longest match wins.
RANKS = {
    "fssmeta.episode": 0, "fssmeta.config": 0, "fssmeta.distributed": 0,
    "fssmeta.losses": 1, "fssmeta.metrics": 1, "fssmeta.data": 1, "fssmeta.decoding": 1,
    "fssmeta.models.ops": 2, "fssmeta.models.backbone": 2, "fssmeta.models.method": 2,
    "fssmeta.models.feature_cache": 2,
    "fssmeta.models.memory": 3, "fssmeta.models.mining": 3, "fssmeta.models.pspnet": 3,
    "fssmeta.models.family": 4, "fssmeta.models.ensemble": 4,
    "fssmeta.models": 5,  # the method files and the package (METHODS)
    "fssmeta.params": 6,
    "fssmeta.checkpoint": 7, "fssmeta.tracking": 7,
    "fssmeta.train": 8, "fssmeta.adaptation": 8,
    "fssmeta.runs": 9, "fssmeta.fscs": 9,
    "fssmeta.stages": 10, "fssmeta.evaluation": 10, "fssmeta.cross_domain": 10, "fssmeta.predict": 10,
    "fssmeta.predict_ways": 10,
    "fssmeta.report": 11, "fssmeta.served": 11,
    "fssmeta.integrations": 12,
    "fssmeta.cli": 13, "fssmeta.cli_registry": 13,
}
SERVICES = ("ray", "mlflow", "dvc")
FORBIDDEN = {"fssmeta.models": ("fssmeta.data",)}  # models never read files: data -> models, not back


def rank(module: str) -> int:
    matches = [p for p in RANKS if module == p or module.startswith(p + ".")]
    assert matches, f"{module}: no layer in RANKS; add it"
    return RANKS[max(matches, key=len)]


def modules() -> list[str]:
    names = ["fssmeta"]
    names += [m.name for m in pkgutil.walk_packages(fssmeta.__path__, "fssmeta.")]
    return sorted(n for n in names if n != "fssmeta" and n != "fssmeta.__main__")


def imports(module: str) -> set[str]:
    """The fssmeta modules and third-party top-level packages `module` imports, anywhere in its body."""
    path = Path(importlib.util.find_spec(module).origin)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from fssmeta.models import ops` imports the submodule fssmeta.models.ops
                sub = f"{node.module}.{alias.name}"
                found.add(sub if node.module.startswith("fssmeta") and _is_module(sub) else node.module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def test_every_module_imports_downwards_only():
    problems = []
    for module in modules():
        for target in imports(module):
            if target.startswith("fssmeta."):
                if rank(target) > rank(module):
                    problems.append(f"{module} (rank {rank(module)}) imports {target} (rank {rank(target)})")
                for prefix, banned in FORBIDDEN.items():
                    if module.startswith(prefix) and target.startswith(banned):
                        problems.append(f"{module} imports {target}")
            elif target.split(".")[0] in SERVICES and not module.startswith(("fssmeta.integrations", "fssmeta.cli")):
                problems.append(f"{module} imports the service library {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {m: {t for t in imports(m) if t.startswith("fssmeta.") and t != m} for m in modules()}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(node):], node]))
        if node in done:
            return
        for target in graph.get(node, ()):
            visit(target, [*stack, node])
        done.add(node)

    for module in graph:
        visit(module, [])


def test_the_walk_sees_the_layers():
    """The two tests above would pass vacuously on an empty walk: check it finds what it must."""
    found = modules()
    assert {"fssmeta.models.memory", "fssmeta.models.mining", "fssmeta.models.family", "fssmeta.models.bam",
            "fssmeta.integrations.ray_train", "fssmeta.data.dataset", "fssmeta.params"} <= set(found)
    assert "fssmeta.models.ops" in imports("fssmeta.models.bam")  # `from fssmeta.models import ops`
    assert "ray" in imports("fssmeta.integrations.ray_train")


def test_core_imports_no_services():
    code = (
        "import sys, fssmeta.cli, fssmeta.config, fssmeta.params, fssmeta.metrics, fssmeta.stages, "
        "fssmeta.evaluation, fssmeta.cross_domain, fssmeta.runs, fssmeta.predict, fssmeta.report, fssmeta.data.dataset, "
        "fssmeta.data.prepare, fssmeta.data.episode_lists, fssmeta.data.synthetic, fssmeta.data.coco, "
        "fssmeta.data.targets, fssmeta.models;"
        "bad = [m for m in ('ray', 'mlflow', 'dvc', 'torchvision') if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_the_unit_tier_imports_no_services():
    """Plain `pytest` (the unit tier) collects without importing Ray or MLflow."""
    code = ("import sys, pytest; pytest.main(['--co', '-q', '-p', 'no:cacheprovider']);"
            "print('LOADED', ','.join(m for m in ('ray', 'mlflow', 'dvc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert "LOADED \n" in result.stdout or result.stdout.rstrip().endswith("LOADED"), result.stdout[-2000:]
