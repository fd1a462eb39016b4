"""Cheap repeated ablations: a grid of federate configurations x seeds over one cache, resumable.

Layout of a sweep folder::

    SWEEP/
      state.json              in-progress / complete (runfolder.py); .lock: held by the sweep running on it
      sweep.json              what this sweep is: its cache (path and identity), base config, grid keys, seeds, and
                              every point it has been asked for (rewritten as the grid widens)
      points/<id>/            one finished point: config.json, summary.json, metrics.parquet (all seeds)
      results.parquet         tidy: one row per point x seed x held-out run x client / held-out domain
      summary.md, summary.csv mean ± std over seeds per point and held-out domain
      plots/*.png

A point is the set of options that are not the seed; all its seeds train together in one vectorised loop
(their lanes are stacked). Points run one after another or in worker processes (``jobs``). A point is committed
by atomically writing its folder's ``summary.json`` last, so an interrupted sweep resumes where it stopped.

A sweep folder is one sweep: one cache, one base configuration, one set of grid keys and seeds. Re-running it with
another cache, base option, grid key or seed list is refused (a new folder holds that); widening a grid (more
values of its keys) adds points. Only points trained on the cache's current commit count: ``report`` says "k of n
points" and refuses a partial sweep unless asked (``--partial``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .federated.config import GRID_ALIASES, ConfigError, FederateConfig, as_written, check_bounds, parse_text
from .cache.store import atomic_write, write_json
from .federated.tracking import TRACKING_FIELDS



def grid_field(key: str, where: str = "--grid") -> str:
    """The FederateConfig field a grid key names (``clients`` -> ``num_clients``); an error naming the key if none."""
    fields = {f.name for f in dataclasses.fields(FederateConfig)}
    name = key.strip().replace("-", "_")
    name = GRID_ALIASES.get(name, name)
    if name not in fields or name == "seed":
        hint = " (use --seeds for seeds)" if name in ("seed", "seeds") else ""
        raise ConfigError(f"{where} key {key!r} is not a federate option{hint}; known: "
                          f"{', '.join(sorted(k for k in fields if k != 'seed'))}")
    if name in TRACKING_FIELDS:  # where the numbers go, the same for every point
        raise ConfigError(f"{where} key {key!r}: tracking is not a grid option; give --{key.replace('_', '-')} "
                          f"once for the whole sweep")
    return name


def _convert(name: str, raw: str, label: str) -> Any:
    """One grid value from the command line, typed like the field it sets (ranges are checked by validate).
    Inside a grid ``,`` separates values, so split fractions are joined by ``/`` and held-out domains by ``+``."""
    return parse_text(name, raw, label, list_sep="/" if name == "split" else "+")


def parse_grid(specs: list[str], where: str = "--grid") -> dict[str, list]:
    """``["hidden=32,64", "lr=1e-4,5e-5"]`` -> {"hidden": [32, 64], "lr": [1e-4, 5e-5]}; see :func:`grid_names`."""
    return _parse_grid(specs, where)[0]


def grid_names(specs: list[str], where: str = "--grid") -> dict[str, str]:
    """Field -> how the user wrote it (``{"num_clients": "--grid clients="}``), for error messages."""
    return _parse_grid(specs, where)[1]


def _parse_grid(specs: list[str], where: str) -> tuple[dict[str, list], dict[str, str]]:
    grid: dict[str, list] = {}
    names: dict[str, str] = {}
    for spec in specs:
        for part in spec.split(";"):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"{where} {part!r}: expected KEY=V1,V2,... e.g. hidden=32,64,128")
            key, vals = part.split("=", 1)
            key = key.strip()
            name = grid_field(key, where)
            if name in grid:
                raise ConfigError(f"{where} {key}: given twice; list all its values once, e.g. {key}=1,2")
            names[name] = f"{where} {key}="
            items = comma_items(vals, f"{where} {key}={vals}", "value")
            grid[name] = check_grid_values(name, [_convert(name, v, names[name]) for v in items], names[name])
    return grid, names


def comma_items(text: str, where: str, what: str) -> list[str]:
    """The stripped items of a comma-separated list (``--seeds``, a ``--grid`` key's values). An empty item among
    others (``hidden=4,$H,8`` with H unset) is refused, never dropped quietly; an empty list is the caller's to
    refuse."""
    items = [v.strip() for v in text.split(",")]
    if any(items) and not all(items):
        raise ConfigError(f"{where}: an empty {what} (two commas in a row, or one at an end); remove it or give the "
                          f"{what}")
    return [v for v in items if v]


def check_grid_values(name: str, values: list, label: str) -> list:
    """A grid key needs at least one value and no value twice (two equal points would be one point)."""
    if not values:
        raise ConfigError(f"{label}: no values; give at least one, e.g. {label.rstrip('= ')}=V1,V2")
    seen = []
    for v in values:
        if v in seen:
            raise ConfigError(f"{label}{v!r}: value given twice")
        seen.append(v)
    return values


def check_seeds(seeds: list, label: str = "--seeds") -> list[int]:
    """At least one seed, each a whole number within the seed's declared bounds (config.SEED_MAX), none twice."""
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ConfigError(f"{label}: give at least one seed, e.g. 0,1,2")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise ConfigError(f"{label}: {s!r} is not a whole number; seeds are e.g. 0,1,2")
        check_bounds("seed", s, f"{label}: seed")
    dup = next((s for i, s in enumerate(seeds) if s in seeds[:i]), None)
    if dup is not None:
        raise ConfigError(f"{label}: seed {dup} given twice")
    return [int(s) for s in seeds]


def expand(base: FederateConfig, grid: dict[str, list], names: Optional[dict[str, str]] = None) -> list[FederateConfig]:
    """Every grid point as a validated config; ``names`` (field -> how the user wrote it) words the errors."""
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        out.append(dataclasses.replace(base, **dict(zip(keys, combo))).validate(names))
    return out


def preflight(cache_path: str | Path, points: list[FederateConfig], names: Optional[dict[str, str]] = None,
              local_device: bool = True) -> None:
    """Check configurations against a cache's metadata (domains, templates, classes, device) before any work
    (``local_device``: a CUDA device must be visible here; off for a sweep on Ray, whose nodes train)."""
    from .cache.store import read_meta

    meta = read_meta(cache_path)
    names = names or {}

    def flag(n: str) -> str:
        return names.get(n) or "--" + n.replace("_", "-")

    domains, templates, classes = meta.get("domains"), meta.get("templates"), meta.get("classes")
    for cfg in points:
        missing = [h for h in cfg.heldout if domains is not None and h not in domains]
        if missing:
            raise ConfigError(f"{as_written(flag('heldout'), missing[0])}: not a domain of this cache; domains: "
                              f"{', '.join(domains)}")
        if (cfg.head == "text" and cfg.template != "mean" and templates is not None
                and int(cfg.template) >= len(templates)):
            raise ConfigError(f"{as_written(flag('template'), cfg.template)}: this cache has {len(templates)} "
                              f"template(s): give an index below {len(templates)} or 'mean'")
        if (cfg.partition in ("pathological", "flwr-pathological") and classes is not None
                and cfg.classes_per_client > len(classes)):
            raise ConfigError(f"{as_written(flag('classes_per_client'), cfg.classes_per_client)}: the cache has only "
                              f"{len(classes)} classes")
        have = int((meta.get("views") or {}).get("count", 1))
        if cfg.train_views != "all" and int(cfg.train_views) > have:
            raise ConfigError(f"{as_written(flag('train_views'), cfg.train_views)}: the cache holds {have} view(s) per "
                              f"image; use {have} or all, or re-extract with --views {cfg.train_views}")
        if local_device and cfg.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"{as_written(flag('device'), cfg.device)}: no CUDA GPU is visible; use cpu or auto")
        if cfg.precision != "fp32":  # --precision bf16 without bf16 matmul: one line, before any point trains
            import torch

            from .federated.precision import check_precision

            check_precision(cfg.precision, cfg.device if cfg.device != "auto" else
                            ("cuda" if torch.cuda.is_available() else "cpu"), flag("precision"))


