"""Ready-to-run pipelines: one TOML file = extract -> federate (LODO, every held-out domain) -> sweep.

    fedclip-cache run pipelines/pacs.toml --data /data/PACS --set federate.rounds=50

Sections: ``[pipeline]`` (cache, out, dataset), ``[extract]`` (ExtractConfig / ModelSpec keys), ``[federate]``
(FederateConfig keys) and ``[sweep]`` (grid, seeds, jobs). Unknown keys are errors, named, never ignored.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional

from .federated.config import ConfigError, FederateConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PIPELINE_KEYS = {"name", "cache", "out", "dataset", "description"}
EXTRACT_KEYS = {"model", "pretrained", "model_config", "image_mean", "image_std", "format", "device", "precision",
                "dtype", "batch_size", "workers", "shard_size", "templates", "strict", "seed"}
SWEEP_KEYS = {"grid", "seeds", "jobs"}
SECTIONS = {"pipeline": PIPELINE_KEYS, "extract": EXTRACT_KEYS,
            "federate": {f.name for f in dataclasses.fields(FederateConfig)}, "sweep": SWEEP_KEYS}


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings need no quotes on the command line


def load(path: str | Path, overrides: Optional[list[str]] = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    for ov in overrides or []:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"--set {ov!r}: expected SECTION.KEY=VALUE, e.g. federate.rounds=50")
        key, raw = ov.split("=", 1)
        section, name = key.split(".", 1)
        cfg.setdefault(section, {})[name] = _parse_value(raw)
    for section, body in cfg.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
        unknown = sorted(set(body) - SECTIONS[section])
        if unknown:
            raise ConfigError(f"{path}: unknown key {section}.{unknown[0]}; known in [{section}]: "
                              f"{', '.join(sorted(SECTIONS[section]))}")
    return cfg


def run(path: str | Path, data: Optional[str], overrides: Optional[list[str]] = None, base_dir: str | Path = ".",
        log: Callable[[str], None] = print, skip_sweep: bool = False) -> dict:
    """Extract (skipped when the cache is already complete for this data), federate, sweep."""
    from .cache import open_cache
    from .extract import ExtractConfig, extract
    from .federated.results import federate
    from .models import ModelSpec
    from .store import read_meta
    from .sweep import parse_grid, sweep

    cfg = load(path, overrides)
    p = cfg.get("pipeline", {})
    name = p.get("name", Path(path).stem)
    base_dir = Path(base_dir)
    cache = base_dir / p.get("cache", f"caches/{name}")
    out = base_dir / p.get("out", f"runs/{name}")
    ex = dict(cfg.get("extract", {}))

    complete = False
    if (cache / "cache.json").is_file():
        runs = read_meta(cache).get("runs", [])
        complete = bool(runs) and (data is None or runs[-1]["source"] == str(Path(data).resolve()))
    if complete:
        log(f"re-using cache {cache}")
    else:
        if data is None:
            raise ConfigError(f"{cache} does not exist yet: pass --data PATH (the dataset folder or manifest)")
        spec = ModelSpec(**{k: ex.pop(k) for k in ("model", "pretrained", "model_config", "image_mean",
                                                     "image_std", "seed", "quick_gelu") if k in ex})
        if "templates" in ex:
            ex["templates"] = list(ex["templates"])
        rep = extract(ExtractConfig(source=str(data), out=str(cache), model=spec, dataset=p.get("dataset"),
                                    progress=True, **ex))
        log(f"extracted {rep.embedded} images ({len(rep.skipped)} skipped) into {cache}")
        for w in rep.warnings:
            log(f"warning: {w}")
    fc = open_cache(cache)
    fed = FederateConfig.from_dict(cfg.get("federate", {})).validate()
    summary = federate(fc, fed, out=out / "federate", progress=True)
    result = {"cache": str(cache), "federate": summary, "out": str(out)}
    sw = cfg.get("sweep")
    if sw and not skip_sweep:
        grid = parse_grid([f"{k}={','.join(map(str, v if isinstance(v, list) else [v]))}"
                           for k, v in sw.get("grid", {}).items()])
        result["sweep"] = sweep(cache, fed, grid, list(sw.get("seeds", [0])), out / "sweep", jobs=sw.get("jobs", 1))
    (out / "pipeline.json").write_text(json.dumps({"pipeline": str(path), "resolved": cfg}, indent=2, default=str))
    return result
