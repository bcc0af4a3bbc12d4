"""The package's layout is its architecture: each package imports only packages below it, the module graph has no
cycle (imports inside functions count too), and `import minicpm4` / `minicpm4 --help` do not import torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minicpm4"
# lower rank = lower layer; a module may import its own package and packages of lower or equal rank but never a
# sibling of equal rank in another package (quant, sparse and text stay independent of each other)
RANK = {"base": 0, "kernels": 1, "quant": 2, "sparse": 2, "text": 2, "model": 3, "io": 4, "engine": 5, "train": 6,
        "spec": 7, "serve": 8, "data": 9, "apps": 10, "cli": 11}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    p = PACKAGE.parent / name.replace(".", "/")
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def internal_imports(path: Path) -> set[str]:
    """minicpm4 modules `path` imports anywhere (module level or inside functions), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in ast.walk(node)}
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "minicpm4"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] == "minicpm4":
                found |= {f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base for a in node.names}
    return found - {me}


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "base"


GRAPH = {module_name(p): internal_imports(p) for p in PACKAGE.rglob("*.py")}


def test_packages_import_only_downward():
    up = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in sorted(GRAPH.items()) if m != "minicpm4"
          for d in sorted(deps) if d != "minicpm4" and layer(d) != layer(m) and RANK[layer(d)] >= RANK[layer(m)]]
    assert not up, "imports that go up or sideways:\n" + "\n".join(up)


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_and_the_package_and_cli_stay_light():
    modules = sorted(m for m in GRAPH if not m.endswith("__main__"))
    code = ("import sys, importlib\n"
            "import minicpm4, minicpm4.cli\n"
            "assert 'torch' not in sys.modules, 'import minicpm4 / minicpm4.cli imported torch'\n"
            "minicpm4.__version__\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "assert minicpm4.load.__module__ == 'minicpm4.io.loader'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "minicpm4.cli", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "Commands:" in r.stdout, r.stderr[-2000:]
    imported = {line.rpartition("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in imported and "torch" not in imported, "minicpm4 --help imported torch"
