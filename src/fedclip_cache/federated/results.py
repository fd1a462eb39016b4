"""From loop output to what users read: selection, per-round metrics, summary, communication cost, run folder."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..cache.reader import FeatureCache, open_cache
from ..cache.store import atomic_write, write_json
from .algorithms import get_algorithm
from .config import ConfigError, FederateConfig
from .loop import NOVEL, LoopResult, run_loop
from .protocols import build_experiments, harmonic_mean, split_said

BYTES_PER_PARAM = 4  # float32 adapters travel


def metrics_table(res: LoopResult):
    """Tidy per-round metrics: one row per (round, experiment, client, split)."""
    import pyarrow as pa

    r, s = len(res.rounds), len(res.segments)
    seg = res.segments
    table = pa.table({
        "round": np.repeat(np.array(res.rounds, np.int32), s),
        "experiment": [x["experiment"] for x in seg] * r,
        "heldout": [x["heldout"] for x in seg] * r,
        "seed": np.tile(np.array([x["seed"] for x in seg], np.int32), r),
        "client": [x["client"] for x in seg] * r,
        "split": [x["split"] for x in seg] * r,
        "n": np.tile(np.array([x["n"] for x in seg], np.int32), r),
        "accuracy": res.acc.reshape(-1),
        "loss": res.loss.reshape(-1),
    })
    # Lazy evaluation scores test/held-out only at some rounds (see loop.Evaluator): unscored rows are left out.
    scored = ~np.isnan(res.acc.reshape(-1))
    return table if scored.all() else table.filter(pa.array(scored))


def communication(cfg: FederateConfig, n_clients: int, trainable: int, rounds: int, model_params: Optional[int],
                  num_classes: int, dim: int, fit_clients: Optional[float] = None,
                  communicated: Optional[int] = None) -> dict:
    """Bytes one experiment moves: each round every sampled client downloads and uploads ``upload_factor``
    adapters' worth of float32 parameters (SCAFFOLD: the adapter and a control variate). ``fit_clients`` is the
    mean number of clients sampled per round (default: all). ``communicated``: the parameters that travel when
    they are fewer than those trained (FedPGP: sigma, not the personal U V)."""
    algo = get_algorithm(cfg.algo)
    per_client = (trainable if communicated is None else communicated) * BYTES_PER_PARAM
    fit = n_clients if fit_clients is None else fit_clients
    up = int(round(per_client * algo.upload_factor * fit)) if algo.communicates else 0
    proto = (num_classes * dim + num_classes) * BYTES_PER_PARAM * n_clients if cfg.head == "prototype" and \
        not algo.personal and not algo.prompts else 0  # class sums + counts, sent once
    out = {
        "trainable_params": trainable,
        "bytes_per_adapter": per_client,
        "clients_per_round": fit if algo.communicates else 0,
        "bytes_up_per_round": up,
        "bytes_down_per_round": up,
        "bytes_total": (2 * up * rounds) + proto,
        "prototype_bytes_once": proto,
        "full_model_params": model_params,
        "full_model_over_adapter": round(model_params / trainable, 1) if model_params and trainable else None,
    }
    return out


def _mean(values: np.ndarray) -> Optional[float]:
    """Mean of the values that were scored (NaN = not scored: lazy evaluation, or a site that did not report)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def _finite(x) -> Optional[float]:
    return None if np.isnan(x) else float(x)


def selected_round(val_curve: np.ndarray) -> int:
    """The index of the selected round in a mean-validation curve: the first best, as the official `if best < val`
    update; a round nobody reported (a deployment: NaN) never wins."""
    return int(np.argmax(np.nan_to_num(np.asarray(val_curve, dtype=float), nan=-np.inf)))


