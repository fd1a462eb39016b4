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

from .federated.config import ConfigError, FederateConfig, parse_text
from .cache.config import ExtractConfig, ModelSpec, check_templates

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

PIPELINE_KEYS = {"name", "cache", "out", "dataset", "description"}
# [extract] keys: every ModelSpec and ExtractConfig field (specs.py) except what the pipeline itself provides.
EXTRACT_KEYS = ({f.name for f in dataclasses.fields(ModelSpec)} | {f.name for f in dataclasses.fields(ExtractConfig)}) \
    - {"source", "out", "progress", "dataset"}
SWEEP_KEYS = {"grid", "seeds", "jobs"}
SECTIONS = {"pipeline": PIPELINE_KEYS, "extract": EXTRACT_KEYS,
            "federate": {f.name for f in dataclasses.fields(FederateConfig)}, "sweep": SWEEP_KEYS}


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # bare strings need no quotes on the command line


@dataclasses.dataclass
class Plan:
    """A pipeline after validation: everything the stages need, checked before any of them runs."""

    cfg: dict  # the resolved TOML (with --set overrides)
    federate: FederateConfig
    fed_names: dict[str, str]  # config field -> how the user wrote it, for error messages
    grid: dict[str, list]
    grid_names: dict[str, str]
    seeds: list[int]
    jobs: int


def _read(path: Path, overrides: Optional[list[str]]) -> tuple[dict, set[str]]:
    if not path.is_file():
        raise ConfigError(f"{path}: pipeline file not found")
    try:
        cfg = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: invalid TOML ({e})") from e
    for section, body in cfg.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {section} must be a [{section}] table, not a value")
    overridden: set[str] = set()
    for ov in overrides or []:
        key = ov.split("=", 1)[0].strip()
        if "=" not in ov or "." not in key or not all(key.split(".")):
            raise ConfigError(f"--set {ov!r}: expected SECTION.KEY=VALUE, e.g. federate.rounds=50")
        raw = ov.split("=", 1)[1]
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"--set {ov!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        body = cfg.setdefault(section, {})
        if section == "sweep" and name.startswith("grid."):  # --set sweep.grid.hidden=[8,16]
            grid = body.setdefault("grid", {})
            if not isinstance(grid, dict):
                raise ConfigError(f"{path}: sweep.grid must be a table, e.g. grid = {{ hidden = [32, 64] }}")
            grid[name.split(".", 1)[1]] = _parse_value(raw)
        else:
            body[name] = _parse_value(raw)
        overridden.add(key)
    for section, body in cfg.items():
        unknown = sorted(set(body) - SECTIONS[section])
        if unknown:
            raise ConfigError(f"{path}: unknown key {section}.{unknown[0]}; known in [{section}]: "
                              f"{', '.join(sorted(SECTIONS[section]))}")
    return cfg, overridden


def _labeller(path: Path, overridden: set[str]) -> Callable[[str], str]:
    """``federate.rounds`` -> ``--set federate.rounds=`` if it came from the command line, else
    ``pacs.toml: federate.rounds = ``: error messages name the key where the user wrote it."""
    def label(key: str) -> str:
        return f"--set {key}=" if key in overridden else f"{path.name}: {key} = "
    return label


def _said(label: str, value: Any) -> str:
    return f"{label}{value!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_pipeline(p: dict, label: Callable[[str], str]) -> None:
    from .cache.datasets import DATASETS, canonical

    for k, v in p.items():
        if not isinstance(v, str) or (k in ("name", "cache", "out") and not v.strip()):
            raise ConfigError(f"{_said(label('pipeline.' + k), v)}: expected a non-empty string")
    if "dataset" in p and canonical(p["dataset"]) is None:
        raise ConfigError(f"{_said(label('pipeline.dataset'), p['dataset'])}: unknown dataset; known: "
                          f"{', '.join(DATASETS)}")


EXTRACT_CHOICES = {"format": ("parquet", "hdf5"), "precision": ("auto", "fp32", "fp16", "bf16"),
                   "dtype": ("float32", "float16"), "device": ("auto", "cpu", "cuda")}


