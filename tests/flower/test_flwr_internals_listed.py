"""Every flwr name fedclip-cache takes from outside flwr's public app API (``flwr.app``, ``flwr.clientapp``,
``flwr.serverapp``, ``flwr.simulation``, ``flwr.common.logger``) is listed in ``flower/flwr_internals.INTERNALS``,
so that ``missing()`` names it when a newer flwr drops it. Read from the source with ``ast``: ``from flwr.M import
N`` and ``import flwr.M as A`` followed by ``A.N``."""
import ast
from pathlib import Path

import fedclip_cache

PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation", "flwr.common.logger")
ROOT = Path(fedclip_cache.__file__).parent


def used_flwr_names(tree: ast.AST) -> set:
    """(module, name) of every flwr name the module takes: from-imports, and attributes of an aliased module."""
    found, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flwr."):
            found |= {(node.module, a.name) for a in node.names}
        elif isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("flwr.")})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.add((aliases[node.value.id], node.attr))
    return {(m, n) for m, n in found if not any(m == p or m.startswith(p + ".") for p in PUBLIC)}


def test_every_flwr_internal_in_the_source_is_listed():
    from fedclip_cache.flower.flwr_internals import INTERNALS

    listed = {(i.module, i.name.split(".")[0]) for i in INTERNALS}
    unlisted = sorted(f"{p.relative_to(ROOT)}: {m}.{n}" for p in ROOT.rglob("*.py") if p.name != "flwr_internals.py"
                      for m, n in used_flwr_names(ast.parse(p.read_text())) - listed)
    assert unlisted == [], "flwr names used but not in flwr_internals.INTERNALS:\n" + "\n".join(unlisted)


def test_the_scan_sees_from_imports_and_aliased_module_attributes():
    tree = ast.parse("from flwr.a.b import c, d\nimport flwr.x.y as z\nz.w = 1\nfrom flwr.app import Context\n")
    assert used_flwr_names(tree) == {("flwr.a.b", "c"), ("flwr.a.b", "d"), ("flwr.x.y", "w")}
