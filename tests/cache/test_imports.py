"""Stage 1 stands alone: a fresh interpreter imports every module of ``fedclip_cache.cache`` without pulling in
Flower, typer or rich (the user layer draws progress bars and parses options; Flower is stage 2's)."""
import json
import pkgutil
import subprocess
import sys

import fedclip_cache.cache

MODULES = sorted(f"fedclip_cache.cache.{m.name}" for m in pkgutil.iter_modules(fedclip_cache.cache.__path__))
FORBIDDEN = ("flwr", "typer", "rich")


def test_cache_modules_import_without_flower_typer_or_rich():
    assert "fedclip_cache.cache.extract" in MODULES and "fedclip_cache.cache.schema" in MODULES
    code = ("import importlib, json, sys\n"
            f"for m in {MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{n.split('.')[0] for n in sys.modules}} & set({list(FORBIDDEN)!r}))))\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