def _check_extract(ex: dict, label: Callable[[str], str]) -> None:
    """Types and ranges of the [extract] keys, checked even when the cache is re-used (a typo is still a typo)."""
    import math

    for k, v in ex.items():
        where = _said(label("extract." + k), v)
        if k in ("model", "pretrained", "model_config") and not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string")
        if k in EXTRACT_CHOICES and v not in EXTRACT_CHOICES[k] and not (k == "device" and isinstance(v, str)
                                                                          and v.startswith("cuda:")):
            raise ConfigError(f"{where}: unknown; choose one of {', '.join(EXTRACT_CHOICES[k])}")
        if k in ("batch_size", "shard_size") and (not _is_int(v) or v < 1):
            raise ConfigError(f"{where}: expected a whole number >= 1")
        if k in ("workers", "seed", "augment_seed") and (not _is_int(v) or v < 0):
            raise ConfigError(f"{where}: expected a whole number >= 0")
        if k == "views" and (not _is_int(v) or v < 1):
            raise ConfigError(f"{where}: expected a whole number >= 1 (1 = only the evaluation view)")
        if k == "augment":
            from .cache.views import AugmentError, parse_augment

            try:
                parse_augment(v)
            except AugmentError as e:
                raise ConfigError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
        if k in ("strict", "quick_gelu", "exif_transpose", "verify") and not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false")
        if k in ("image_mean", "image_std") and (
                not isinstance(v, list) or len(v) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise ConfigError(f"{where}: expected three finite numbers, e.g. [0.5, 0.5, 0.5]")
        if k == "image_std" and any(x <= 0 for x in v):
            raise ConfigError(f"{where}: standard deviations must be > 0")
        if k == "classes" and (not isinstance(v, list) or not v or not all(isinstance(c, str) and c for c in v)):
            raise ConfigError(f"{where}: expected a non-empty list of class names, in label order")
        if k == "classes":
            from .cache.sources import check_label_text

            for c in v:
                check_label_text("class", c, where)  # the rule extract applies to class names from the data
        if k == "templates":
            if not isinstance(v, list) or not v or not all(isinstance(t, str) for t in v):
                raise ConfigError(f"{where}: expected a non-empty list of strings, e.g. [\"a picture of a {{}}\"]")
            check_templates(v, where)  # the same rule as extract --template


def _federate_config(fed: dict, label: Callable[[str], str]) -> tuple[FederateConfig, dict[str, str]]:
    names = {f.name: label(f"federate.{f.name}") for f in dataclasses.fields(FederateConfig)}
    fed = dict(fed)
    for k in ("split", "heldout"):  # --set federate.split=0.6,0.2,0.2 / federate.heldout=photo,sketch
        if isinstance(fed.get(k), str):
            fed[k] = parse_text(k, fed[k], f"{names[k]} ")
    return FederateConfig.from_dict(fed).validate(names), names


def _grid(sw: dict, label: Callable[[str], str]) -> tuple[dict[str, list], dict[str, str]]:
    """``[sweep] grid = { hidden = [32, 64] }`` -> typed grid values (checked per point by FederateConfig)."""
    from .sweep import check_grid_values, grid_field

    raw = sw.get("grid", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{_said(label('sweep.grid'), raw)}: expected a table, e.g. grid = {{ hidden = [32, 64] }}")
    grid, names = {}, {}
    for key, vals in raw.items():
        name = grid_field(key, where=label("sweep.grid").rstrip("= "))
        if name in grid:
            raise ConfigError(f"{label('sweep.grid')}{{...}}: {key!r} and another key both set {name}")
        names[name] = label(f"sweep.grid.{key}")
        vals = vals if isinstance(vals, list) else [vals]
        if name == "split":  # a list of [train, val, test] lists, or one such list
            vals = [tuple(v) if isinstance(v, list) else v for v in
                    ([vals] if vals and all(not isinstance(v, list) for v in vals) else vals)]
        elif name == "heldout":
            vals = [[h for h in v.split("+") if h] if isinstance(v, str) else v for v in vals]
        elif name == "template":
            vals = [str(v) if _is_int(v) else v for v in vals]
        grid[name] = check_grid_values(name, vals, names[name])
    return grid, names


def prepare(path: str | Path, overrides: Optional[list[str]] = None) -> Plan:
    """Read and validate a whole pipeline — every section, every sweep grid point, the overrides — before any
    stage runs; every error names the key as the user wrote it (TOML key or --set)."""
    from .sweep import check_seeds, expand

    path = Path(path)
    cfg, overridden = _read(path, overrides)
    label = _labeller(path, overridden)
    _check_pipeline(cfg.get("pipeline", {}), label)
    _check_extract(cfg.get("extract", {}), label)
    fed, fed_names = _federate_config(cfg.get("federate", {}), label)
    sw = cfg.get("sweep", {})
    grid, grid_names = _grid(sw, label)
    seeds = sw.get("seeds", [0])
    seeds = [seeds] if _is_int(seeds) else seeds
    if not isinstance(seeds, list):
        raise ConfigError(f"{_said(label('sweep.seeds'), seeds)}: expected a list of whole numbers, e.g. [0, 1, 2]")
    seeds = check_seeds(seeds, label("sweep.seeds").rstrip("= "))
    jobs = sw.get("jobs", 1)
    if not _is_int(jobs) or jobs < 1:
        raise ConfigError(f"{_said(label('sweep.jobs'), jobs)}: expected a whole number >= 1")
    expand(fed, grid, {**fed_names, **grid_names})
    return Plan(cfg, fed, fed_names, grid, grid_names, seeds, jobs)


def load(path: str | Path, overrides: Optional[list[str]] = None) -> dict:
    """The resolved pipeline (TOML + overrides) as a dict, after validating all of it (see :func:`prepare`)."""
    return prepare(path, overrides).cfg


def run(path: str | Path, data: Optional[str], overrides: Optional[list[str]] = None, base_dir: str | Path = ".",
        log: Callable[[str], None] = print, skip_sweep: bool = False) -> dict:
    """Extract (incremental: only new or changed images are embedded; skipped without --data), federate, sweep.

    The whole pipeline is validated first (:func:`prepare`), and against the cache as soon as it exists, so a
    typo in the sweep fails before the federate stage trains anything."""
    from .cache.reader import open_cache
    from .cache.extract import ExtractConfig, extract
    from .cache.models import ModelSpec
    from .federated.runfolder import claim
    from .progress import extract_bar
    from .sweep import expand, preflight

    plan = prepare(path, overrides)
    cfg = plan.cfg
    p = cfg.get("pipeline", {})
    name = p.get("name", Path(path).stem)
    base_dir = Path(base_dir)
    cache = base_dir / p.get("cache", f"caches/{name}")
    out = base_dir / p.get("out", f"runs/{name}")
    ex = dict(cfg.get("extract", {}))
    names = {**plan.fed_names, **plan.grid_names}
    sweeping = bool(cfg.get("sweep")) and not skip_sweep
    points = [plan.federate] + (expand(plan.federate, plan.grid, names) if sweeping else [])
    if data is None:  # no dataset given: use the cache as it is (open_cache refuses an unfinished one)
        if not (cache / "cache.json").is_file():
            raise ConfigError(f"{cache} does not exist yet: pass --data PATH (the dataset folder or manifest)")
        open_cache(cache, load_features=False)  # an unfinished or damaged cache is refused before any work
        preflight(cache, points, names)
        log(f"re-using cache {cache}")
    else:  # extract is incremental: a no-op for unchanged data, and it picks up added, changed and removed files
        spec = ModelSpec(**{f.name: ex.pop(f.name) for f in dataclasses.fields(ModelSpec) if f.name in ex})
        for k in ("templates", "classes"):
            if k in ex:
                ex[k] = list(ex[k])
        rep = extract(ExtractConfig(source=str(data), out=str(cache), model=spec, dataset=p.get("dataset"),
                                    progress=True, **ex), progress=extract_bar)
        log(f"extracted {rep.embedded} images ({len(rep.skipped)} skipped, {len(rep.retired)} retired, "
            f"{rep.refreshed} refreshed) into {cache}")
        for w in rep.warnings:
            log(f"warning: {w}")
        preflight(cache, points, names)  # domains and templates are known only now
    # Everything is checked: one `run` per output folder at a time (federate/ and sweep/ are claimed by their stage)
    lock = claim(out, "pipeline", f"run: {Path(path).name}: pipeline.out")
    try:
        return _train_stages(path, plan, cfg, cache, out, names, sweeping, lock)
    finally:
        lock.close()


def _train_stages(path, plan, cfg: dict, cache: Path, out: Path, names: dict, sweeping: bool, lock) -> dict:
    from .cache.reader import open_cache
    from .federated.results import federate
    from .federated.runfolder import disk_full
    from .cache.store import atomic_write
    from .sweep import sweep

    fc = open_cache(cache)
    fed = plan.federate
    summary = federate(fc, fed, out=out / "federate", progress=True)
    result = {"cache": str(cache), "federate": summary, "out": str(out)}
    if sweeping:
        result["sweep"] = sweep(cache, fed, plan.grid, plan.seeds, out / "sweep", jobs=plan.jobs, names=names)
    with disk_full(out, "pipeline.json"):
        atomic_write(out / "pipeline.json",
                     lambda f: f.write_text(json.dumps({"pipeline": str(path), "resolved": cfg}, indent=2, default=str)))
    lock.complete(["pipeline.json"])
    return result