def experiment_summary(res: LoopResult, ei: int) -> dict:
    """The summary of experiment ``ei``: its clients' split sizes, and the selected ("best": by mean validation
    accuracy, or the last round without validation data) and the last round's accuracies."""
    segs, e = res.segments, res.experiments[ei]
    ix = [i for i, s in enumerate(segs) if s["experiment"] == e.name]
    val = [i for i in ix if segs[i]["split"] == "val"]
    test = [i for i in ix if segs[i]["split"] == "test"]
    held = [i for i in ix if segs[i]["split"] == "heldout"]
    val_curve = res.val_mean[:, ei] if res.val_mean is not None else \
        (res.acc[:, val].mean(1) if val else np.zeros(len(res.rounds)))
    # no validation data (--split 1,0,0, or clients too small for a val split): nothing to select with, so the
    # last round is reported (the rule of a run without validation), said in a note; never round 1 by default
    best = selected_round(val_curve) if val else len(res.rounds) - 1

    def at(k: int) -> dict:
        out = {
            "round": int(res.rounds[k]),
            "val_mean": _finite(val_curve[k]) if val else None,
            # a client missing from a round (a deployment's lost site) is left out, never imputed
            "test": {segs[i]["client"]: float(res.acc[k, i]) for i in test if not np.isnan(res.acc[k, i])},
            "test_mean": _mean(res.acc[k, test]) if test else None,
            "heldout": _mean(res.acc[k, held]) if held else None,
        }
        return {**out, **novel_accuracies(res, ix, k, out)} if res.classes is not None else out
    record = {"experiment": e.name, "heldout": e.heldout_name, "seed": e.seed,
              "clients": {cl.name: {"train": len(cl.train), "val": len(cl.val), "test": len(cl.test),
                                    "dropped": cl.dropped} for cl in e.clients},
              "heldout_size": int(len(e.heldout)) if e.heldout is not None else 0,
              "selected_by": "val_mean" if val else "last_round",
              "best": at(best), "last": at(len(res.rounds) - 1)}
    if res.finetuned is not None:  # personalised: the selected model fine-tuned on each client's train split
        tuned = res.finetuned[e.name]
        record["best"]["test_finetuned"] = tuned
        record["best"]["test_mean_finetuned"] = float(np.mean(list(tuned.values()))) if tuned else None
    return record


def novel_accuracies(res: LoopResult, ix: list[int], k: int, base: dict) -> dict:
    """``--base-to-novel``: round ``k``'s novel-class accuracies of the segments ``ix`` (one experiment) beside
    ``base`` (its ``test``/``test_mean``/``heldout``, which are the base classes'), and the harmonic means."""
    segs = res.segments
    test = [i for i in ix if segs[i]["split"] == "test" + NOVEL]
    held = [i for i in ix if segs[i]["split"] == "heldout" + NOVEL]
    novel_mean = _mean(res.acc[k, test]) if test else None
    heldout_novel = _mean(res.acc[k, held]) if held else None
    return {"test_novel": {segs[i]["client"]: float(res.acc[k, i]) for i in test if not np.isnan(res.acc[k, i])},
            "test_novel_mean": novel_mean, "test_hm": harmonic_mean(base["test_mean"], novel_mean),
            "heldout_novel": heldout_novel, "heldout_hm": harmonic_mean(base["heldout"], heldout_novel)}


def protocol_record(res: LoopResult, cfg: FederateConfig, classes: list[str]) -> dict:
    """What summary.json says of the protocols: ``shots`` (None: every training image) with the classes some
    client holds fewer of (``seed/client`` -> class -> images kept), and ``base_to_novel`` (None, or its rule and
    classes)."""
    short = {f"{e.seed}/{cl.name}": {classes[c]: n for c, n in cl.short.items()}
             for e in res.experiments for cl in e.clients if cl.short}
    b2n = None if res.classes is None else {
        "rule": "base = the first ceil(C/2) classes by index, novel = the rest (FedTPG)",
        "base_classes": [classes[i] for i in res.classes.base],
        "novel_classes": [classes[i] for i in res.classes.novel]}
    return {"shots": cfg.shots, "shots_short": short if cfg.shots is not None else None, "base_to_novel": b2n}


def mean_novel(exps: list[dict]) -> dict:
    """``--base-to-novel``: the summary's means of novel accuracy, and the harmonic means of the mean base and mean
    novel accuracies (CoCoOp's and FedTPG's tables: HM of the averages, not the average of HMs)."""
    out = {}
    for which in ("best", "last"):
        def avg(key):
            vals = [x[which][key] for x in exps if x[which].get(key) is not None]
            return float(np.mean(vals)) if vals else None
        for base, novel in (("heldout", "heldout_novel"), ("test_mean", "test_novel_mean")):
            b, n = avg(base), avg(novel)
            stem = base.replace("_mean", "")
            out[f"{novel}_{which}"], out[f"{stem}_hm_{which}"] = n, harmonic_mean(b, n)
    return out


