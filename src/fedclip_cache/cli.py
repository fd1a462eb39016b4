"""The ``fedclip-cache`` command line: a thin typer layer over the library."""
from __future__ import annotations

import contextlib
import inspect
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FedclipCacheError
from .cache.config import ExtractConfig
from .pipeline import bundled_pipelines
from .flower.task import (DEFAULT_MIN_RESULTS, DEFAULT_POLL_INTERVAL, DEFAULT_ROUND_TIMEOUT, MAX_POLL_INTERVAL,
                          SIMULATION_POLL_INTERVAL)

if TYPE_CHECKING:
    from .federated.config import FederateConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract frozen CLIP features once; train FedCLIP and baselines on the cache.")


def _say_broken_pipe() -> None:
    """rich (and click, for a plain print) end a command whose stdout reader went away (``| head``, ``| grep -m1``)
    with exit 1 and say nothing: after a complete table that read as a failure without a cause. One line on
    stderr says it."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write("error: standard output was closed before the command finished writing to it (broken "
                         "pipe, e.g. `| head`); exit 1 (a run folder's state.json says whether the run completed)\n")
        sys.stderr.flush()


class _Console(Console):
    def on_broken_pipe(self) -> None:
        _say_broken_pipe()
        super().on_broken_pipe()


def output_width(stderr: bool = False) -> Optional[int]:
    """The width to give a rich Console. Rich cuts tables to 80 columns when the output is not a terminal (a log,
    CI, a pipe: every row of a run's table read ``heldout=do…``, so rows could not be told apart). There, tables
    keep their natural width (None = rich's own choice: a terminal's width, or COLUMNS when set, still wins).
    Used by the CLI's consoles and the demo's."""
    import os

    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return None if tty or "COLUMNS" in os.environ else 100_000


def _console(stderr: bool = False) -> Console:
    return _Console(stderr=stderr, width=output_width(stderr))


console = _console()
err = _console(stderr=True)



def _floats(text: Optional[str], name: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{name} takes three comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if len(vals) != 3:
        raise typer.BadParameter(f"{name} takes three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return vals


LIST_FILE_MAX = 16 << 20  # one short line per class or template: ImageNet-21k's 21,841 classes are 0.5 MB


def _list_file(path: Path, option: str) -> list[str]:
    """The non-empty, stripped lines of a ``--classes`` / ``--templates-file`` file. A file far larger than any list
    (a 1 GB file of zeros passed by mistake took 24 GB of memory and was killed after 5 minutes) is refused unread."""
    if not path.is_file():
        why = "not a regular file" if path.exists() else "not found"
        raise typer.BadParameter(f"{path}: {why}", param_hint=option)
    size = path.stat().st_size
    if size > LIST_FILE_MAX:
        raise typer.BadParameter(f"{path}: {size:,} bytes, far more than a list of one name per line (at most "
                                 f"{LIST_FILE_MAX >> 20} MiB); pass the list file", param_hint=option)
    return [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]


class CliParameter(NamedTuple):
    """One parameter of a command built from declared options: its name, type and ``typer.Option``/``Argument``."""

    name: str
    annotation: Any
    declared: Any


def _plain(text):
    """A declared option's help as plain text: typer shows help through rich, whose markup would eat a bracketed
    word such as an extra's name ('fedclip-cache[flwr-datasets]')."""
    from rich.markup import escape

    return escape(text) if isinstance(text, str) else text


def _extract_parameters() -> list[CliParameter]:
    """Every extract option declared in cache/config.py as a typer argument or option, in declaration order: its
    flag, help and default come from the declaration, so `extract` never restates them. How the command line takes
    a value follows its type and metadata: a path is PATH, three numbers are one comma-separated text, a list is a
    repeatable flag (plus a file of one item per line: ``from_file``) or a file (``path``)."""
    from .cache.config import KINDS, OPTIONS, option_default, option_flag

    out = []
    for name, f in OPTIONS.items():
        meta, kind, flag = f.metadata, KINDS[name], option_flag(name)
        if meta.get("cli") is False:
            continue
        help_ = _plain(meta["help"]) or None
        if meta.get("argument"):
            out.append(CliParameter(name, Path, typer.Argument(..., help=help_)))
            continue
        default, decls = option_default(name), [flag]
        if kind.item is float:  # three numbers: one text, 0.5,0.5,0.5
            annotation, default = Optional[str], None
        elif kind.item is str:
            annotation, default = (Optional[Path], None) if meta.get("path") else (Optional[List[str]], None)
        elif meta.get("path"):
            annotation = Optional[Path]
        elif kind.base is bool:
            annotation, decls = (Optional[bool] if kind.optional else bool), [f"{flag}/--no-{flag[2:]}"]
        else:
            annotation = Optional[kind.base] if kind.optional else kind.base
        low, high = (meta.get("bounds") or (None, None)) if meta.get("parser_bounds") else (None, None)
        out.append(CliParameter(name, annotation, typer.Option(default, *decls, help=help_, min=low, max=high)))
        if meta.get("from_file"):
            file = meta["from_file"]
            out.append(CliParameter(_file_parameter(name), Optional[Path], typer.Option(None, file.flag,
                                                                                         help=file.help)))
    return out


def _file_parameter(name: str) -> str:
    """The parameter of an option's ``from_file`` flag (``templates`` -> ``templates_file``)."""
    from .cache.config import OPTIONS

    return OPTIONS[name].metadata["from_file"].flag.lstrip("-").replace("-", "_")


EXTRACT_PARAMETERS = _extract_parameters()


def _extract_values(kw: dict) -> dict:
    """The command line's values as extract option values: paths as text, three numbers parsed, list files read;
    a list given neither by its flag nor by its file is left out (its declared default)."""
    from .cache.config import KINDS, OPTIONS, option_flag

    values = {}
    for name, f in OPTIONS.items():
        if f.metadata.get("cli") is False:
            continue
        meta, kind, flag, v = f.metadata, KINDS[name], option_flag(name), kw[name]
        if kind.item is float:
            v = _floats(v, flag)
        elif kind.item is str and meta.get("path"):
            v = None if v is None else _list_file(v, flag)
        elif kind.item is str:
            v = list(v or [])
            file = meta.get("from_file") and kw[_file_parameter(name)]
            if file:
                lines = _list_file(file, meta["from_file"].flag)
                if not lines:
                    raise typer.BadParameter(f"{file}: {meta['from_file'].empty}", param_hint=meta["from_file"].flag)
                v += lines
            if not v:
                continue
        elif meta.get("path") and v is not None:
            v = str(v)
        values[name] = v
    return values


def with_extract_options(func):
    """Put every declared extract option before a command's own parameters; they arrive as ``ex_options`` (a dict
    of extract option values, see :func:`_extract_values`)."""
    import functools

    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name != "ex_options"]
    declared = [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.declared,
                                  annotation=p.annotation) for p in EXTRACT_PARAMETERS]

    @functools.wraps(func)
    def wrapper(**kw):
        declared_kw = {p.name: kw.pop(p.name) for p in EXTRACT_PARAMETERS}
        return func(**kw, ex_options=_extract_values(declared_kw))

    wrapper.__signature__ = sig.replace(parameters=declared + own)
    return wrapper


