"""dvc.yaml cannot go stale: every stage depends on every project module its code imports."""
import ast
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PACKAGES = ("prunekit", "stages", "flows")
SHARED = ("stages.common", "stages.making")  # what the stages share; not stages themselves
CHECKER = "stages.check"  # runs every stage's check(params): the one stage that imports the others


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of the project modules `path` imports (at any depth of its code)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import submodule`
    return {name for name in found if name.split(".")[0] in PACKAGES and _module_file(name)}


def closure(module: str) -> set[Path]:
    """Files of every project module that importing `module` runs (parent packages included)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix not in seen:
                seen.add(prefix)
                todo += sorted(_imports(_module_file(prefix), prefix))
    return {_module_file(name).relative_to(ROOT) for name in seen}


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_closure_follows_relative_and_lazy_imports():
    files = closure("stages.schedule")
    assert Path("prunekit/allocation/search.py") in files  # imported inside a function
    assert Path("prunekit/kernels/sweep.py") in files  # through prunekit.kernels' __init__
    assert Path("prunekit/__init__.py") in files and Path("prunekit/api.py") not in files


@pytest.mark.parametrize("name", sorted(_stages()))
def test_every_imported_module_is_a_dependency(name):
    stage = _stages()[name]
    body = stage.get("do", stage)  # a foreach stage (evaluate, baseline): its one body
    assert body["cmd"].split()[:3] == ["prunekit", "stage", name]
    missing = sorted(str(f) for f in closure(f"stages.{name}") if not _covered(f, body["deps"]))
    assert not missing, f"dvc.yaml stage {name} misses deps {missing}"


def _project_modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def test_imports_go_one_way():
    """flows → stages → prunekit: the library imports neither edge, a stage imports no other stage
    (only what they share: stages.common and stages.making)."""
    for module in _project_modules("prunekit"):
        edges = {m for m in _imports(_module_file(module), module) if m.split(".")[0] != "prunekit"}
        assert not edges, f"{module} imports {sorted(edges)}"
    for module in _project_modules("stages"):
        others = {m for m in _imports(_module_file(module), module)
                  if m.startswith("stages.") and m not in SHARED and m != module and module != CHECKER}
        assert not others, f"{module} imports {sorted(others)}"
        assert not any(m.startswith("flows") for m in _imports(_module_file(module), module))
