"""The ``fedclip-cache`` command line: a thin typer layer over the library."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import FedclipCacheError

if TYPE_CHECKING:
    from .federated.config import FederateConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract frozen CLIP features once; train FedCLIP and baselines on the cache.")
console = Console()
err = Console(stderr=True)



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


@app.command()
def extract(
    source: Path = typer.Argument(..., help="DomainBed folder ROOT/<domain>/<class>/<image>, or a manifest "
                                            ".csv/.parquet (path, label, domain[, client][, split])."),
    out: Path = typer.Argument(..., help="Cache folder to create or extend (resumable)."),
    model: str = typer.Option("ViT-B-32", help="open_clip model name, NAME/TAG (e.g. ViT-B-32/openai), or "
                                               "local-dir:DIR."),
    pretrained: Optional[str] = typer.Option("openai", help="Pretrained tag, a local checkpoint file, or "
                                                            "'none' for random init."),
    model_config: Optional[Path] = typer.Option(None, help="Custom architecture JSON (registered with "
                                                           "open_clip; its file stem becomes the model name)."),
    image_mean: Optional[str] = typer.Option(None, help="Override normalisation mean, e.g. 0.5,0.5,0.5."),
    image_std: Optional[str] = typer.Option(None, help="Override normalisation std, e.g. 0.5,0.5,0.5."),
    format: str = typer.Option("parquet", help="parquet or hdf5."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16."),
    dtype: str = typer.Option("float32", help="Stored embedding dtype: float32 or float16."),
    batch_size: int = typer.Option(64, min=1),
    workers: Optional[int] = typer.Option(None, min=0, help="DataLoader worker processes (default: all CPUs up to 32 on "
                                                                     "CUDA, min(4, CPUs) on CPU)."),
    shard_size: int = typer.Option(4096, min=1, help="Images per committed shard (the most a crash can lose)."),
    template: Optional[List[str]] = typer.Option(None, help="Prompt template with {} for the class; repeatable. "
                                                            "Default: the official 'a picture of a {}'."),
    templates_file: Optional[Path] = typer.Option(None, help="File with one template per line."),
    strict: bool = typer.Option(False, help="Fail on the first unreadable image instead of skipping it."),
    seed: int = typer.Option(0, help="Seed for random-init models (--pretrained none)."),
    quick_gelu: Optional[bool] = typer.Option(
        None, "--quick-gelu/--no-quick-gelu",
        help="Transformer MLP activation. Default (auto): QuickGELU when the pretrained tag's config says so "
             "(openai, laion400m, metaclip, ...; OpenAI trained with it), else what the model config says "
             "(-quickgelu names, quick_gelu in a JSON/local-dir config). A checkpoint FILE cannot tell us the "
             "activation its weights were trained with: pass --quick-gelu for OpenAI-trained weights loaded from a "
             "file. The activation built is recorded in the cache."),
    dataset: Optional[str] = typer.Option(None, help="Known dataset (PACS, VLCS, OfficeHome, DomainNet) to check "
                                                     "counts against; default: recognised only by its exact set "
                                                     "of domain names."),
    exif_transpose: bool = typer.Option(False, help="Rotate images by their EXIF orientation tag before "
                                                    "preprocessing (the official code, like ImageFolder, does not)."),
    verify: bool = typer.Option(False, help="Re-hash every committed shard before resuming (default: size check); "
                                            "damaged shards are removed and their images re-embedded."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Run frozen open_clip once over every image and store raw embeddings + class-prompt text embeddings.

    Re-running the same command resumes a killed run, embeds only new or changed images, retries files that failed
    for a transient reason, retires images deleted or moved since, and repairs damaged shards or metadata. One
    extract at a time per cache: a second is refused while the first runs."""
    from .extract import DEFAULT_TEMPLATES, ExtractConfig, extract as run_extract
    from .models import ModelSpec

    templates = list(template or [])
    if templates_file:
        if not templates_file.is_file():
            why = "not a regular file" if templates_file.exists() else "not found"
            raise typer.BadParameter(f"{templates_file}: {why}", param_hint="--templates-file")
        from_file = [ln.strip() for ln in templates_file.read_text(errors="replace").splitlines() if ln.strip()]
        if not from_file:
            raise typer.BadParameter(f"{templates_file}: no templates in the file (one per line, with {{}})",
                                     param_hint="--templates-file")
        templates += from_file
    cfg = ExtractConfig(
        source=str(source), out=str(out),
        model=ModelSpec(model=model, pretrained=pretrained, model_config=str(model_config) if model_config else None,
                        image_mean=_floats(image_mean, "--image-mean"), image_std=_floats(image_std, "--image-std"),
                        seed=seed, quick_gelu=quick_gelu),
        format=format, device=device, precision=precision, dtype=dtype, batch_size=batch_size, workers=workers,
        shard_size=shard_size, templates=templates or list(DEFAULT_TEMPLATES), strict=strict, progress=not quiet,
        dataset=dataset, exif_transpose=exif_transpose, verify=verify)
    rep = run_extract(cfg)
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.markup import escape

    from .store import display_text

    console.print(f"[bold green]cache[/] {escape(rep.cache)}: +{rep.embedded} embedded, {len(rep.skipped)} skipped, "
                  f"{rep.already_cached} already cached ({rep.changed} changed files re-extracted, {rep.retried} "
                  f"retried), {len(rep.retired)} retired, {rep.refreshed} refreshed (label, domain, split or file identity), in {rep.seconds:.1f}s ({rep.images_per_s:,.0f} img/s); "
                  f"total {rep.total_images} images", soft_wrap=True)
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
    from .cache import cache_overview
    from .report import cache_summary, render_cache_summary

    summary = cache_summary(cache_overview(cache, allow_incomplete=allow_incomplete, verify=verify))
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        render_cache_summary(summary, console)