@app.command()
@with_extract_options
def extract(
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ex_options: dict = None,
):
    """Run frozen open_clip once over every image and store raw embeddings + class-prompt text embeddings.

    Re-running the same command resumes a killed run, embeds only new or changed images, retries files that failed
    for a transient reason, retires images deleted or moved since, and repairs damaged shards or metadata. One
    extract at a time per cache: a second is refused while the first runs."""
    from .progress import extract as run_extract  # draws the progress bar unless --quiet

    rep = run_extract(ExtractConfig.from_options({**ex_options, "progress": not quiet}))
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.markup import escape

    from .cache.store import display_text

    console.print(f"[bold green]cache[/] {escape(rep.cache)}: +{rep.embedded} embedded, {len(rep.skipped)} skipped, "
                  f"{rep.already_cached} already cached ({rep.changed} changed files re-extracted, {rep.retried} "
                  f"retried), {len(rep.retired)} retired, {rep.refreshed} refreshed (label, domain, split or file "
                  f"identity), in {rep.seconds:.1f}s ({rep.images_per_s:,.0f} img/s); "
                  f"total {rep.total_images} images", soft_wrap=True)
    if rep.views > 1:
        console.print(f"views: {rep.views} per image ({rep.extended} cached image(s) given their missing views)",
                      soft_wrap=True)
    if rep.upgraded:
        console.print(f"[bold]upgraded:[/] {escape(rep.upgraded)}", soft_wrap=True)
    for what, why in rep.repaired:
        console.print(f"[yellow]repaired:[/] {escape(what)}: {escape(why)}", soft_wrap=True)
    if rep.retired:
        console.print(f"[yellow]retired {len(rep.retired)} image(s)[/] no longer in the dataset (deleted or moved; "
                      f"no longer served): " + escape(", ".join(display_text(p) for p in rep.retired[:5])) +
                      (" …" if len(rep.retired) > 5 else ""), soft_wrap=True)
    for w in rep.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    if rep.skipped:
        t = Table(title=f"skipped {len(rep.skipped)} file(s) (recorded in the cache)")
        t.add_column("file"), t.add_column("reason")
        for p, r in rep.skipped[:50]:
            t.add_row(escape(p), escape(r))
        console.print(t)
    if rep.ignored:
        console.print(f"[yellow]ignored {len(rep.ignored)} non-image file(s)[/] (listed by `fedclip-cache info`)")