# Options added after sweep folders were first written: at their declared default they are left out of a point's
# id, so a folder made before the option existed keeps its id (and its finished points). A new option whose default
# keeps the old behaviour goes here.
LATER_OPTIONS = ("keep_denormals", "train_views", "pgp_rank", "pgp_mu", "pgp_temp", "min_partition_size",
                 "self_balancing", "class_assignment", "flwr_shuffle", "shots", "base_to_novel", "precision")


def point_id(cfg: FederateConfig) -> str:
    d = cfg.to_dict()
    d.pop("seed")
    for name in TRACKING_FIELDS:  # where the numbers are also sent (--log), not what the point is
        d.pop(name, None)
    defaults = FederateConfig().to_dict()
    for name in LATER_OPTIONS:
        if name in d and d[name] == defaults[name]:
            d.pop(name)
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _point_identity(summary_file: Path) -> dict | None:
    try:
        return json.loads(summary_file.read_text()).get("cache", {}).get("identity")
    except (OSError, ValueError, AttributeError):
        return None


def _run_point(cache, cfg_dict: dict, seeds: list[int], folder: str, threads: Optional[int],
               opener: Optional[dict] = None) -> str:
    """Train one point for all seeds together and commit its folder. ``cache``: an open FeatureCache (in-process)
    or its path (worker processes open it themselves, with ``opener``'s open_cache options)."""
    if not hasattr(cache, "features"):
        from .cache.reader import open_cache

        cache = open_cache(cache, **(opener or {}))
    res, summary = train_point(cache, cfg_dict, seeds, threads)
    commit_point(folder, cache, cfg_dict, seeds, res, summary)
    return folder