def summarise(res: LoopResult, cfg: FederateConfig, cache: FeatureCache) -> dict:
    """summary.json of a run: every experiment's summary (:func:`experiment_summary`) and their means, what was
    trained (adapter or prompt), the notes (:func:`summary_notes`), the communication cost and the cache."""
    exps = [experiment_summary(res, ei) for ei in range(len(res.experiments))]
    n_clients = max(len(e.clients) for e in res.experiments)
    fit = float(np.mean(res.fit_clients)) / len(res.experiments) if res.fit_clients else None

    def avg(key, which):
        vals = [x[which][key] for x in exps if x[which][key] is not None]
        return float(np.mean(vals)) if vals else None

    dropped = dropped_samples(res)
    notes = summary_notes(res, cfg, dropped)
    prompts = get_algorithm(cfg.algo).prompts  # prompt learning: no adapter, no head, CE
    ctx = res.final_params.get("ctx", res.final_params.get("sigma")) if prompts else None  # fedpgp: sigma
    return {
        "algo": cfg.algo, "adapter": "none" if cfg.algo == "zeroshot" or prompts else cfg.adapter,
        "hidden": None if prompts else cfg.hidden, "head": "prompt" if prompts else cfg.head,
        "loss": "ce" if prompts else cfg.loss, "protocol": cfg.protocol,
        "train_views": res.train_views,  # views per training image sampled from (1: the official single view)
        # --precision of local training's forward passes; recorded when not the default (fp32 summaries unchanged)
        **({"precision": cfg.precision} if cfg.precision != "fp32" else {}),
        **({"prompt": {"n_ctx": int(ctx.shape[-2]) if ctx is not None else cfg.n_ctx,
                       "width": int(ctx.shape[-1]) if ctx is not None else None, "ctx_init": cfg.ctx_init,
                       "lr": cfg.prompt_lr, "schedule": cfg.prompt_schedule, "optimizer": "sgd",
                       "momentum": cfg.prompt_momentum, "weight_decay": cfg.prompt_weight_decay,
                       "class_specific": cfg.prompt_csc,
                       "truncated": not cfg.prompt_full_context,
                       **({"rank": cfg.pgp_rank, "mu": cfg.pgp_mu, "temp": cfg.pgp_temp}
                          if cfg.algo == "fedpgp" else {})}} if prompts else {}),
        "logit_scale": res.logit_scale, "logit_scale_source": res.logit_scale_source,
        "split_tail": cfg.split_tail if cfg.split_source == "random" else None,
        "split_dropped": int(sum(dropped.values())),
        **protocol_record(res, cfg, list(cache.classes)),
        "notes": notes,
        "rounds": cfg.rounds if cfg.algo != "zeroshot" else 0,
        "experiments": exps,
        "mean": {"heldout_best": avg("heldout", "best"), "test_mean_best": avg("test_mean", "best"),
                 "heldout_last": avg("heldout", "last"), "test_mean_last": avg("test_mean", "last"),
                 **({"test_mean_finetuned": avg("test_mean_finetuned", "best")} if res.finetuned is not None
                    else {}),
                 **(mean_novel(exps) if res.classes is not None else {})},
        "communication": communication(cfg, n_clients, res.trainable_params,
                                       cfg.rounds if cfg.algo != "zeroshot" else 0, cache.model_params,
                                       len(cache.classes), cache.dim, fit, res.communicated_params),
        "cache": cache.record() if hasattr(cache, "record") else cache_record(cache),  # a deployment: its sites
        "seconds": round(res.seconds, 3),
    }


def dropped_samples(res: LoopResult) -> dict[str, int]:
    """Samples in no split, per ``seed/client``: the official split boundaries drop the 0-2 left over per training
    client (counted once per client and seed: a domain is split the same way in every held-out run)."""
    return {f"{e.seed}/{cl.name}": cl.dropped for e in res.experiments for cl in e.clients}


def summary_notes(res: LoopResult, cfg: FederateConfig, dropped: dict[str, int]) -> list[str]:
    """The summary's notes: the loop's, what could not be measured, options set but ignored, a fallback logit
    scale, samples dropped by the split boundaries."""
    notes = list(res.notes) + measurement_notes(res.experiments, cfg)
    ignored = cfg.ignored_options()
    if ignored:
        notes.append(f"{cfg.algo} does not use {', '.join('--' + n.replace('_', '-') for n in ignored)} "
                     f"(set, but ignored)")
    unread = cfg.ignored_partition_options()
    if unread:
        notes.append(f"--partition {cfg.partition} does not use "
                     f"{', '.join('--' + n.replace('_', '-') for n in unread)} (set, but ignored)")
    if res.logit_scale_source.startswith("fallback"):
        notes.append(f"logit scale {res.logit_scale_source}")
    if sum(dropped.values()):
        notes.append(f"--split-tail drop (official boundaries): {sum(dropped.values())} sample(s) of training "
                     f"clients are in no split; --split-tail test gives them to the test split")
    return notes + shots_notes(res, cfg)