@app.command()
def info(cache: Path = typer.Argument(..., help="Cache folder."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
         verify: bool = typer.Option(False, help="Re-hash every shard against the checksums of the commit."),
         allow_incomplete: bool = typer.Option(False, help="Describe an unfinished cache (killed or running extract) "
                                                           "instead of refusing it.")):
    """Summarise a cache: model, dimensions, domain x class counts, skipped and retired files. Reads no embeddings."""
    from .cache.reader import cache_overview
    from .report import cache_summary, render_cache_summary

    summary = cache_summary(cache_overview(cache, allow_incomplete=allow_incomplete, verify=verify))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render_cache_summary(summary, console)


def _federate_options() -> list[tuple[str, type, object]]:
    """Every FederateConfig field as a typer option: default, help and flag come from the field's declaration
    (``federated/config.py``), so `federate` and `sweep` (which accepts any federate option) never restate them.
    ``split`` and ``heldout`` are typed as text on the command line and parsed by ``config.parse_text``."""
    import dataclasses

    from .federated.config import FederateConfig, field_kind, option_flag, option_help

    out = []
    for f in dataclasses.fields(FederateConfig):
        kind, optional = field_kind(f.name)
        flag = option_flag(f.name)
        if f.name == "split":
            annotation, default = str, ",".join(f"{x:g}" for x in f.default)
        elif f.name == "heldout":
            annotation, default = Optional[str], None
        else:
            annotation, default = (Optional[kind] if optional else kind), f.default
        if kind is bool:  # a switch; one that is on by default also needs its off form
            decls = [f"{flag}/--no-{flag[2:]}"] if default is True else [flag]
        else:
            decls = [flag] if flag != "--" + f.name.replace("_", "-") else []
        out.append((f.name, annotation, typer.Option(default, *decls, help=_plain(option_help(f.name)))))
    return out


FEDERATE_OPTIONS = _federate_options()


def with_federate_options(func):
    """Append the shared federate options to a command's signature; they arrive as ``fed_options`` (a dict)."""
    import functools
    import inspect

    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name != "fed_options"]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=t)
             for n, t, opt in FEDERATE_OPTIONS]

    @functools.wraps(func)
    def wrapper(**kw):
        fed = {n: kw.pop(n) for n, _, _ in FEDERATE_OPTIONS}
        return func(**kw, fed_options=fed)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    return wrapper


def _federate_flags() -> dict[str, str]:
    from .federated.config import FIELDS, option_flag

    return {n: option_flag(n) for n in FIELDS}


