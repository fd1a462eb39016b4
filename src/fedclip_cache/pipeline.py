"""Ready-to-run pipelines: one TOML file = extract -> federate (LODO, every held-out domain) -> sweep.

    fedclip-cache run pacs --data /data/PACS --set federate.rounds=50      # a bundled pipeline, by name
    fedclip-cache run my-pipeline.toml --data /data/PACS                  # any pipeline file, by path

Sections: ``[pipeline]`` (cache, out, dataset), ``[extract]`` (ExtractConfig / ModelSpec keys), ``[federate]``
(FederateConfig keys) and ``[sweep]`` (grid, seeds, jobs). Unknown keys are errors, named, never ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

from .federated.config import ConfigError, FederateConfig, parse_text
from .cache.config import PIPELINE_OPTIONS, ExtractConfig, check_option
from .options import said

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# source: the dataset extract reads when --data is not given (a folder, a manifest, hf:NAME[:SPLIT], Parquet with
# image bytes, WebDataset shards: cache/bytesources.py); --data overrides it.
PIPELINE_KEYS = {"name", "cache", "out", "dataset", "description", "source"}
# [extract] keys: every extract option (cache/config.py) except what the pipeline itself provides.
EXTRACT_KEYS = set(PIPELINE_OPTIONS)
SWEEP_KEYS = {"grid", "seeds", "jobs", "ray", "cpus_per_task", "gpus_per_task"}  # ray...: sweep_ray.py
SECTIONS = {"pipeline": PIPELINE_KEYS, "extract": EXTRACT_KEYS,
            "federate": {f.name for f in dataclasses.fields(FederateConfig)}, "sweep": SWEEP_KEYS}


# The ready pipelines shipped with the package. src/fedclip_cache/pipelines is a link to the repository's
# pipelines/ folder, so a checkout, an editable install and the wheel (which carries the files as package data,
# see pyproject.toml) all read the same files.
BUNDLED_DIR = Path(__file__).with_name("pipelines")


def bundled_pipelines() -> dict[str, Path]:
    """The bundled pipelines by name (the file name without ``.toml``), sorted: what ``fedclip-cache run NAME``
    accepts."""
    return dict(sorted((p.stem, p) for p in BUNDLED_DIR.glob("*.toml")))


def resolve(pipeline: str | Path) -> Path:
    """The pipeline file to read: an existing file as given (a path always wins), else the bundled pipeline of that
    name (``pacs`` or ``pacs.toml``); anything else is a one-line ConfigError that lists the bundled names."""
    path = Path(pipeline)
    if path.is_file():
        return path
    bundled = bundled_pipelines()
    if len(path.parts) == 1:
        name = path.stem if path.suffix == ".toml" else path.name
        if name in bundled:
            return bundled[name]
    known = ", ".join(bundled) if bundled else f"none found in {BUNDLED_DIR}"
    raise ConfigError(f"{pipeline}: pipeline file not found, and not the name of a bundled pipeline ({known})")


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
    ray: Optional[Any] = None  # sweeps on Ray: a sweep_ray.RayPlan from [sweep] ray / cpus_per_task / gpus_per_task


def _read(path: Path, overrides: Optional[list[str]]) -> tuple[dict, set[str]]:
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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_pipeline(p: dict, label: Callable[[str], str]) -> None:
    for k, v in p.items():
        if not isinstance(v, str) or (k in ("name", "cache", "out", "source") and not v.strip()):
            raise ConfigError(f"{said(label('pipeline.' + k), v)}: expected a non-empty string")
    if "dataset" in p:
        check_option("dataset", p["dataset"], label("pipeline.dataset"))  # extract's --dataset


def _check_extract(ex: dict, label: Callable[[str], str]) -> None:
    """Types and ranges of the [extract] keys, checked even when the cache is re-used (a typo is still a typo): the
    checks of the extract options themselves (cache/config.py), naming the key as the user wrote it."""
    for k, v in ex.items():
        check_option(k, v, label("extract." + k))


def _federate_table(fed: dict, label: Callable[[str], str]) -> tuple[FederateConfig, dict[str, str]]:
    """The validated FederateConfig of a pipeline's ``[federate]`` table, and how each field is named in errors."""
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
        raise ConfigError(f"{said(label('sweep.grid'), raw)}: expected a table, e.g. grid = {{ hidden = [32, 64] }}")
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
    """Read and validate a whole pipeline (a file, or a bundled pipeline's name: :func:`resolve`) — every section,
    every sweep grid point, the overrides — before any stage runs; every error names the key as the user wrote it
    (TOML key or --set)."""
    from .sweep import check_seeds, expand
    from .sweep_ray import ray_plan

    path = resolve(path)
    cfg, overridden = _read(path, overrides)
    label = _labeller(path, overridden)
    _check_pipeline(cfg.get("pipeline", {}), label)
    _check_extract(cfg.get("extract", {}), label)
    fed, fed_names = _federate_table(cfg.get("federate", {}), label)
    sw = cfg.get("sweep", {})
    grid, grid_names = _grid(sw, label)
    seeds = sw.get("seeds", [0])
    seeds = [seeds] if _is_int(seeds) else seeds
    if not isinstance(seeds, list):
        raise ConfigError(f"{said(label('sweep.seeds'), seeds)}: expected a list of whole numbers, e.g. [0, 1, 2]")
    seeds = check_seeds(seeds, label("sweep.seeds").rstrip("= "))
    jobs = sw.get("jobs", 1)
    if not _is_int(jobs) or jobs < 1:
        raise ConfigError(f"{said(label('sweep.jobs'), jobs)}: expected a whole number >= 1")
    ray = ray_plan(sw.get("ray"), sw.get("cpus_per_task"), sw.get("gpus_per_task"), jobs,
                   flag=lambda name: label("sweep." + name.replace("-", "_")).rstrip("= "))
    expand(fed, grid, {**fed_names, **grid_names})
    return Plan(cfg, fed, fed_names, grid, grid_names, seeds, jobs, ray)


