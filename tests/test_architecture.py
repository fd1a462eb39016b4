"""The package's structure, read from its source with ``ast``: no import cycle among the modules' module-level
imports, every module imports on its own in a fresh interpreter, no module uses another fedclip_cache module's
``_private`` name, and stage 1 (``fedclip_cache.cache``) imports no flwr, typer or rich.

Which imports count where:
- cycles: module-level imports only (top level, inside top-level ``if``/``try`` and class bodies; not
  ``if TYPE_CHECKING:``). They are what runs when a module is imported, so only they can leave a module partially
  initialised. An import inside a function runs at call time, when every module is complete; such imports are the
  way we keep torch and flwr out of light commands, so a cycle through them is allowed.
- private names and cache/'s third-party imports: every import, at any level (a function-level use is still a
  coupling to another module's internals, and still loads flwr/typer/rich into stage 1).
"""
import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import fedclip_cache

PACKAGE = "fedclip_cache"
ROOT = Path(fedclip_cache.__file__).parent
STAGE_1 = f"{PACKAGE}.cache"
NOT_IN_STAGE_1 = ("flwr", "typer", "rich")
NOT_IMPORTABLE_ON_ITS_OWN = {f"{PACKAGE}.__main__"}  # importing it runs the CLI (that is its job)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


@dataclass(frozen=True)
class Import:
    """One imported module (resolved to the deepest fedclip_cache module it names, or kept as written if third-party),
    where it is written, whether it runs at module import, and the names a from-import takes from it."""
    importer: str
    target: str
    line: int
    module_level: bool
    names: tuple = ()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _resolve_relative(importer: str, level: int, module) -> str:
    base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _known(name: str) -> str:
    """The deepest fedclip_cache module that ``name`` (a dotted module path) imports, or ``name`` if third-party."""
    if not name.startswith(PACKAGE):
        return name
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, importer: str):
        self.importer, self.depth, self.found = importer, 0, []

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node):
        if _is_type_checking(node.test):  # never runs: typing only
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self.found.append(Import(self.importer, _known(alias.name), node.lineno, self.depth == 0))

    def visit_ImportFrom(self, node):
        source = _resolve_relative(self.importer, node.level, node.module) if node.level else (node.module or "")
        taken = []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in MODULES:  # `from package import module`
                self.found.append(Import(self.importer, sub, node.lineno, self.depth == 0))
            else:
                taken.append(alias.name)
        if taken or source not in MODULES:
            self.found.append(Import(self.importer, _known(source), node.lineno, self.depth == 0, tuple(taken)))


def imports(module: str) -> list:
    collector = _ImportCollector(module)
    collector.visit(ast.parse(MODULES[module].read_text(), str(MODULES[module])))
    return collector.found


ALL_IMPORTS = {m: imports(m) for m in MODULES}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def import_cycles() -> list:
    """Strongly connected components (Tarjan) of the module-level import graph among fedclip_cache modules."""
    graph = {m: sorted({i.target for i in ALL_IMPORTS[m] if i.module_level and i.target in MODULES and i.target != m})
             for m in MODULES}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for m in MODULES:
        if m not in index:
            visit(m)
    return components


