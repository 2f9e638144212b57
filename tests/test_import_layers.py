"""The package's layers, read from the source (AST): imports run model <- engine <- inference <- deploy
<- apps (the CLI), over a base of datasets, files, settings and locks; no cycle between subpackages;
imports inside functions only where a table chooses what to load (the CLI's command table, the
predictor backends, torchrun's processes) and in the package's public names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "glocalclip"

#: layer of each part of the package: a module may import its own layer and the ones below
LAYERS = {"settings": 0, "files": 0, "locks": 0, "datasets": 0, "model": 1, "engine": 2, "inference": 3,
          "deploy": 4, "apps": 5, "__init__": 6, "__main__": 6, "_compat": 6}
#: modules that choose what to load at run time, so that a command loads only what it runs
LAZY_ALLOWED = {"__init__.py", "apps/cli.py", "apps/backends.py", "apps/processes.py"}
#: in-function imports still left, each with its reason (shrink, never grow)
LAZY_LEFT = {
    "inference/visualize.py": "the AUPRO curve of --save_vis needs engine.metrics (torch); overlays stay torch-free",
    "apps/report.py": "report reads results.json without torch; torch only for a run's checkpoint still on disk",
    "model/__init__.py": "GlocalCLIP on first use: the config (and --help) load without torch",
    "engine/__init__.py": "metrics on first use: engine.settings loads without torch",
    "datasets/__init__.py": "the torch Dataset on first use: meta.json and pixels load without torch",
    "deploy/__init__.py": "OnnxPredictor on first use: the flags (deploy.metadata) load without numpy or Pillow",
    "model/checkpoint_format.py": "__version__ from the package root, which imports nothing heavy",
    "engine/settings.py": "the dataset catalogue, read when a --dataset is given",
    "datasets/synthetic.py": "meta.json written when a dataset is made",
}


def part_of(module: str) -> str:
    """glocalclip.engine.x -> engine; glocalclip.files -> files; glocalclip -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, source: str | None = None) -> list[tuple[str, bool]]:
    """(absolute glocalclip module, inside a function?) for every import statement of ``path``."""
    here = ["glocalclip", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = here if path.name == "__init__.py" else here[:-1]
    if path.name == "__init__.py":
        package = here[:-1]
    tree = ast.parse(path.read_text() if source is None else source)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            first = node.args[0] if node.args else None
            constant = isinstance(first, ast.Constant) and isinstance(first.value, str)
            names = [first.value] if constant else ["glocalclip.<computed>"]  # a name made at run time: could be ours
        found += [(n, id(node) in in_function or isinstance(node, ast.Call))
                  for n in names if n == "glocalclip" or n.startswith("glocalclip.")]
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def own_part(path: Path) -> str:
    first = path.relative_to(PACKAGE).parts[0]
    return first[:-3] if first.endswith(".py") else first


def layer_breaks(paths: list[Path]) -> list[str]:
    breaks = []
    for path in paths:
        mine = own_part(path)
        for module, _ in imports_of(path):
            other = part_of(module)
            if module == "glocalclip" or other in ("__version__", "<computed>"):
                continue  # the version string, from the root
            if LAYERS[other] > LAYERS[mine]:
                breaks.append(f"{rel(path)} imports {module}")
    return breaks


def test_every_part_has_a_layer():
    assert {own_part(p) for p in modules()} <= set(LAYERS)


def test_imports_run_one_way_from_model_to_the_cli():
    assert layer_breaks(modules()) == []


def test_the_layer_check_sees_an_import_going_up():
    """A deploy module importing the CLI, and an engine module importing inference, are caught."""
    for where, code in (("deploy/serve.py", "from ..apps.predict_cli import x"),
                        ("engine/training.py", "from ..inference import detector"),
                        ("model/scoring.py", "import glocalclip.engine.smoothing")):
        path = PACKAGE / where
        mine, found = own_part(path), imports_of(path, code)
        assert any(LAYERS[part_of(m)] > LAYERS[mine] for m, _ in found), (where, code)


def test_no_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for path in modules():
        for module, _ in imports_of(path):
            if module != "glocalclip" and part_of(module) != "<computed>":
                graph.setdefault(own_part(path), set()).add(part_of(module))
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt != node:
                visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    assert cycles == []
    assert {"inference", "deploy"} <= graph["apps"] and "inference" in graph["deploy"]  # the graph is read


def test_imports_inside_functions_only_where_a_table_chooses_what_to_load():
    lazy = {rel(p) for p in modules() if any(inner for _, inner in imports_of(p))}
    assert sorted(lazy - LAZY_ALLOWED - set(LAZY_LEFT)) == []
    assert {"apps/cli.py", "apps/backends.py"} <= lazy  # the check sees the tables' imports


@pytest.mark.parametrize("code", ["def f():\n    from ..inference import detector\n",
                                  "def f():\n    import glocalclip.deploy.runtime\n",
                                  "import importlib\nm = importlib.import_module('glocalclip.apps.cli')\n"])
def test_the_lazy_check_sees_each_spelling(code):
    assert any(inner for _, inner in imports_of(PACKAGE / "apps" / "probe.py", code))


def borrowed_names(path: Path, source: str | None = None) -> list[str]:
    """What ``path`` takes from another module without being its home: a private name (``_x``), or a
    name imported and never used there (a re-export). A package's ``__init__`` is its public face
    and may re-export."""
    tree = ast.parse(path.read_text() if source is None else source)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.arg, ast.AnnAssign))] + \
        [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    quoted = [ast.parse(a.value, mode="eval") for a in annotations  # "ClassScores": a name used in a string
              if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    used = {n.id for t in [tree, *quoted] for n in ast.walk(t) if isinstance(n, ast.Name)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                name = alias.asname or alias.name
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{rel(path)}: private {node.module}.{alias.name}")
                elif path.name != "__init__.py" and name not in used:
                    found.append(f"{rel(path)}: re-exports {node.module}.{alias.name}")
    return found


def test_no_module_borrows_a_private_name_or_re_exports_one():
    """A name is imported from the module that defines it; one used across modules is public there."""
    assert [b for p in modules() for b in borrowed_names(p)] == []
    probe = PACKAGE / "datasets" / "probe.py"
    assert borrowed_names(probe, "from .pixels import _from_array\n") == [
        "datasets/probe.py: private pixels._from_array"]
    assert borrowed_names(probe, "from .pixels import decoded, open_image\nopen_image('x')\n") == [
        "datasets/probe.py: re-exports pixels.decoded"]