def train_point(cache, cfg_dict: dict, seeds: list[int], threads: Optional[int] = None):
    """One point's training, all seeds together, on an open FeatureCache: ``(LoopResult, summary)``; nothing is
    written (a Ray task returns these to the driver, which commits them with :func:`commit_point`)."""
    import torch

    from .federated.results import train

    if threads:
        torch.set_num_threads(threads)
    return train(cache, FederateConfig.from_dict(cfg_dict), seeds)


def commit_point(folder: str | Path, cache, cfg_dict: dict, seeds: list[int], res, summary: dict) -> None:
    """Write a trained point's folder; ``summary.json`` is moved in last (atomically): it marks the point done.
    ``cache``: the cache trained on (its path and metadata are recorded; its features are not needed)."""
    from .federated.results import write_run
    from .federated.runfolder import disk_full

    folder = Path(folder)
    staging = folder / ".staging"
    write_run(staging, cache, FederateConfig.from_dict(cfg_dict), res, summary, seeds)
    with disk_full(folder):
        for f in ("config.json", "metrics.parquet", "adapter.pt"):
            os.replace(staging / f, folder / f)
        os.replace(staging / "summary.json", folder / "summary.json")  # last: marks the point done
    shutil.rmtree(staging, ignore_errors=True)  # (a killed run's temporary files may be left in it)


def point_folder(cfg: FederateConfig, seeds: list[int]) -> str:
    """A point's folder name: its config hash and its seeds (other seeds are other work, never mixed in)."""
    return f"{point_id(cfg)}-s{'_'.join(map(str, seeds))}"


def _grid_json(grid: dict) -> dict:
    return {k: [list(v) if isinstance(v, tuple) else v for v in vs] for k, vs in grid.items()}