# Config field -> the flag a user types (num_clients -> --clients), so that every error names the real flag.
FEDERATE_FLAGS: dict[str, str] = _federate_flags()


def _config_from_flags(fed: dict, validate: bool = True) -> "FederateConfig":
    """The FederateConfig of the federate options as typed on the command line (text --split and --heldout
    parsed), validated unless the caller validates later."""
    from .federated.config import FederateConfig, parse_text

    kw = dict(fed)
    kw["split"] = parse_text("split", kw["split"], f"{FEDERATE_FLAGS['split']} ")
    # "" = the default: every domain in turn
    kw["heldout"] = parse_text("heldout", kw["heldout"] or "", f"{FEDERATE_FLAGS['heldout']} ")
    cfg = FederateConfig(**kw)
    return cfg.validate(FEDERATE_FLAGS) if validate else cfg


def _seeds(text: str) -> list[int]:
    from .federated.config import ConfigError
    from .sweep import check_seeds, comma_items

    items = comma_items(text, f"--seeds {text!r}", "seed")
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated whole numbers, e.g. 0,1,2") from None
    return check_seeds(seeds, "--seeds")


ALLOW_INCOMPLETE_HELP = ("Use a cache whose extract was killed or is still running (refused by default); the run's "
                         "summary records that the cache was incomplete.")
FEATURES_HELP = ("Where the features live: memory | mmap (served from CACHE/features.npy, for caches bigger than "
                 "RAM) | auto (mmap when the features would take more than half the available memory).")


def _features_in(value: str) -> str:
    if value not in ("auto", "memory", "mmap"):
        from .federated.config import ConfigError

        raise ConfigError(f"--features {value!r} unknown; choose auto, memory or mmap")
    return value


