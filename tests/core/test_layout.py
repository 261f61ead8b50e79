"""The layout's rules, checked on the source: no import cycles in the core (function-local imports
included), a leaf spec module, no ComfyUI in the core, the core (hyperlora/ except tools/ and train/) never
importing tools/ or train/, training never reached from the nodes, no machine-specific paths in tracked files."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "hyperlora"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str | None = None) -> set[str]:
    """Pack modules that ``path`` (module ``name``) imports (relative imports, anywhere in the file)."""
    name = name or _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
            found.add(".".join(base))
            found.update(".".join(base + [a.name]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hyperlora"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hyperlora"))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets = {t for t in _imports(path) if t in files and t != mod}
        # a package importing its own submodules, or a module its parent package, is not a cycle
        graph[mod] = {t for t in targets if not t.startswith(mod + ".") and not mod.startswith(t + ".")}
    return graph


def test_core_has_no_import_cycle():
    graph = _graph()
    assert "hyperlora.spec" in graph and "hyperlora.faces.analysis" in graph
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [])
    assert not cycles, f"import cycles in hyperlora/: {cycles}"


def test_cycle_finder_sees_function_local_imports(tmp_path):
    """The check above must not be blind to an import hidden inside a function."""
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from .generate import HyperLoRAModel\n    from ..spec import X\n", encoding="utf-8")
    found = _imports(mod, "hyperlora.faces.x")
    assert {"hyperlora.faces.generate", "hyperlora.spec"} <= found


def test_spec_is_a_leaf():
    assert _graph()["hyperlora.spec"] == set()
    assert _graph()["hyperlora.errors"] == set()


OUTSIDE_CORE = ("hyperlora.tools", "hyperlora.train")
"""Packages under hyperlora/ that are not the core: the command-line tools and training build on the core."""


def _outside_core(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in OUTSIDE_CORE)


def test_core_never_imports_tools_or_training():
    """Core = hyperlora/* except tools/ and train/; function-local imports count, and so does the package's
    own __init__ (which the cycle graph leaves out as a package importing its submodules)."""
    files = {_module_name(p): p for p in CORE.rglob("*.py")}
    core = [m for m in files if not _outside_core(m)]
    assert "hyperlora" in core and "hyperlora.pipeline" in core and "hyperlora.tools.download" in files
    bad = {m: sorted(t for t in _imports(files[m]) if _outside_core(t)) for m in core}
    assert not {m: t for m, t in bad.items() if t}, "the core imports tools/ or train/"


def test_the_core_check_sees_imports_of_tools(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from .tools.download import main\n    import hyperlora.train.fit\n", encoding="utf-8")
    assert [t for t in sorted(_imports(mod, "hyperlora.x")) if _outside_core(t)] == [
        "hyperlora.tools.download", "hyperlora.tools.download.main", "hyperlora.train.fit"]


PRIVATE_CHECKED = ("hyperlora", "nodes", "bench", "example_workflows", "tests/fixtures", "tests/comfy")
"""Where no module imports another module's private (``_name``) names."""


def private_imports(path: Path) -> list[str]:
    """``from <pack or test module> import _name`` statements of ``path`` (``__future__`` etc. are not ours)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in
                                                 ("hyperlora", "nodes", "tests", "bench")):
            found += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_modules():
    hits = []
    for folder in PRIVATE_CHECKED:
        for path in (REPO / folder).rglob("*.py"):
            hits += [f"{path.relative_to(REPO)}: {name}" for name in private_imports(path)]
    assert not hits, "private names imported from another module (make them public or move them): " + str(hits)


def test_the_private_import_check_sees_them(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("from .lora import LoraDict, _split\nfrom tests.fixtures.sdxl import _value\n"
                   "from __future__ import annotations\nfrom os import _exit\n", encoding="utf-8")
    assert private_imports(mod) == [".lora._split", "tests.fixtures.sdxl._value"]


def test_core_tests_and_fixtures_need_no_training_code():
    """The stand-ins the core's tests use live in hyperlora.standins (shared with the training demo), so
    tests/core and tests/fixtures never import hyperlora.train."""
    hits = []
    for folder in ("tests/core", "tests/fixtures"):
        for path in (REPO / folder).rglob("*.py"):
            hits += [f"{path.relative_to(REPO)}: {t}" for t in _imports(path, "tests.x") if _outside_core(t)
                     and t.startswith("hyperlora.train")]
    assert not hits, hits


RELEASED_SIZES = {"hyper_dim": 128, "rank": 8, "base_rank": 4, "dim": 1024, "depth": 4, "dim_head": 64,
                  "ff_mult": 4, "num_id_tokens": 16}
"""The released sizes as keyword / field names (their one home: the RELEASED_* constants of hyperlora/spec.py)."""
_SIZE_RETYPED = re.compile(r"\b(" + "|".join(RELEASED_SIZES) + r")\s*(?::\s*[\w| ]+?)?\s*=\s*(\d+)\b")


def retyped_sizes(text: str) -> list[str]:
    """Lines that set a released size by its number (``rank: int = 8``, ``hyper_dim=128``) instead of importing it."""
    return [line.strip() for line in text.splitlines()
            for m in _SIZE_RETYPED.finditer(line) if int(m.group(2)) == RELEASED_SIZES[m.group(1)]]


def test_released_sizes_are_not_retyped():
    hits = []
    for folder in ("hyperlora", "nodes", "bench", "tests/fixtures"):
        for path in (REPO / folder).rglob("*.py"):
            hits += [f"{path.relative_to(REPO)}: {line}" for line in retyped_sizes(path.read_text(encoding="utf-8"))]
    assert not hits, "released sizes typed again (import hyperlora.spec.RELEASED_* instead): " + str(hits)
    assert retyped_sizes("    rank: int = 8\n    hyper_dim=128, dim=64,\n    depth: int = 2\n") == [
        "rank: int = 8", "hyper_dim=128, dim=64,"]


LAYOUT_USERS = ("nodes/paths.py", "hyperlora/tools/download.py", "hyperlora/train/demo.py", "hyperlora/standins.py",
                "hyperlora/faces/setup.py")
"""The modules that place files in the models folder; the layout's one home is hyperlora/spec.py."""
LAYOUT_NAMES = {"hyper_lora", "clip_vit", "clip_processor", "_processor", "clip_vit_large_14",
                "antelopev2", "identities"}   # ("insightface" alone is also the pip package's name)
LAYOUT_FRAGMENTS = ("hyper_lora/", "/clip_vit", "/clip_processor", "insightface/", "/antelopev2")
MOVING = {"redownload_hint"}
"""Functions left out: redownload_hint is moving from tools/download.py into integrity.py (another branch)."""


def layout_literals(path: Path) -> list[str]:
    """String literals of ``path`` (docstrings left out) that spell the models-folder layout."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):     # docstrings
            skip.add(id(node.value))
        if isinstance(node, ast.FunctionDef) and node.name in MOVING:
            skip.update(id(n) for n in ast.walk(node))
    return [f"{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and (node.value in LAYOUT_NAMES or any(f in node.value for f in LAYOUT_FRAGMENTS))
            and "/releases/" not in node.value]      # the pack's download address is not a local folder


def test_the_models_folder_layout_is_not_retyped():
    hits = {rel: layout_literals(REPO / rel) for rel in LAYOUT_USERS}
    assert not {k: v for k, v in hits.items() if v}, "use the layout of hyperlora/spec.py (HYPER_LORA_DIR, clip_dir ...)"


def test_the_layout_check_sees_retyped_folders(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text('"""Files go to hyper_lora/clip_vit/<name>."""\nA = root / "clip_vit" / name\n'
                   'B = f"hyper_lora/clip_vit/{name}"\nC = clip_dir(name)\n', encoding="utf-8")
    assert sorted(layout_literals(mod)) == ["2: 'clip_vit'", "3: 'hyper_lora/clip_vit/'"]


def test_core_never_imports_comfyui():
    bad = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(REPO)}: {n}" for n in names
                    if n.split(".")[0] in ("comfy", "folder_paths", "nodes", "comfy_extras", "comfy_api")]
    assert not bad


def test_nodes_never_import_training():
    for path in [REPO / "__init__.py", *(REPO / "nodes").rglob("*.py")]:
        assert not any("train" in t.split(".") for t in _imports(path)), path


def test_no_machine_specific_paths_in_tracked_files():
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pattern = re.compile(r"(?<![\w.~])/(work|farm|root|home/\w+)/")
    hits = []
    for rel in tracked.split():
        path = REPO / rel
        if path.suffix in (".png", ".jpg", ".onnx", ".safetensors") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        hits += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    assert not hits, f"absolute paths of a build machine: {hits[:10]}"