def _record(cache_path, identity: dict, base: FederateConfig, grid: dict, seeds: list[int],
            points: list[FederateConfig], old: Optional[dict], out: Path) -> dict:
    """``sweep.json`` for this run: the folder's sweep, checked against the one it already holds (another cache,
    base option, grid key or seed list is refused in one line: a new folder holds it); a widened grid adds
    points."""
    from .federated.config import FIELDS, option_flag
    from .federated.runfolder import RunFolderError

    cache = str(Path(cache_path).resolve())
    keys = list(grid)
    base_d = {k: v for k, v in base.to_dict().items() if k not in keys and k != "seed" and k not in TRACKING_FIELDS}
    names = [point_folder(c, seeds) for c in points]
    if old is None:
        return {"cache": cache, "cache_identity": identity, "base": base.to_dict(), "grid": _grid_json(grid),
                "grid_keys": keys, "seeds": seeds, "points": names}

    def refuse(what: str) -> None:
        raise RunFolderError(f"sweep -o {out}: this sweep folder holds another sweep ({what}); give a new folder "
                             f"(-o) for this one")

    if old.get("cache") != cache:
        refuse(f"cache {old.get('cache')}, not {cache}")
    if old.get("seeds") != seeds:
        refuse(f"--seeds {','.join(map(str, old.get('seeds') or []))}, not {','.join(map(str, seeds))}")
    if list(old.get("grid_keys") or []) != keys:
        def said(ks) -> str:  # as typed: clients, not num_clients
            return ", ".join(option_flag(k).lstrip("-") if k in FIELDS else k for k in ks) or "nothing"
        refuse(f"--grid over {said(old.get('grid_keys') or [])}, not over {said(keys)}")
    old_base = {k: v for k, v in (old.get("base") or {}).items()
                if k not in keys and k != "seed" and k not in TRACKING_FIELDS}
    differ = sorted(k for k in old_base.keys() & base_d.keys()
                    if json.dumps(old_base[k], sort_keys=True) != json.dumps(base_d[k], sort_keys=True))
    if differ:
        k = differ[0]
        flag = option_flag(k) if k in FIELDS else "--" + k.replace("_", "-")
        refuse(f"{flag} {old_base[k]}, not {base_d[k]}; or make {flag.lstrip('-')} a --grid key")
    had = old.get("points") or names_of(old)
    grid_u = {k: list(vs) for k, vs in (old.get("grid") or {}).items()}
    for k, vs in _grid_json(grid).items():
        grid_u[k] = grid_u.get(k, []) + [v for v in vs if v not in grid_u.get(k, [])]
    return {**old, "cache": cache, "cache_identity": identity, "grid": grid_u, "grid_keys": keys,
            "seeds": seeds, "points": had + [n for n in names if n not in had]}


def names_of(state: dict) -> list[str]:
    """The point folders of a ``sweep.json`` written before it listed them: its grid, expanded."""
    base = FederateConfig.from_dict(state["base"])
    grid = {k: [tuple(v) if isinstance(v, list) and k == "split" else v for v in vs]
            for k, vs in state["grid"].items()}
    return [point_folder(c, state["seeds"]) for c in expand(base, grid)]


def plan(cache_path: str | Path, base: FederateConfig, grid: dict[str, list], seeds: list[int], jobs: int = 1,
         names: Optional[dict[str, str]] = None, seeds_label: str = "--seeds",
         jobs_label: str = "--jobs", on_cluster: bool = False) -> tuple[list[FederateConfig], list[int]]:
    """Validate a whole sweep without doing any work: seeds, jobs, every grid point, and the points against the
    cache. Returns (points, seeds). ``on_cluster``: the points run on Ray's nodes, so this machine's GPU is not
    asked for (the Ray plan checks the cluster's)."""
    seeds = check_seeds(seeds, seeds_label)
    from .federated.tracking import check_available

    check_available(base.log, (names or {}).get("log") or "--log")  # a tracker's package: before any work
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"{as_written(jobs_label, jobs)}: must be a whole number >= 1")
    for k, vs in grid.items():
        check_grid_values(k, vs, (names or {}).get(k) or f"--grid {k}=")
    points = expand(base, grid, names)
    preflight(cache_path, points, names, local_device=not on_cluster)
    return points, seeds