@app.command()
@with_federate_options
def federate(
    cache: Path = typer.Argument(..., help="Cache folder written by `extract`."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (config, metrics.parquet, summary.json)."),
    seeds: Optional[str] = typer.Option(None, help="Several seeds at once, e.g. 0,1,2 (trained together)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    allow_incomplete: bool = typer.Option(False, help=ALLOW_INCOMPLETE_HELP),
    features: str = typer.Option("auto", help=FEATURES_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    fed_options: dict = None,
):
    """Train FedCLIP or a baseline purely on cached features (leave-one-domain-out or personalisation)."""
    from .federated.results import federate as run_federate
    from .report import render_run_summary

    cfg = _config_from_flags(fed_options)
    seed_list = _seeds(seeds) if seeds is not None else None
    from .cache.reader import open_cache

    fc = open_cache(cache, allow_incomplete=allow_incomplete, features_in=_features_in(features))
    summary = run_federate(fc, cfg, out, seeds=seed_list, progress=not quiet and not as_json, plots=True)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    render_run_summary(summary, console)
    if out:
        console.print(f"run folder: {out} (config.json, metrics.parquet, summary.json, adapter.pt, plots/)")


@app.command()
@with_federate_options
def sweep(
    cache: Path = typer.Argument(..., help="Cache folder written by `extract`."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder (resumable: finished points are kept)."),
    grid: List[str] = typer.Option([], help="KEY=V1,V2,... over any federate option, repeatable; the cartesian "
                                            "product is run, e.g. --grid hidden=32,64,128 --grid algo=fedclip,local"),
    seeds: str = typer.Option("0,1,2", help="Seeds, trained together per grid point."),
    jobs: int = typer.Option(1, min=1, help="Worker processes for grid points (torch threads are divided)."),
    allow_incomplete: bool = typer.Option(False, help=ALLOW_INCOMPLETE_HELP),
    features: str = typer.Option("auto", help=FEATURES_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    # sweeps on Ray (sweep_ray.py)
    ray: Optional[str] = typer.Option(None, "--ray", help="Run the grid points as Ray tasks: auto (a new local Ray "
                                      "instance) or a running cluster's HOST:PORT / ray://HOST:PORT; the cache path "
                                      "must be visible on every node."),
    cpus_per_task: Optional[float] = typer.Option(None, help="With --ray: CPUs each point's task declares "
                                                             "(default 1)."),
    gpus_per_task: Optional[float] = typer.Option(None, help="With --ray: GPUs each point's task declares; a "
                                                             "fraction lets points share a GPU (e.g. 0.25)."),
    fed_options: dict = None,
):
    """Run a grid of federate configurations x seeds on one cache; tables, Parquet results and plots."""
    from .report import render_sweep
    from .sweep import grid_names, parse_grid, plan, sweep as run_sweep
    from .sweep_ray import nodes_text, ray_plan

    base = _config_from_flags(fed_options, validate=False)  # validated per grid point: the grid may override it
    g, names = parse_grid(grid), {**FEDERATE_FLAGS, **grid_names(grid)}
    seed_list = _seeds(seeds)
    on_ray = ray_plan(ray, cpus_per_task, gpus_per_task, jobs)
    from .cache.reader import open_cache

    open_cache(cache, allow_incomplete=allow_incomplete, load_features=False)  # an unfinished cache: refused first
    plan(cache, base, g, seed_list, jobs, names, on_cluster=on_ray is not None)  # every point, before any file
    progress = None
    if not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[nodes]}"))
        progress.start()
        task = progress.add_task("sweep", total=None, nodes="")
    try:
        res = run_sweep(cache, base, g, seed_list, out, jobs=jobs, names=names, allow_incomplete=allow_incomplete,
                        features_in=_features_in(features), ray=on_ray,
                        on_done=(lambda d, t: progress.update(task, completed=d, total=t)) if progress else None,
                        on_node=(lambda c: progress.update(task, nodes=nodes_text(c))) if progress else None)
    finally:
        if progress:
            progress.stop()
    again = f" ({res['stale']} of them again because the cache changed since they ran)" if res["stale"] else ""
    console.print(f"{res['ran']} grid point(s) trained now{again}, {res['points'] - res['ran']} re-used from earlier "
                  f"runs", soft_wrap=True)
    if base.log and res["points"] > res["ran"]:  # trackers get a point when it is trained, not when it is re-used
        console.print(f"[bold yellow]note:[/] --log {base.log}: the {res['points'] - res['ran']} re-used point(s) "
                      f"were not sent (only points trained by this command are); see docs/tracking.md",
                      soft_wrap=True, markup=True)
    if res["done"] < res["total"]:  # an earlier, wider command on this folder left points to do
        console.print(f"[bold yellow]partial:[/] {res['done']} of {res['total']} points of this sweep folder are "
                      f"finished; run its wider grid again to finish it", soft_wrap=True)
    render_sweep(res, console)
    console.print(f"sweep folder: {out} (results.parquet, summary.md, summary.csv, plots/)")


@app.command()
@with_federate_options
def deploy(
    site_caches: list[Path] = typer.Argument(..., help="One cache per site (each `extract`ed from that site's own "
                                                       "images, same model and --classes file)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (the ServerApp's outputs; logs/ for every "
                                                      "process's log)."),
    timeout: float = typer.Option(0, help="Fail (and stop everything) when the run takes longer, in seconds; 0: "
                                          "no limit."),
    isolation: str = typer.Option("worker", help="worker: each site is `fedclip-cache site` (a SuperNode and ONE "
                                                 "long-lived ClientApp process) | subprocess / process: Flower's "
                                                 "stock runners, a fresh flwr-clientapp process per message "
                                                 "(~25 s per round; for comparison)."),
    poll_interval: float = typer.Option(DEFAULT_POLL_INTERVAL, help="Longest wait between two polls of the "
                                        "ServerApp and the SuperNodes (adaptive: 0.01 s right after a message, 1.5x "
                                        "longer each time while idle; flwr 1.42's own: 3 s fixed)."),
    keep_going: bool = typer.Option(False, "--keep-going", help="A SuperNode that dies is reported and the run goes "
                                                               "on without it (default: the deployment fails)."),
    round_timeout: Optional[float] = typer.Option(None, help="Seconds a round waits for replies (ServerApp "
                                                             f"default {DEFAULT_ROUND_TIMEOUT:g})."),
    min_results: Optional[int] = typer.Option(None, help="Fewer training results in a round keep the global adapter "
                                                         f"as it was (ServerApp default {DEFAULT_MIN_RESULTS})."),
    fed_options: dict = None,
):
    """A real Flower deployment on localhost: a SuperLink, its ServerApp process and one site (`fedclip-cache site`:
    a SuperNode and its long-lived ClientApp worker) per site cache, as separate processes; --heldout names the site that only
    evaluates. Stops everything it started; exits non-zero when the run failed."""
    import signal
    import threading

    from .launch.deploy import Launch, deploy as run_deploy
    from .launch.procs import raise_interrupt

    # SIGTERM is a Ctrl-C from the start: the Launch below makes a temporary folder and starts the zygote BEFORE the
    # options are checked (seconds: the check imports torch); SIGTERM's default action there left the folder behind
    old_term = launch = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        launch = Launch(isolation, poll_interval)  # first: its zygote imports flwr, torch while options are checked
        cfg = _config_from_flags(fed_options, validate=False)  # validated by deploy (the check imports torch)
        res = run_deploy([str(c) for c in site_caches], out, cfg, timeout=None if timeout == 0 else timeout,
                         isolation=isolation, keep_going=keep_going, round_timeout=round_timeout,
                         min_results=min_results, poll_interval=poll_interval, launch=launch, flags=FEDERATE_FLAGS,
                         log=lambda m: console.print(m, highlight=False))
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: deploy stopped everything it started on the way out
        err.print(f"[bold red]error:[/] deploy: interrupted; every process it started was stopped, the run folder "
                  f"{out} is incomplete", highlight=False, soft_wrap=True)
        raise SystemExit(130)
    finally:
        if launch is not None and not launch.used:  # deploy() never took it (it ends what it took)
            launch.abort()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    console.print(f"run folder: {out} (config.json, metrics.parquet, summary.json, adapter.pt, plots/; logs/: "
                  f"superlink, serverapp, site-*, deploy.json)")
    if res["summary"] is not None:
        from .report import render_run_summary

        render_run_summary(res["summary"], console)
    _exit_now_if_entry_point()


def _exit_now_if_entry_point() -> None:
    """End the process at once (exit 0) when this is the ``fedclip-cache`` process itself: everything is written
    and every process it started is stopped; the interpreter's own teardown of torch and flwr would add ~1 s to the
    command. In-process callers (tests, ``main()`` from Python) return as usual."""
    import os

    entry = sys.modules.get("__main__")
    spec = getattr(entry, "__spec__", None)
    script = Path(getattr(entry, "__file__", "") or "").name
    if (spec is not None and spec.name == "fedclip_cache.__main__") or script == "fedclip-cache":
        console.file.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
@with_federate_options
def simulate(
    caches: list[Path] = typer.Argument(..., help="ONE shared cache (one virtual SuperNode per training client, "
                                                  "plus one for the --heldout domain), or one cache per site "
                                                  "(each one domain; node K gets cache=SITE_K)."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (the ServerApp's outputs, as `federate`'s)."),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs Ray may use in all (default: this machine's)."),
    client_cpus: float = typer.Option(1.0, help="CPUs per ClientApp actor: Ray runs num-cpus / client-cpus "
                                                "actors (processes) side by side."),
    backend_config: Optional[str] = typer.Option(None, help="Flower's backend config as JSON (or @FILE): "
                                                            "init_args (ray.init), client_resources, actor; merged "
                                                            "over --num-cpus/--client-cpus."),
    poll_interval: float = typer.Option(SIMULATION_POLL_INTERVAL,
                                        help="Seconds between the ServerApp's polls for replies (Flower's "
                                                   "own: 3 s)."),
    round_timeout: Optional[float] = typer.Option(None, help="Seconds a round waits for replies (ServerApp "
                                                             f"default {DEFAULT_ROUND_TIMEOUT:g})."),
    min_results: Optional[int] = typer.Option(None, help="Fewer training results in a round keep the global "
                                                         "adapter as it was (ServerApp default "
                                                         f"{DEFAULT_MIN_RESULTS})."),
    verbose: bool = typer.Option(False, help="Flower's DEBUG log."),
    fed_options: dict = None,
):
    """The Flower ServerApp/ClientApp of `deploy`, run in Flower's simulation engine (Ray, on this machine): no
    SuperLink or SuperNode processes, no network. One federation per run: --heldout DOMAIN or --protocol personal.
    Needs fedclip-cache\\[simulation]."""
    from .launch.simulate import parse_backend_config, simulate as run_simulate

    cfg = _config_from_flags(fed_options)
    try:
        res = run_simulate([str(c) for c in caches], out, cfg, num_cpus=num_cpus, client_cpus=client_cpus,
                           backend=parse_backend_config(backend_config), poll_interval=poll_interval,
                           round_timeout=round_timeout, min_results=min_results, verbose=verbose,
                           log=lambda m: console.print(m, highlight=False, markup=False))
    except KeyboardInterrupt:
        # Ray is shut down by now; Flower's engine threads may still wait on it: exit without waiting for them
        import os

        err.print("[bold red]error:[/] simulate: interrupted; Ray was shut down, the run folder is incomplete",
                  highlight=False, soft_wrap=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    from .report import render_run_summary

    render_run_summary(res["summary"], console)  # the ServerApp drew plots/ with the run folder
    console.print(f"run folder: {out} (config.json, metrics.parquet, summary.json, adapter.pt, plots/, "
                  f"simulation.json)")


@app.command()
def site(
    cache: Path = typer.Argument(..., help="This site's own cache (one domain, `extract`ed from its own images)."),
    superlink: str = typer.Option(..., help="The SuperLink's Fleet API, HOST:PORT."),
    port: int = typer.Option(9094, help="This site's SuperNode Runtime API port on 127.0.0.1 (one per SuperNode on "
                                        "a machine)."),
    insecure: bool = typer.Option(False, "--insecure", help="Connect to the SuperLink without TLS (localhost "
                                                           "tests only)."),
    root_certificates: Optional[Path] = typer.Option(None, help="CA certificate (PEM) of the SuperLink's TLS."),
    auth_supernode_private_key: Optional[Path] = typer.Option(
        None, help="This site's SuperNode authentication key (flwr 1.42: an EC private key in OpenSSH format, e.g. "
                   "`ssh-keygen -t ecdsa -b 384 -N '' -f site_key`); its public key is registered on the server "
                   "with `flwr supernode register site_key.pub`. Needs TLS (--root-certificates)."),
    poll_interval: float = typer.Option(DEFAULT_POLL_INTERVAL,
                                        help="Longest wait between the SuperNode's requests for messages "
                                                  "(adaptive: 0.01 s right after a message, 1.5x longer each time "
                                                  "while idle; flwr 1.42's own: 3 s fixed)."),
):
    """One site of a real Flower deployment, in ONE process: Flower's SuperNode (--isolation process, node config
    cache=CACHE) and a ClientApp worker thread that imports torch and opens the cache once, instead of a fresh
    process per message. Started again on the same cache, a site rejoins a running federation. Runs until stopped (SIGTERM/Ctrl-C) or until the SuperNode exits. Needs fedclip-cache\\[flower]."""
    from .federated.config import ConfigError
    from .launch.site import run_site

    if not insecure and root_certificates is None:
        raise ConfigError("site: give --root-certificates (the SuperLink's CA) or --insecure (no TLS)")
    from .launch.site import check_site_credentials

    extra = check_site_credentials(insecure, root_certificates, auth_supernode_private_key)
    if not 0 < poll_interval <= MAX_POLL_INTERVAL:
        raise ConfigError(f"--poll-interval {poll_interval}: must be in (0, {MAX_POLL_INTERVAL:g}] seconds")
    if not 1 <= port <= 65535:
        raise ConfigError(f"site: --port {port}: must be between 1 and 65535")
    from .cache.reader import cache_overview

    names = cache_overview(cache).domain_names  # a missing or damaged cache: its one-line error, before start-up
    if len(names) != 1:
        raise ConfigError(f"site: {cache}: a site cache holds one domain (this one: {', '.join(names)}); extract "
                          f"this site's own images into its own cache")
    raise SystemExit(run_site(str(cache), superlink, port=port, insecure=insecure,
                              root_certificates=str(root_certificates) if root_certificates else None,
                              poll_interval=poll_interval, extra=extra,
                              log=lambda m: print(f"[site] {m}", flush=True)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def superlink(
    ctx: typer.Context,
    fleet_address: str = typer.Option(..., help="HOST:PORT the sites reach (their --superlink): ONLY the Fleet API "
                                                "is served there (e.g. 0.0.0.0:9092)."),
):
    """flwr 1.42's SuperLink for a real multi-machine deployment: every other option goes to flwr's
    `flower-superlink` (--port, --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, --enable-supernode-auth, ...). Its
    Control API (run submission) and Runtime API stay on loopback (--host, default 127.0.0.1: `flwr run` on this
    machine); the same SuperLink's Fleet API alone is served on --fleet-address, with the same TLS. Needs
    fedclip-cache\\[flower]."""
    from .launch.fleet_gate import serve

    serve(fleet_address, list(ctx.args))


@app.command()
def algorithms(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the federated algorithms --algo accepts: what each does, its reference and its own options."""
    from .federated.algorithms import ALGORITHMS
    from .federated.config import option_flag

    rows = [{"name": n, "summary": c.summary, "reference": c.reference, "communicates": c.communicates,
             "options": [option_flag(o) for o in c.uses]} for n, c in ALGORITHMS.items()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="algorithms (--algo)")
    for col in ("name", "what it does", "own options", "reference"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["summary"], " ".join(r["options"]), r["reference"])
    console.print(t)


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run folder (from federate --out) or a sweep folder."),
    format: str = typer.Option("table", help="table (rich) | md | csv | json."),
    plots: bool = typer.Option(True, help="Re-draw the PNG plots."),
    partial: bool = typer.Option(False, "--partial", help="Report a sweep whose points are not all finished "
                                                          "(refused by default), saying 'k of n points'."),
):
    """Re-render the tables and plots of a finished run or sweep, without recomputing anything. An unfinished,
    mixed or busy run folder is refused (its state.json), and so is a partial sweep unless --partial."""
    from .report import report_path

    report_path(path, format, plots, console, partial)


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML file, or the name of a bundled pipeline: "
                                              + ", ".join(bundled_pipelines()) + "."),
    data: Optional[Path] = typer.Option(None, help="Dataset: a folder, a manifest, hf:NAME[:SPLIT], Parquet with image "
                                                   "bytes or WebDataset shards (default: the pipeline's [pipeline] "
                                                   "source; needed until the cache exists)."),
    set_: List[str] = typer.Option([], "--set", help="Override SECTION.KEY=VALUE, e.g. federate.rounds=50; "
                                                     "repeatable."),
    base_dir: Path = typer.Option(Path("."), help="Where the pipeline's relative cache/out paths live."),
    # one flag, declared by name: a bool option named no_* otherwise gets typer's automatic pair --no-no-sweep
    no_sweep: bool = typer.Option(False, "--no-sweep", help="Stop after federate."),
):
    """extract -> federate (LODO, every held-out domain) -> sweep, re-using the cache when it exists."""
    from .pipeline import run as run_pipeline
    from .report import render_run_summary, render_sweep

    res = run_pipeline(pipeline, str(data) if data else None, set_, base_dir, log=console.print,
                       skip_sweep=no_sweep)
    render_run_summary(res["federate"], console)
    if "sweep" in res:
        render_sweep(res["sweep"], console)
    console.print(f"outputs: {res['out']} (federate/, sweep/)")


def main() -> None:
    try:
        app()
    except SystemExit as e:
        # click's exit on a closed pipe swaps sys.stdout for its PacifyFlushWrapper. Recognised by name: typer >= 0.26
        # runs on its own copy of click (typer._click), whose class is not click's, and click need not be installed.
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _say_broken_pipe()
        raise
    except FedclipCacheError as e:  # a complete one-line diagnosis: print it, exit 2, no traceback
        from rich.markup import escape

        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