def shots_notes(res: LoopResult, cfg: FederateConfig) -> list[str]:
    """``--shots K``: the classes some client has fewer than K training images of, which keep all they have."""
    short = [(e, cl) for e in res.experiments for cl in e.clients if cl.short]
    if cfg.shots is None or not short:
        return []
    e, cl = short[0]
    c, n = next(iter(cl.short.items()))
    total = sum(len(cl.short) for _, cl in short)
    return [f"--shots {cfg.shots}: {total} (client, class) pair(s) in {len(short)} client split(s) have fewer "
            f"training images and keep all they have (e.g. {cl.name} in {e.name}, class index {c}: {n}); see "
            f"summary.json shots_short"]


def measurement_notes(experiments, cfg: FederateConfig) -> list[str]:
    """What a run could not measure, said loudly: runs without validation data (the last round is reported, not a
    selected one), without test data, and clients that lack a split the others have (too few samples)."""
    why = split_said(cfg)
    notes = []

    def names(exps) -> str:
        return ", ".join(e.name for e in exps[:3]) + (f" and {len(exps) - 3} more" if len(exps) > 3 else "")

    no_val = [e for e in experiments if e.clients and not any(len(c.val) for c in e.clients)]
    if no_val:
        notes.append(f"no validation data in {names(no_val)} ({why}): nothing to select a round with, so the last "
                     f"round is reported as 'best', not a selected one")
    no_test = [e for e in experiments if e.clients and not any(len(c.test) for c in e.clients)]
    if no_test:
        notes.append(f"no test data in {names(no_test)} ({why}): the clients' test accuracy is not measured (None)")
    for split, what in (("val", "selection averages"), ("test", "the test mean averages")):
        said = {id(e) for e in (no_val if split == "val" else no_test)}
        short = [(e, [c for c in e.clients if not len(getattr(c, split))]) for e in experiments
                 if id(e) not in said]
        short = [(e, cs) for e, cs in short if cs]
        if short:
            e, cs = short[0]
            size = len(cs[0].train) + len(cs[0].val) + len(cs[0].test) + cs[0].dropped
            notes.append(f"{len(cs)} of {len(e.clients)} training clients of {e.name} (e.g. {cs[0].name}, "
                         f"{size} samples) have no {split} split "
                         f"({why}: too few samples); {what} the others"
                         + (f" (likewise in {len(short) - 1} other run(s))" if len(short) > 1 else ""))
    return notes


def cache_record(cache: FeatureCache) -> dict:
    """Which cache a run used, and whether it was complete (an unfinished one is only used on request)."""
    rec = {"path": str(Path(cache.path).resolve()), "images": len(cache), "complete": cache.complete,
           "allow_incomplete": not cache.complete, "identity": cache.identity()}
    if not cache.complete:
        rec["incomplete_reason"] = cache.incomplete_reason
    return rec