def sweep(cache_path: str | Path, base: FederateConfig, grid: dict[str, list], seeds: list[int],
          out: str | Path, jobs: int = 1, on_done: Optional[Callable[[int, int], None]] = None,
          names: Optional[dict[str, str]] = None, seeds_label: str = "--seeds", jobs_label: str = "--jobs",
          allow_incomplete: bool = False, features_in: str = "auto", ray=None,
          on_node: Optional[Callable[[dict], None]] = None) -> dict:
    """Run every grid point not already in ``out``; return the aggregated results (see :func:`collect`).

    Everything (seeds, every grid point, the points against the cache, the cache's completeness) is checked before
    anything is written; ``names`` maps a config field to how the user wrote it, for the error messages. ``ray``: a
    :class:`fedclip_cache.sweep_ray.RayPlan` runs the points as Ray tasks (connected, and the cache checked on every
    node, before the folder is touched); ``on_node`` then gets ``{node: points finished there}`` after each point."""
    from .cache.reader import open_cache
    from .federated.runfolder import claim

    out = Path(out)
    # Refuses an unfinished cache now; its identity (path + commit) decides which finished points are still valid.
    identity = open_cache(cache_path, allow_incomplete=allow_incomplete, load_features=False).identity()
    points, seeds = plan(cache_path, base, grid, seeds, jobs, names, seeds_label, jobs_label,
                         on_cluster=ray is not None)
    opener = {"allow_incomplete": allow_incomplete, "features_in": features_in}
    record = {}

    def check() -> None:  # under the lock, before the folder is marked in-progress: a refusal changes nothing
        old = read_record(out)
        record.update(_record(cache_path, identity, base, grid, seeds, points, old, out))

    session = None
    if ray is not None:
        from .sweep_ray import RaySession

        session = RaySession(ray, cache_path, identity, opener, points)  # connects and checks every node first
    try:
        lock = claim(out, "sweep", "sweep -o", check)
        try:
            run = _SweepRun(out, record, lock, seeds, opener, base, grid)
            return run.go(cache_path, points, identity, jobs, session, on_done, on_node)
        finally:
            lock.close()
    finally:
        if session is not None:
            session.close()


class _SweepRun:
    """One run of a sweep folder, under its lock: the points to do, run in-process, in ``--jobs`` workers or on Ray,
    each committed as it finishes, then the folder's tables and plots."""

    def __init__(self, out: Path, record: dict, lock, seeds: list[int], opener: dict, base: FederateConfig,
                 grid: dict):
        self.out, self.record, self.lock, self.seeds, self.opener = out, record, lock, seeds, opener
        self.base, self.grid = base, grid  # --log: the trackers and each point's grid values as tags

    def go(self, cache_path, points: list, identity: dict, jobs: int, session, on_done, on_node) -> dict:
        from .cache.reader import open_cache
        from .federated.runfolder import disk_full

        out, record, lock, seeds = self.out, self.record, self.lock, self.seeds
        with disk_full(out, "sweep.json"):
            write_json(out / "sweep.json", record)
        todo, stale = _points_to_run(out, points, seeds, identity)
        ran_on = record.get("ran_on") or {}
        if any(folder.name in ran_on for _, folder in todo):  # trained again: its node is not known yet
            record["ran_on"] = {k: v for k, v in ran_on.items() if k not in {f.name for _, f in todo}}
            with disk_full(out, "sweep.json"):
                write_json(out / "sweep.json", record)
        progress = _Progress(len(points), len(points) - len(todo), on_done,
                             _point_tracker(out, self.base, self.grid, todo))
        if session is not None:
            if todo:
                meta = open_cache(cache_path, **{**self.opener, "load_features": False})
                session.run(todo, seeds, lambda point: self._commit_remote(meta, point, progress, on_node))
        elif jobs <= 1:
            cache = open_cache(cache_path, **self.opener) if todo else None  # read once for all points
            for cfg, folder in todo:
                with _refused_point(out, record, folder, lock):
                    _run_point(cache, cfg.to_dict(), seeds, str(folder), None)
                progress.one_more(folder)
        else:
            _run_in_workers(cache_path, todo, seeds, jobs, self.opener, out, record, lock, progress)
        st = status(out)
        results = collect(out, st["done"])
        results.update(ran=len(todo), points=len(points), stale=stale, done=len(st["done"]),
                       total=len(st["points"]))
        with disk_full(out):
            write_outputs(out, results)
        if len(st["done"]) == len(st["points"]):  # an earlier, wider run of this folder may have left points to do
            lock.complete()
        return results

    def _commit_remote(self, meta, point, progress: "_Progress", on_node) -> None:
        """A point trained by a Ray task (``point``: a :class:`fedclip_cache.sweep_ray.PointDone`), written here by
        the driver only; the node that trained it is recorded in ``sweep.json`` (``ran_on``)."""
        from .federated.runfolder import disk_full

        folder = Path(point.folder)
        with _refused_point(self.out, self.record, folder, self.lock):
            point.raise_error()
            commit_point(folder, meta, point.cfg, self.seeds, point.res, point.summary)
        self.record.setdefault("ran_on", {})[folder.name] = {"node": point.node, "host": point.host}
        with disk_full(self.out, "sweep.json"):
            write_json(self.out / "sweep.json", self.record)
        progress.one_more(folder)
        if on_node:
            on_node(nodes_count(self.record, self.record["points"]))