def private_name_uses() -> list:
    """``module:line uses other.module._name`` for every use of another fedclip_cache module's private name: a
    from-import, an attribute of a name bound to a module (``import a.b as m; m._x``, ``from a import b; b._x``), or
    ``getattr(m, "_x")`` on such a name."""
    found = []
    for module, path in MODULES.items():
        bound = {}  # local name -> fedclip_cache module it is bound to
        for imp in ALL_IMPORTS[module]:
            if not imp.target.startswith(PACKAGE):
                continue
            for name in imp.names:
                if _private(name) and imp.target != module:
                    found.append(f"{module}:{imp.line} imports {imp.target}.{name}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PACKAGE):
                        bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
                for a in node.names:
                    if f"{source}.{a.name}" in MODULES:
                        bound[a.asname or a.name] = f"{source}.{a.name}"

        def dotted(expr):
            if isinstance(expr, ast.Name):
                return bound.get(expr.id)
            if isinstance(expr, ast.Attribute):
                head = dotted(expr.value)
                return f"{head}.{expr.attr}" if head else None
            return None

        for node in ast.walk(tree):
            target = attr = None
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target, attr = dotted(node.value), node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                  and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
                target, attr = dotted(node.args[0]), node.args[1].value
            if target in MODULES and target != module:
                found.append(f"{module}:{node.lineno} uses {target}.{attr}")
    return sorted(set(found))


def test_the_import_graph_is_read_from_the_source():
    """The graph really holds the package's modules and edges (so the checks below cannot pass on an empty graph)."""
    assert {f"{PACKAGE}.cli", f"{STAGE_1}.extract", f"{PACKAGE}.federated.loop", f"{PACKAGE}.launch.deploy"} \
        <= set(MODULES)
    targets = {i.target for i in ALL_IMPORTS[f"{STAGE_1}.extract"] if i.module_level}
    assert f"{STAGE_1}.store" in targets and "numpy" in targets


def test_no_import_cycle_among_module_level_imports():
    cycles = import_cycles()
    detail = [" -> ".join(c) + "\n    " + "\n    ".join(
        f"{i.importer}:{i.line} imports {i.target}" for m in c for i in ALL_IMPORTS[m]
        if i.module_level and i.target in c and i.target != m) for c in cycles]
    assert not cycles, "module-level import cycles:\n" + "\n".join(detail)


def test_no_module_uses_another_modules_private_name():
    uses = private_name_uses()
    assert not uses, "make these public (with a docstring) or move them:\n" + "\n".join(uses)


def test_stage_1_imports_no_flwr_typer_or_rich():
    """No import in fedclip_cache/cache/ names them, and importing every stage-1 module loads none of them."""
    written = [f"{i.importer}:{i.line} imports {i.target}" for m in MODULES if m == STAGE_1 or
               m.startswith(STAGE_1 + ".") for i in ALL_IMPORTS[m] if i.target.split(".")[0] in NOT_IN_STAGE_1]
    stage_1 = [m for m in MODULES if m == STAGE_1 or m.startswith(STAGE_1 + ".")]
    probe = (f"import importlib, json, sys\nfor m in {stage_1!r}: importlib.import_module(m)\n"
             f"print(json.dumps(sorted({{k.split('.')[0] for k in sys.modules}} & {set(NOT_IN_STAGE_1)!r})))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert not written and not loaded, f"written in stage 1: {written}; loaded by importing it: {loaded}"


# Each module is imported in a child forked from one interpreter that has imported the third-party packages our
# modules import at module level, and no fedclip_cache module: every child starts with none of ours loaded, which is
# what "on its own" means for our import order, without paying torch's import once per module.
FRESH_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    third_party, ours = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for name in third_party:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # the child then fails on it and says so
    assert not [m for m in sys.modules if m.split('.')[0] == 'fedclip_cache']
    failures = {}
    for name in ours:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                code = 0
            except BaseException:
                os.write(write, traceback.format_exc().encode()[-4000:])
                code = 1
            os._exit(code)
        os.close(write)
        with os.fdopen(read, 'rb') as r:
            error = r.read().decode(errors='replace')
        _, status = os.waitpid(pid, 0)
        if status:
            failures[name] = error or f'exit status {status}'
    print(json.dumps(failures))
""")


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    ours = sorted(set(MODULES) - NOT_IMPORTABLE_ON_ITS_OWN)
    third_party = sorted({i.target for imps in ALL_IMPORTS.values() for i in imps
                          if i.module_level and not i.target.startswith(PACKAGE) and i.target})
    res = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, json.dumps(third_party), json.dumps(ours)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    failures = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {m} in a fresh interpreter:\n{tb}" for m, tb in failures.items())


@pytest.mark.parametrize("source,expected", [
    ("from fedclip_cache.cache.imageio import _read_regular_file\n",
     ["fedclip_cache.cache.extract:1 imports fedclip_cache.cache.imageio._read_regular_file"]),
    ("from . import imageio\ndef f():\n    return imageio._read_regular_file\n",
     ["fedclip_cache.cache.extract:3 uses fedclip_cache.cache.imageio._read_regular_file"]),
    ("def f():\n    from ..flower import client_app as c\n    return getattr(c, '_federate_config', None)\n",
     ["fedclip_cache.cache.extract:3 uses fedclip_cache.flower.client_app._federate_config"]),
    ("import fedclip_cache.cache.store\nx = fedclip_cache.cache.store._x\n",
     ["fedclip_cache.cache.extract:2 uses fedclip_cache.cache.store._x"]),
    ("from . import imageio\nx = imageio.open_rgb\nclass A:\n    def _own(self):\n        return self._own\n", []),
], ids=["from-import", "module-attribute", "getattr", "dotted-attribute", "public-and-own"])
def test_the_private_name_check_sees_each_way_of_reaching_a_name(monkeypatch, source, expected):
    """The checker itself, on one module's source swapped in: each spelling of a private use is found, and public
    names and a module's own private names are not."""
    extract = f"{STAGE_1}.extract"
    real = Path.read_text

    def read_text(self, *a, **k):
        return source if self == MODULES[extract] else real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setitem(ALL_IMPORTS, extract, imports(extract))
    assert [u for u in private_name_uses() if u.startswith(extract + ":")] == expected


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """A module-level edge back from store to extract closes a cycle; the same edge inside a function does not."""
    store, extract = f"{STAGE_1}.store", f"{STAGE_1}.extract"
    assert extract not in {i.target for i in ALL_IMPORTS[store]}
    monkeypatch.setitem(ALL_IMPORTS, store, ALL_IMPORTS[store] + [Import(store, extract, 1, False)])
    assert not [c for c in import_cycles() if store in c and extract in c]
    monkeypatch.setitem(ALL_IMPORTS, store, ALL_IMPORTS[store] + [Import(store, extract, 1, True)])
    assert [c for c in import_cycles() if store in c and extract in c]


def test_no_test_module_imports_another():
    """Tests share helpers through fixtures (conftest.py), never by importing a test module: such an import works
    only while pytest happens to have put that module's folder on sys.path (it broke when the tests moved into
    package folders) and runs the other module's collection-time code."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.rglob("test_*.py")}
    found = []
    for p in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            found += [f"{p.relative_to(tests)}:{node.lineno} imports {m}" for m in mods
                      if m.split(".")[0] in names or m.split(".")[0] in ("cliutil", "conftest")]
    assert not found, "\n".join(found)
