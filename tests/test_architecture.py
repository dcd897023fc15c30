"""The package graph (README "Layout"): every import of every module, read with `ast` (nothing is
executed), mapped to its package node; any edge not allowed below, or a cycle, fails.

Stages (data <- extract -> cache -> train/eval) below, applications (tag, robust) on top: an
application may import stages, no stage may import an application, except the two deprecation
aliases that keep the old import names (`ALIASES`)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package (setup.cfg package_dir)
NODES = {"data": "wat.data", "eval": "wat.eval", "train": "wat.train", "extract": "wat.extract",
         "tag": "wat.tag", "robust": "wat.robust"}
STAGES = {"wat.data", "wat.extract", "wat.train", "wat.eval"}
APPS = {"wat.tag", "wat.robust"}
ALLOWED = {
    "wat.data": set(),
    "wat.eval": {"wat.data"},
    "wat.train": {"wat.data", "wat.eval"},
    "wat.extract": {"wat.data"},
    "wat.tag": {"wat.extract", "wat.data"},
    "wat.robust": {"wat.extract", "wat.data", "wat.eval"},
}
# the only imports of an application from below: deprecation aliases of the names the applications
# had when they lived under extract/ (module -> the application it re-exports)
ALIASES = {"wat.extract.tag": "wat.tag", "wat.extract.robust": "wat.robust"}
# edges allowed only to some MODULES of the target (never the package itself, whose lazy names reach
# every module): training scores with the one metrics module, and its probe start fits with the one
# linear-probe fit (wat.eval.logistic: torch and sklearn only, imports no wat module)
ONLY = {("wat.train", "wat.eval"): {"wat.eval.metrics", "wat.eval.logistic"}}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folders of `root`."""
    out = {}
    for folder, pkg in sorted(NODES.items(), key=lambda kv: -len(kv[0])):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            out.setdefault(name, path)  # a sub-package folder is named by its own node
    return out


def node_of(module: str) -> str | None:
    best = None
    for pkg in NODES.values():
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best)):
            best = pkg
    return best


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported wat module, line) for every import statement of the module, at any depth."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here[: len(here) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            for a in node.names:  # `from pkg import module` imports the module
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known else base, node.lineno))
    return [(m, line) for m, line in out if m == "wat" or m.startswith("wat.")]


def edges(root: Path) -> list[tuple[str, str, str, str, int]]:
    """(from node, to node, from module, imported module, line) across nodes."""
    mods = modules(root)
    out = []
    for name, path in mods.items():
        src = node_of(name)
        for target, line in imports(name, path, set(mods)):
            dst = node_of(target)
            if dst is not None and dst != src:
                out.append((src, dst, name, target, line))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for src, dst, mod, target, line in edges(root):
        if ALIASES.get(mod) == target:
            continue
        if dst not in ALLOWED[src]:
            bad.append(f"{mod}:{line} imports {target}: {src} -> {dst} is not in the package graph")
        elif (src, dst) in ONLY and target not in ONLY[(src, dst)]:
            bad.append(f"{mod}:{line} imports {target}: {src} may import only {sorted(ONLY[(src, dst)])} of {dst}")
    return bad


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a node list, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def package_graph(root: Path) -> dict[str, set[str]]:
    g = {n: set() for n in NODES.values()}
    for src, dst, mod, target, _ in edges(root):
        if ALIASES.get(mod) != target:
            g[src].add(dst)
    return g


def test_allowed_graph_itself_has_no_cycle():
    assert cycle(ALLOWED) is None


def test_every_import_follows_the_package_graph():
    mods = modules(ROOT)
    assert len(mods) > 30 and {"wat.tag.cli", "wat.robust.cli", "wat.data.cache.read"} <= set(mods)  # the walk found the sources
    assert violations(ROOT) == []
    assert cycle(package_graph(ROOT)) is None


def test_train_and_eval_need_no_extract_and_not_each_other():
    g = package_graph(ROOT)
    assert "wat.extract" not in g["wat.train"] | g["wat.eval"]
    assert "wat.train" not in g["wat.eval"]


def test_applications_stand_above_the_stages():
    assert set(ALLOWED) == STAGES | APPS and not any(ALLOWED[s] & APPS for s in STAGES)
    assert all(ALLOWED[a] <= STAGES for a in APPS)  # and not on each other
    assert all(node_of(alias) in STAGES and app in APPS for alias, app in ALIASES.items())