def nodes_count(record: dict, folders: list[str]) -> dict[str, int]:
    """``{node label: points of ``folders`` trained there}`` from ``sweep.json``'s ``ran_on`` (Ray sweeps)."""
    counts: dict[str, int] = {}
    for name in folders:
        where = (record.get("ran_on") or {}).get(name)
        if where:
            label = node_label(where)
            counts[label] = counts.get(label, 0) + 1
    return counts


def node_label(where: dict) -> str:
    """A Ray node as the progress bar and bench name it: its host and the start of its node id."""
    return f"{where.get('host')}/{str(where.get('node'))[:8]}"


class _Progress:
    """Counts finished points and reports ``(done, total)`` to the caller's callback after each one."""

    def __init__(self, total: int, done: int, on_done: Optional[Callable[[int, int], None]],
                 on_point: Optional[Callable[[Path], None]] = None):
        self.total, self.done, self.on_done, self.on_point = total, done, on_done, on_point
        self._say()

    def one_more(self, folder: Optional[Path] = None) -> None:
        if folder is not None and self.on_point:  # --log: the finished point to the trackers
            self.on_point(Path(folder))
        self.done += 1
        self._say()

    def _say(self) -> None:
        if self.on_done:
            self.on_done(self.done, self.total)


def _point_tracker(out: Path, base: FederateConfig, grid: dict, todo: list) -> Optional[Callable[[Path], None]]:
    """``--log``: what sends each point finished now to the trackers (files in the sweep folder: SWEEP/tb,
    SWEEP/mlflow.db, SWEEP/wandb), one tracked run per experiment named ``POINT/experiment``, grouped by the sweep
    folder's name and tagged with the point's grid values; None without ``--log``."""
    from .federated.tracking import Tracker, parse_log, track_folder

    names = parse_log(base.log)
    if not names or not todo:
        return None
    tracker = Tracker(names, out, base.mlflow_uri).warm()  # imports while the first point trains
    def text(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    tags = {Path(folder).name: {k: text(getattr(cfg, k)) for k in grid} for cfg, folder in todo}
    return lambda folder: track_folder(tracker, folder, out.resolve().name, f"{folder.name}/", tags[folder.name])


def _points_to_run(out: Path, points: list, seeds: list[int], identity) -> tuple[list, int]:
    """The grid points without a valid result in ``out`` (``(cfg, folder)``, their folders made) and how many
    results were dropped as stale: trained on an earlier commit of this cache, so not these results."""
    from .federated.runfolder import disk_full

    todo, stale = [], 0
    for cfg in points:
        folder = out / "points" / point_folder(cfg, seeds)
        done_file = folder / "summary.json"
        if done_file.is_file() and _point_identity(done_file) != identity:
            done_file.unlink()
            stale += 1
        if not done_file.is_file():
            with disk_full(out):
                folder.mkdir(parents=True, exist_ok=True)
            todo.append((cfg, folder))
    return todo, stale


def _run_in_workers(cache_path, todo: list, seeds: list[int], jobs: int, opener: dict, out: Path, record: dict,
                    lock, progress: _Progress) -> None:
    """``--jobs N``: the points in N worker processes, each with its share of the cores."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    from .launch.procs import die_with_parent

    # A --jobs worker ends when the sweep that started it dies (``deploy``'s own rule: Linux's
    # PR_SET_PDEATHSIG). Without it a `kill -9` of the sweep left its workers training on, for as long as
    # their points took, writing their points into the folder after its lock was gone, beside the next
    # sweep run into it.
    with ProcessPoolExecutor(jobs, initializer=die_with_parent, initargs=(os.getpid(),)) as ex:
        futs = {ex.submit(_run_point, str(cache_path), cfg.to_dict(), seeds, str(folder), threads, opener):
                folder for cfg, folder in todo}
        for f in as_completed(futs):
            with _refused_point(out, record, futs[f], lock):
                f.result()
            progress.one_more(futs[f])


@contextlib.contextmanager
def _refused_point(out: Path, record: dict, folder: Path, lock):
    """A point refused by the training loop's own checks (memory for --hidden, prompt fit, the text model: they
    need the loaded cache, so they come only when the point runs) is no point of the folder's sweep: it is taken
    out of ``sweep.json`` before the one-line error goes on. Kept, it stayed one of the folder's points for ever:
    every later sweep into the folder, the corrected one too, said "k of k+1 points" and never completed. When
    the points left are all finished (a complete sweep widened by a refused value), their tables are written
    and the folder is complete again; a new folder whose only point was refused is left as new."""
    try:
        yield
    except ConfigError:
        record["points"] = [n for n in record["points"] if n != folder.name]
        shutil.rmtree(folder, ignore_errors=True)  # made for this point, nothing of a finished run in it
        if not record["points"]:  # a new folder whose only point was refused: left as new
            for name in ("sweep.json", "state.json"):
                (out / name).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (out / "points").rmdir()
            raise
        from .federated.runfolder import disk_full

        with disk_full(out, "sweep.json"):  # as every other write of the sweep folder: one line, not a traceback
            write_json(out / "sweep.json", record)
        st = status(out)
        if len(st["done"]) == len(st["points"]):  # (--jobs: the other points finished meanwhile)
            write_outputs(out, collect(out, st["done"]))
            lock.complete()
        raise


def read_record(out: Path) -> Optional[dict]:
    """``SWEEP/sweep.json`` (None when there is none); a damaged one is a one-line error."""
    from .federated.runfolder import RunFolderError

    f = Path(out) / "sweep.json"
    if not f.is_file():
        return None
    try:
        state = json.loads(f.read_text())
        if not isinstance(state, dict) or "grid_keys" not in state or "seeds" not in state:
            raise ValueError("not a sweep record")
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{f}: damaged ({type(e).__name__}); re-run the sweep into a new folder") from None
    return state


def status(out: str | Path) -> dict:
    """The points of the sweep in ``out`` (``sweep.json``), those finished on its cache's recorded commit, and
    those finished on another cache or commit (never counted, never shown)."""
    out = Path(out)
    state = read_record(out)
    points = state.get("points") or names_of(state)
    committed = {n: _point_identity(out / "points" / n / "summary.json") for n in points
                 if (out / "points" / n / "summary.json").is_file()}
    want = state.get("cache_identity")
    if want is None:  # written before sweep.json recorded it: the points must at least agree with each other
        kinds = {json.dumps(i, sort_keys=True) for i in committed.values()}
        if len(kinds) > 1:
            from .federated.runfolder import RunFolderError

            raise RunFolderError(f"{out}: mixed sweep: its points were trained on {len(kinds)} different caches or "
                                 f"commits; re-run the sweep into a new folder")
        want = next(iter(committed.values()), None)
    done = [n for n in points if n in committed and committed[n] == want]
    return {"points": points, "done": done, "other": [n for n in committed if n not in done], "state": state}


# ------------------------------------------------------------------------------------------- results

def collect(out: str | Path, folders: Optional[list[str]] = None) -> dict:
    """Read finished points (``folders``, in order; default: the finished points of the folder's sweep, see
    :func:`status`) into a tidy table and a mean ± std summary."""
    import pyarrow as pa

    out = Path(out)
    state = read_record(out)
    keys = state["grid_keys"]
    if folders is None:
        folders = status(out)["done"]
    rows, curves = [], []
    for name in folders:
        folder = out / "points" / name
        pid = name.partition("-s")[0]
        cfg = json.loads((folder / "config.json").read_text())["federate"]
        s = json.loads((folder / "summary.json").read_text())
        params = s["communication"]["trainable_params"]
        point = {k: (json.dumps(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) for k in keys}
        for e in s["experiments"]:
            common = {"point": pid, **point, "algo": cfg["algo"], "adapter": s["adapter"], "seed": e["seed"],
                      "heldout": e["heldout"] or "", "trainable_params": params,
                      "bytes_total": s["communication"]["bytes_total"], "best_round": e["best"]["round"]}
            # --base-to-novel: acc_* are the base classes', acc_novel_best the novel classes' (None without it)
            if e["heldout"]:
                rows.append({**common, "target": e["heldout"], "split": "heldout",
                             "acc_best": e["best"]["heldout"], "acc_last": e["last"]["heldout"],
                             "acc_novel_best": e["best"].get("heldout_novel")})
            for client, acc in e["best"]["test"].items():
                rows.append({**common, "target": client, "split": "test", "acc_best": acc,
                             "acc_last": e["last"]["test"].get(client),
                             "acc_novel_best": e["best"].get("test_novel", {}).get(client)})
        curves.append({"point": pid, "folder": str(folder), **point, "algo": cfg["algo"], "params": params})
    table = pa.Table.from_pylist(rows) if rows else None
    return {"keys": keys, "table": table, "summary": summarise(table, keys), "curves": curves, "out": str(out)}


def summarise(table, keys: list[str]) -> list[dict]:
    """Mean ± std over seeds, per point and held-out domain (LODO) or client (personal), plus the average."""
    if table is None:
        return []
    df = table.to_pandas()
    has_heldout = (df["split"] == "heldout").any()
    df = df[df["split"] == ("heldout" if has_heldout else "test")]
    df = df.rename(columns={"trainable_params": "params"})
    group = ["point", *[k for k in keys if k not in ("point", "algo")], "algo", "params"]
    out = []
    for gkey, g in df.groupby(group, sort=False, dropna=False):
        rec = dict(zip(group, gkey if isinstance(gkey, tuple) else (gkey,)))
        per_seed_avg = g.groupby("seed")["acc_best"].mean()
        for tgt, gt in g.groupby("target", sort=True):
            rec[f"{tgt}"] = _mean_std(gt["acc_best"].to_numpy())
        rec["avg"] = _mean_std(per_seed_avg.to_numpy())
        if "acc_novel_best" in df and df["acc_novel_best"].notna().any():
            rec.update(base_novel_hm(g))
        rec["seeds"] = int(g["seed"].nunique())
        out.append(rec)
    return out


def base_novel_hm(g) -> dict:
    """``--base-to-novel`` columns of one point's rows (a pandas frame): base, novel and their harmonic mean,
    each mean ± std over seeds of the seed's average over targets (HM of the seed's averages, as
    ``results.mean_novel``); None for a point run without it (a grid over base_to_novel)."""
    from .federated.protocols import harmonic_mean

    if g["acc_novel_best"].isna().all():
        return {"base": None, "novel": None, "hm": None}
    base = g.groupby("seed")["acc_best"].mean()
    novel = g.groupby("seed")["acc_novel_best"].mean()
    hm = np.array([harmonic_mean(float(base[s]), float(novel[s])) for s in base.index], dtype=float)
    return {"base": _mean_std(base.to_numpy()), "novel": _mean_std(novel.to_numpy()), "hm": _mean_std(hm)}


def _mean_std(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


def summary_rows(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    if not summary:
        return [], []
    cols = [c for c in summary[0] if c not in ("point", "seeds")]
    rows = []
    for rec in summary:
        row = []
        for c in cols:
            v = rec.get(c)
            row.append(f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}" if isinstance(v, dict) else
                       "-" if v is None and c in ("base", "novel", "hm") else str(v))
        rows.append(row)
    return cols, rows


def write_outputs(out: Path, results: dict) -> None:
    import pyarrow.parquet as pq

    from .plots import sweep_plots

    if results["table"] is not None:
        atomic_write(out / "results.parquet", lambda p: pq.write_table(results["table"], p))
    cols, rows = summary_rows(results["summary"])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + ["| " + " | ".join(r) + " |" for r in rows]
    atomic_write(out / "summary.md", lambda p: p.write_text("\n".join(md) + "\n"))
    atomic_write(out / "summary.csv", lambda p: p.write_text(summary_csv(results)))
    sweep_plots(out, results)


def summary_csv(results: dict) -> str:
    """``summary.csv``: the summary table, one column per mean and std."""
    import csv
    import io

    flat = []
    for rec in results["summary"]:
        f = {}
        for k, v in rec.items():
            if isinstance(v, dict) or (v is None and k in ("base", "novel", "hm")):  # None: no --base-to-novel
                f[f"{k}_mean"], f[f"{k}_std"] = (v["mean"], v["std"]) if v else (None, None)
            else:
                f[k] = v
        flat.append(f)
    buf = io.StringIO()
    if flat:
        w = csv.DictWriter(buf, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    return buf.getvalue()