def federate(cache: str | Path | FeatureCache, cfg: FederateConfig, out: Optional[str | Path] = None,
             seeds: Optional[list[int]] = None, progress: bool = False, allow_incomplete: bool = False,
             plots: bool = False) -> dict:
    """Train on a cache and (optionally) write a run folder, with ``plots`` its plots/; returns the summary dict.
    An unfinished cache is refused unless ``allow_incomplete`` (then the summary's ``cache`` record says so). The
    run folder is locked (``runfolder.claim``) once the options and the experiments are checked, before training;
    it is marked in-progress and an earlier run's outputs removed only once training is done (a run refused or
    killed before then leaves the earlier run as it was), and marked complete after its last output."""
    from .runfolder import RUN_OUTPUTS, claim, disk_full

    cfg.validate()
    check_tracking(cfg, out)
    fc = cache if isinstance(cache, FeatureCache) else open_cache(cache, allow_incomplete=allow_incomplete)
    exps = build_experiments(fc, cfg, seeds)
    # Locked now (a second federate is refused at once), but the earlier run in the folder is kept until this one
    # has trained: the loop's own checks (memory, prompt fit, the text model) refuse only after it has started.
    folder = claim(Path(out), "federate", "federate -o", start=False) if out is not None else None
    tracker = None
    try:
        if folder is not None and cfg.log:  # --log: the trackers' imports and store warm up while it trains
            from .tracking import start_tracking

            tracker = start_tracking(Path(out), cfg.log, cfg.mlflow_uri)
        res, summary = _train(fc, cfg, exps, progress)
        if folder is not None:
            folder.start()
            write_run(Path(out), fc, cfg, res, summary, seeds)
            if plots:  # under the lock: a run that starts next removes them
                from ..plots import run_plots

                with disk_full(Path(out), "plots"):
                    run_plots(Path(out))
            folder.complete(RUN_OUTPUTS)
            if cfg.log:  # the complete folder to the trackers (a failing tracker is warned about, never raised)
                from .tracking import track_run

                track_run(Path(out), cfg.log, cfg.mlflow_uri, tracker)
    finally:
        if folder is not None:
            folder.close()
    return summary


def check_tracking(cfg: FederateConfig, out) -> None:
    """``--log``: each tracker's package installed, and a run folder to read the numbers from and keep the
    trackers' files in (checked before the run starts)."""
    from .tracking import check_available

    if check_available(cfg.log) and out is None:
        raise ConfigError(f"--log {cfg.log}: needs a run folder (-o RUN): the trackers are sent what it holds and "
                          f"keep their files in it")


def _train(fc: FeatureCache, cfg: FederateConfig, exps, progress: bool) -> tuple[LoopResult, dict]:
    on_round, bar = None, None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn(f"[bold]{cfg.algo}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                       TimeRemainingColumn())
        bar.start()
        task = bar.add_task("rounds", total=cfg.rounds)
        on_round = lambda r, total: bar.update(task, completed=r)  # noqa: E731
    try:
        res = run_loop(fc, cfg, exps, on_round)
    finally:
        if bar:
            bar.stop()
    return res, summarise(res, cfg, fc)


def train(cache: FeatureCache, cfg: FederateConfig, seeds: Optional[list[int]] = None) -> tuple[LoopResult, dict]:
    """Train without a run folder: the loop's result and the summary (a sweep point writes its own folder)."""
    cfg.validate()
    return _train(cache, cfg, build_experiments(cache, cfg, seeds), False)


def write_run(out: Path, fc: Optional[FeatureCache], cfg: FederateConfig, res: LoopResult, summary: dict,
              seeds: Optional[list[int]], sites: Optional[dict] = None) -> None:
    """A run folder's files from the loop's result (``res.final_params`` is ``adapter.pt``): of ``federate`` and a
    sweep point (``fc``: the cache trained on), or of a Flower deployment's ServerApp (``fc`` None, ``sites``: each
    site's cache record; ``config.json`` then says ``deployment``)."""
    config: dict = ({"cache": str(Path(fc.path).resolve())} if sites is None
                    else {"deployment": True, "sites": sites})
    config.update(seeds=seeds or [cfg.seed], federate=cfg.to_dict(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if sites is None:
        config["cache_model"] = fc.meta.get("model", {}).get("name")
    config.update(logit_scale_used=res.logit_scale, logit_scale_source=res.logit_scale_source)
    write_outputs(out, config, res, res.final_params, summary)


def write_outputs(out: Path, config: dict, res: LoopResult, params: dict, summary: dict) -> None:
    """The four files of a run folder, ``summary.json`` last (:func:`write_run` writes every run folder through
    here). A full disk is one line naming the file
    (``runfolder.disk_full``)."""
    import pyarrow.parquet as pq
    import torch

    from .runfolder import disk_full

    table = metrics_table(res)
    out.mkdir(parents=True, exist_ok=True)
    writes = [("config.json", lambda: write_json(out / "config.json", config)),
              ("metrics.parquet", lambda: atomic_write(out / "metrics.parquet", lambda p: pq.write_table(table, p))),
              ("adapter.pt", lambda: atomic_write(out / "adapter.pt", lambda p: torch.save(params, p))),
              ("summary.json", lambda: write_json(out / "summary.json", summary))]
    for name, write in writes:
        with disk_full(out, name):
            write()