def _tree(tmp_path, extra: dict[str, str]) -> Path:
    for folder in NODES:
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    for rel, text in extra.items():
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("rel,text,expect", [
    ("eval/metrics.py", "import wat.train\n", "wat.eval -> wat.train"),
    ("eval/metrics.py", "from wat.train.loop import train\n", "wat.eval -> wat.train"),
    ("train/loop.py", "from wat.eval import report\n", "may import only"),
    ("train/loop.py", "from wat.eval import ProbeOptions\n", "may import only"),   # a lazy name of the package
    ("train/loop.py", "from wat.eval.report import write_probe\n", "may import only"),
    ("data/cache.py", "def f():\n    from ..extract import load\n", "wat.data -> wat.extract"),
    ("extract/layers.py", "from wat.tag import grid\n", "wat.extract -> wat.tag"),
    ("extract/pipeline.py", "from wat.robust.run import run_robust\n", "wat.extract -> wat.robust"),
    ("extract/tag.py", "from wat.robust import run\n", "wat.extract -> wat.robust"),  # an alias of another app
    ("data/cache.py", "import wat.tag\n", "wat.data -> wat.tag"),
    ("eval/report.py", "from wat.robust import report\n", "wat.eval -> wat.robust"),
    ("tag/cli.py", "from wat.train import loop\n", "wat.tag -> wat.train"),
    ("tag/cli.py", "from wat.robust import run\n", "wat.tag -> wat.robust"),
])
def test_a_forbidden_import_fails(tmp_path, rel, text, expect):
    root = _tree(tmp_path, {"train/loop.py": "", "eval/report.py": "", "extract/load.py": "",
                            "tag/grid.py": "", "robust/run.py": "", rel: text})
    bad = violations(root)
    assert len(bad) == 1 and expect in bad[0]


def test_the_deprecation_aliases_are_allowed(tmp_path):
    root = _tree(tmp_path, {"tag/grid.py": "", "robust/run.py": "", "extract/tag.py": "from wat.tag import *\n",
                            "extract/robust.py": "from wat.robust import *\n"})
    assert violations(root) == [] and cycle(package_graph(root)) is None


def test_a_cycle_fails():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back():
    """Module level too: no two modules need each other (e.g. extract.pipeline <-> extract.cluster)."""
    mods = modules(ROOT)
    g = {name: {m for m, _ in imports(name, path, set(mods)) if m in mods and m != name} for name, path in mods.items()}
    assert cycle(g) is None


# ------------------------------------------------------------------ modules, names and commands

def _cli_modules() -> dict[str, str]:
    """command -> the module of its entry point (setup.cfg console_scripts)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [l.split("=") for l in cfg["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    return {name.strip(): target.strip().split(":")[0] for name, target in lines}


def private_imports(root: Path) -> list[str]:
    """`from wat.x import _name` (or relative) of a name private to another module; dunders aside."""
    mods = modules(root)
    bad = []
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - (node.level - 1)] + ([base] if base else []))
            if not (base == "wat" or base.startswith("wat.")) or base == name:
                continue
            bad += [f"{name}:{node.lineno} imports {a.name} from {base}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_no_private_name_is_imported_across_modules():
    assert private_imports(ROOT) == []


def test_a_private_import_is_found(tmp_path):
    root = _tree(tmp_path, {"data/cache.py": "_HANDLES = {}\n", "data/readers.py": "from .cache import _HANDLES\n"})
    assert private_imports(root) == ["wat.data.readers:1 imports _HANDLES from wat.data.cache"]


def test_no_library_module_imports_a_command():
    """The commands' modules (entry points) sit on top of their package: a library module that
    imported one would pull argparse front ends into library code, and cycles with them."""
    clis = set(_cli_modules().values())
    mods = modules(ROOT)
    bad = [f"{name}:{line} imports {target}" for name, path in mods.items()
           for target, line in imports(name, path, set(mods)) if target in clis and target != name]
    assert bad == []


@pytest.mark.parametrize("command", sorted(_cli_modules()))
def test_help_imports_neither_torch_nor_whisper(command):
    """`COMMAND --help` answers without importing torch or whisper (seconds of imports each)."""
    import subprocess
    import sys

    module, func = None, None
    for line in (ROOT / "setup.cfg").read_text().splitlines():
        if line.strip().startswith(f"{command} ="):
            module, func = line.split("=")[1].strip().split(":")
    code = (f"import sys\nsys.argv = [{command!r}, '--help']\nimport {module} as m\n"
            f"try:\n    m.{func}()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(n for n in ('torch', 'whisper') if n in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-300:]