def load(path: str | Path, overrides: Optional[list[str]] = None) -> dict:
    """The resolved pipeline (TOML + overrides) as a dict, after validating all of it (see :func:`prepare`)."""
    return prepare(path, overrides).cfg


def pipeline_source(source: Optional[str], base_dir: Path) -> Optional[str]:
    """A pipeline's ``[pipeline] source`` as extract takes it: ``hf:NAME`` as written, a relative path (or pattern)
    under ``base_dir`` like the pipeline's cache and out."""
    if source is None or source.startswith("hf:") or os.path.isabs(source):
        return source
    return "::".join(str(Path(base_dir) / part) for part in source.split("::"))


def run(path: str | Path, data: Optional[str], overrides: Optional[list[str]] = None, base_dir: str | Path = ".",
        log: Callable[[str], None] = print, skip_sweep: bool = False) -> dict:
    """Extract (incremental: only new or changed images are embedded; skipped without --data), federate, sweep.

    The whole pipeline is validated first (:func:`prepare`), and against the cache as soon as it exists, so a
    typo in the sweep fails before the federate stage trains anything."""
    from .cache.reader import open_cache
    from .progress import extract  # with its progress bar
    from .federated.runfolder import claim
    from .sweep import expand, preflight

    path = resolve(path)
    plan = prepare(path, overrides)
    cfg = plan.cfg
    p = cfg.get("pipeline", {})
    name = p.get("name", Path(path).stem)
    base_dir = Path(base_dir)
    cache = base_dir / p.get("cache", f"caches/{name}")
    out = base_dir / p.get("out", f"runs/{name}")
    ex = dict(cfg.get("extract", {}))
    data = data if data is not None else pipeline_source(p.get("source"), base_dir)
    names = {**plan.fed_names, **plan.grid_names}
    sweeping = bool(cfg.get("sweep")) and not skip_sweep
    points = [plan.federate] + (expand(plan.federate, plan.grid, names) if sweeping else [])
    from .federated.tracking import check_available

    check_available(plan.federate.log, names.get("log") or "federate.log")  # a tracker's package, before extract
    if data is None:  # no dataset given: use the cache as it is (open_cache refuses an unfinished one)
        if not (cache / "cache.json").is_file():
            raise ConfigError(f"{cache} does not exist yet: pass --data PATH (the dataset folder or manifest, "
                              f"hf:NAME, Parquet or WebDataset shards) or set [pipeline] source")
        open_cache(cache, load_features=False)  # an unfinished or damaged cache is refused before any work
        preflight(cache, points, names)
        log(f"re-using cache {cache}")
    else:  # extract is incremental: a no-op for unchanged data, and it picks up added, changed and removed files
        rep = extract(ExtractConfig.from_options({**ex, "source": str(data), "out": str(cache),
                                                  "dataset": p.get("dataset"), "progress": True}))
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
        result["sweep"] = sweep(cache, fed, plan.grid, plan.seeds, out / "sweep", jobs=plan.jobs, names=names,
                                ray=plan.ray)
    with disk_full(out, "pipeline.json"):
        atomic_write(out / "pipeline.json",
                     lambda f: f.write_text(json.dumps({"pipeline": str(path), "resolved": cfg}, indent=2, default=str)))
    lock.complete(["pipeline.json"])
    return result