# Federate options are declared once and shared by `federate` and `sweep` (which accepts any federate option).
FEDERATE_OPTIONS: list[tuple[str, type, object]] = [
    ("algo", str, typer.Option("fedclip", help="fedclip (FedAvg of the adapter) | fedprox | fedavgm | fedadam | "
                                               "fedyogi | fedadagrad | local | central | zeroshot.")),
    ("adapter", str, typer.Option("fedclip", help="fedclip (official gate) | residual (CLIP-Adapter) | linear.")),
    ("hidden", Optional[int], typer.Option(None, help="Adapter width h (fedclip default h = D, the official setting).")),
    ("residual_alpha", float, typer.Option(0.2, help="Mixing weight of the residual adapter.")),
    ("head", str, typer.Option("text", help="text (class prompts from the cache) | prototype (class means).")),
    ("template", str, typer.Option("0", help="Index of the cache's prompt template, or 'mean' for an ensemble.")),
    ("loss", str, typer.Option("contrastive", help="contrastive (official in-batch CLIP loss) | ce.")),
    ("logit_scale", Optional[float], typer.Option(None, help="Logit scale (temperature) of the cosine logits; "
                                                            "default: the model's own logit_scale.exp() from the "
                                                            "cache (100 for OpenAI CLIP, the official value).")),
    ("lr", float, typer.Option(5e-5, help="Adam learning rate (official 5e-5).")),
    ("weight_decay", float, typer.Option(0.2, help="Adam L2 weight decay, coupled (official 0.2).")),
    ("batch_size", int, typer.Option(32, help="Local batch size (official 32).")),
    ("local_epochs", int, typer.Option(1, help="Local epochs per round (official 1).")),
    ("rounds", int, typer.Option(200, help="Communication rounds (official README: 200).")),
    ("mu", float, typer.Option(0.0, help="FedProx proximal weight.")),
    ("server_lr", Optional[float], typer.Option(None, help="Server learning rate of fedavgm/fedadam/fedyogi/"
                                                          "fedadagrad; default: the algorithm's own (fedavgm 1, "
                                                          "fedadam 3e-3, fedyogi 1e-2, fedadagrad 3e-3).")),
    ("server_momentum", float, typer.Option(0.9, help="Server momentum of fedavgm (Flower's default is 0: FedAvg).")),
    ("server_beta1", float, typer.Option(0.9, help="First-moment decay of fedadam/fedyogi (Flower's beta_1).")),
    ("server_beta2", float, typer.Option(0.99, help="Second-moment decay of fedadam/fedyogi (Flower's beta_2).")),
    ("tau", Optional[float], typer.Option(None, help="Adaptivity of fedadam/fedyogi/fedadagrad (added to the root of "
                                                    "the second moment); default: Flower's (1e-9, 1e-3, 1e-9).")),
    ("weighting", str, typer.Option("uniform", help="uniform (official) | samples (FedAvg by sample count).")),
    ("protocol", str, typer.Option("lodo", help="lodo (leave-one-domain-out, official) | personal.")),
    ("heldout", Optional[str], typer.Option(None, help="Held-out domain(s), comma-separated; default: each in turn.")),
    ("partition", str, typer.Option("none", help="none (clients = domains) | iid | dirichlet | pathological.")),
    ("alpha", float, typer.Option(0.5, help="Dirichlet concentration (smaller = more label skew).")),
    ("num_clients", int, typer.Option(4, "--clients", help="Clients per partition scope.")),
    ("classes_per_client", int, typer.Option(2, help="Classes per client for --partition pathological.")),
    ("partition_scope", str, typer.Option("domain", help="domain (split each domain) | pooled.")),
    ("split", str, typer.Option("0.6,0.2,0.2", help="Train/val/test fractions of each training client.")),
    ("split_tail", str, typer.Option("drop", help="drop (official: train/val/test = int(.6n)/int(.2n)/int(.2n), the "
                                                  "0-2 left over dropped and counted) | test (they go to test).")),
    ("split_source", str, typer.Option("random", help="random (seeded) | cache (the manifest's split column).")),
    ("client_key", str, typer.Option("domain", help="domain | client: which cache column defines clients.")),
    ("seed", int, typer.Option(0, help="Seed (data split, shuffles, adapter init).")),
    ("eval_every", int, typer.Option(1, help="Evaluate every N rounds (official: every round).")),
    ("device", str, typer.Option("cpu", help="cpu | cuda | auto (cuda: features stay on the GPU when they fit, "
                                             "else are streamed per batch from host memory).")),
    ("keep_denormals", bool, typer.Option(False, "--keep-denormals", help="Do not flush denormal floats to zero "
                                          "(by default they are flushed on every CPU thread while training: "
                                          "saturated softmax gradients otherwise slow steps down many times).")),
]


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


def _flag(name: str, opt) -> str:
    decls = [d for d in getattr(opt, "param_decls", None) or () if d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


# Config field -> the flag a user types (num_clients -> --clients), so that every error names the real flag.
FEDERATE_FLAGS: dict[str, str] = {n: _flag(n, opt) for n, _, opt in FEDERATE_OPTIONS}


def _federate_config(fed: dict, validate: bool = True) -> "FederateConfig":
    from .federated.config import ConfigError, FederateConfig

    kw = dict(fed)
    if isinstance(kw.get("split"), str):
        try:
            kw["split"] = tuple(float(x) for x in kw["split"].split(","))
        except ValueError:
            raise ConfigError(f"{FEDERATE_FLAGS['split']} {kw['split']!r}: expected three comma-separated "
                              f"fractions, e.g. 0.6,0.2,0.2") from None
    if kw.get("heldout") is not None and kw["heldout"].strip():  # "" = the default: every domain in turn
        kw["heldout"] = [h.strip() for h in kw["heldout"].split(",")]
        if not all(kw["heldout"]):
            raise ConfigError(f"{FEDERATE_FLAGS['heldout']} {fed['heldout']!r}: expected domain names separated "
                              f"by commas, e.g. photo,sketch")
    else:
        kw["heldout"] = []
    cfg = FederateConfig(**kw)
    return cfg.validate(FEDERATE_FLAGS) if validate else cfg


def _seeds(text: str) -> list[int]:
    from .federated.config import ConfigError
    from .sweep import check_seeds

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
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

    cfg = _federate_config(fed_options)
    seed_list = _seeds(seeds) if seeds is not None else None
    from .cache import open_cache

    fc = open_cache(cache, allow_incomplete=allow_incomplete, features_in=_features_in(features))
    summary = run_federate(fc, cfg, out, seeds=seed_list, progress=not quiet and not as_json)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    render_run_summary(summary, console)
    if out:
        from .plots import run_plots
        run_plots(out)
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
    fed_options: dict = None,
):
    """Run a grid of federate configurations x seeds on one cache; tables, Parquet results and plots."""
    from .report import render_sweep
    from .sweep import grid_names, parse_grid, plan, sweep as run_sweep

    base = _federate_config(fed_options, validate=False)  # validated per grid point: the grid may override it
    g, names = parse_grid(grid), {**FEDERATE_FLAGS, **grid_names(grid)}
    seed_list = _seeds(seeds)
    from .cache import open_cache

    open_cache(cache, allow_incomplete=allow_incomplete, load_features=False)  # an unfinished cache: refused first
    plan(cache, base, g, seed_list, jobs, names)  # every point checked before the progress bar or any file
    progress = None
    if not quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn
        progress = Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                            TimeElapsedColumn(), TimeRemainingColumn())
        progress.start()
        task = progress.add_task("sweep", total=None)
    try:
        res = run_sweep(cache, base, g, seed_list, out, jobs=jobs, names=names, allow_incomplete=allow_incomplete,
                        features_in=_features_in(features),
                        on_done=(lambda d, t: progress.update(task, completed=d, total=t)) if progress else None)
    finally:
        if progress:
            progress.stop()
    again = f" ({res['stale']} of them again because the cache changed since they ran)" if res["stale"] else ""
    console.print(f"{res['ran']} grid point(s) trained now{again}, {res['points'] - res['ran']} re-used from earlier "
                  f"runs", soft_wrap=True)
    render_sweep(res, console)
    console.print(f"sweep folder: {out} (results.parquet, summary.md, summary.csv, plots/)")


@app.command()
def report(
    path: Path = typer.Argument(..., help="A run folder (from federate --out) or a sweep folder."),
    format: str = typer.Option("table", help="table (rich) | md | csv | json."),
    plots: bool = typer.Option(True, help="Re-draw the PNG plots."),
):
    """Re-render the tables and plots of a finished run or sweep, without recomputing anything."""
    from .report import report_path

    report_path(path, format, plots, console)


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline TOML (see pipelines/)."),
    data: Optional[Path] = typer.Option(None, help="Dataset folder or manifest (needed until the cache exists)."),
    set_: List[str] = typer.Option([], "--set", help="Override SECTION.KEY=VALUE, e.g. federate.rounds=50; "
                                                     "repeatable."),
    base_dir: Path = typer.Option(Path("."), help="Where the pipeline's relative cache/out paths live."),
    no_sweep: bool = typer.Option(False, help="Stop after federate."),
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
    except FedclipCacheError as e:  # a complete one-line diagnosis: print it, exit 2, no traceback
        from rich.markup import escape

        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
