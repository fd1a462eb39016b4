"""Rendering: turn caches, runs and sweeps into rich tables (terminal) and plain data (JSON/Markdown/CSV)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rich.markup import escape

from .cache.reader import CacheOverview, FeatureCache
from .cache.store import display_text


def cache_summary(c: "FeatureCache | CacheOverview") -> dict:
    m = c.meta
    model = m.get("model") or {}
    return {
        "path": str(c.path),
        "source": ((m.get("runs") or [{}])[-1]).get("source"),  # the last extract's (hf:NAME, a path, a pattern)
        "format": m["format"],
        "model": model.get("name"),
        "pretrained": model.get("pretrained"),
        "weights": model.get("weights") or {},
        "model_params": model.get("num_params"),
        "activation": model.get("activation") or (m.get("fingerprint") or {}).get("activation"),
        "open_clip_version": model.get("open_clip_version"),
        "torch_version": model.get("torch_version"),
        "preprocess": m.get("preprocess") or {},
        "precision": m.get("precision"),
        "dtype": m.get("dtype"),
        "normalised": m.get("normalised", False),
        "views": int((m.get("views") or {}).get("count", 1)),
        "augment": _views_text(m.get("views")),
        "images": len(c),
        "dim": c.dim,
        "classes": c.classes,
        "templates": c.templates,
        "domains": c.domain_names,
        "clients": c.client_names,
        "counts": c.counts(),
        "complete": c.complete,
        "incomplete_reason": c.incomplete_reason,
        "shards": len(m.get("shards") or {}),
        "skipped": c.skipped,
        "retired": {"count": m.get("retired", {}).get("count", 0),
                    "paths": [display_text(p) for p in m.get("retired", {}).get("paths", [])]},
        "ignored": [{"path": display_text(p), "reason": r} for p, r in m.get("ignored", [])],
        "created": m.get("created"),
        "updated": m.get("updated"),
    }


def _views_text(v: dict | None) -> dict | None:
    """The views' provenance as ``info`` shows it (None for a single-view cache)."""
    if not v or int(v.get("count", 1)) < 2:
        return None
    from .cache.views import recipe_text

    return {"recipe": recipe_text(v["augment"]), "seed": v.get("seed"), "size": v.get("size"),
            "interpolation": v.get("interpolation"), "steps": v["augment"]}


def render_cache_summary(s: dict, console: Console) -> None:
    p = s["preprocess"]
    state = "complete" if s["complete"] else f"[bold red]INCOMPLETE[/] ({escape(s['incomplete_reason'])})"
    console.print(f"[bold]{escape(s['path'])}[/] ({s['format']}, {s['dtype']}, raw features, D={s['dim']}; {state}, "
                  f"{s['shards']} shard(s))")
    console.print(f"model {s['model']} / {s['pretrained'] or s['weights'].get('kind')} "
                  f"({s['model_params'] or 0:,} params, {s['activation'] or 'activation unrecorded'}; open_clip {s['open_clip_version']}, torch {s['torch_version']})")
    console.print(f"preprocess size={p.get('size')} resize={p.get('resize_mode')} interp={p.get('interpolation')} "
                  f"mean={p.get('mean')} std={p.get('std')}; precision {s['precision']}")
    if s.get("augment"):
        a = s["augment"]
        console.print(f"views: {s['views']} per image (view 0 = the preprocessing above; views 1..{s['views'] - 1} "
                      f"augmented: {a['recipe']}, seed {a['seed']}, size {a['size']}, {a['interpolation']})")
    else:
        console.print("views: 1 per image (the deterministic preprocessing above)")
    console.print(f"templates: {s['templates']}")
    if s.get("source"):
        console.print(f"source: {escape(s['source'])}", soft_wrap=True)
    t = Table(title=f"{s['images']:,} images · {len(s['domains'])} domains × {len(s['classes'])} classes")
    t.add_column("class")
    for d in s["domains"]:
        t.add_column(d, justify="right")
    t.add_column("total", justify="right")
    for cl in s["classes"]:
        row = [s["counts"][d][cl] for d in s["domains"]]
        t.add_row(cl, *map(str, row), str(sum(row)))
    totals = [sum(s["counts"][d].values()) for d in s["domains"]]
    t.add_row("[bold]total", *map(str, totals), str(sum(totals)))
    console.print(t)
    if s["skipped"]:
        st = Table(title=f"{len(s['skipped'])} skipped file(s)")
        st.add_column("file"), st.add_column("reason")
        st.add_column("retried")
        for r in s["skipped"]:
            st.add_row(escape(r["path"]), escape(r["reason"]),
                       {"transient": "next run", "scan": "every scan"}.get(r["kind"], "when the file changes"))
        console.print(st)
    if s["retired"]["count"]:
        console.print(f"{s['retired']['count']} image(s) retired by the last extract (deleted or moved on disk; no "
                      f"longer served): " + escape(", ".join(s["retired"]["paths"][:10])) +
                      (" …" if s["retired"]["count"] > 10 else ""), soft_wrap=True)
    if s["ignored"]:
        console.print(f"{len(s['ignored'])} ignored non-image file(s): " +
                      escape(", ".join(r["path"] for r in s["ignored"][:10])) + (" …" if len(s["ignored"]) > 10 else ""))


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


# --base-to-novel: the columns beside held-out / test (which are then the base classes'), and the summary's keys
NOVEL_COLUMNS = (("held-out novel", "heldout_novel", "heldout_novel_best"), ("held-out HM", "heldout_hm",
                 "heldout_hm_best"), ("test novel", "test_novel_mean", "test_novel_mean_best"),
                 ("test HM", "test_hm", "test_hm_best"))


def novel_columns(s: dict) -> tuple:
    """The base-to-novel columns a run summary's tables add (none without --base-to-novel)."""
    return NOVEL_COLUMNS if s.get("base_to_novel") else ()


def render_run_summary(s: dict, console: Console) -> None:
    comm = s["communication"]
    console.print(f"[bold]{s['algo']}[/] adapter={s['adapter']} hidden={s['hidden'] or 'default'} head={s['head']} "
                  f"loss={s['loss']} protocol={s['protocol']} rounds={s['rounds']} ({s['seconds']:.1f}s)")
    ratio = f", full model / adapter = {comm['full_model_over_adapter']}×" if comm["full_model_over_adapter"] else ""
    console.print(f"trainable parameters {comm['trainable_params']:,}{ratio}; "
                  f"{comm['bytes_up_per_round']:,} B up + {comm['bytes_down_per_round']:,} B down per round, "
                  f"{comm['bytes_total']:,} B in total", soft_wrap=True)
    if s.get("shots") or s.get("base_to_novel"):
        b2n = s.get("base_to_novel")
        console.print(f"protocols: shots={s.get('shots') or 'all'}" + (
            f"; base-to-novel: {len(b2n['base_classes'])} base / {len(b2n['novel_classes'])} novel classes "
            f"(held-out and test columns: base classes; HM = harmonic mean)" if b2n else ""), soft_wrap=True)
    novel = novel_columns(s)
    tuned = "test_mean_finetuned" in s["mean"]  # --finetune-steps: personalised accuracy beside the global one
    t = Table(title="accuracy (%) at the selected round (best mean validation) / last round")
    for col in ("experiment", "best round", "held-out", "clients' test (mean)") + \
            (("test, fine-tuned",) if tuned else ()) + tuple(c[0] for c in novel) + ("held-out (last)", "test (last)"):
        t.add_column(col, justify="right" if col != "experiment" else "left")
    for e in s["experiments"]:
        t.add_row(e["experiment"], str(e["best"]["round"]), _pct(e["best"]["heldout"]), _pct(e["best"]["test_mean"]),
                  *((_pct(e["best"].get("test_mean_finetuned")),) if tuned else ()),
                  *(_pct(e["best"].get(c[1])) for c in novel), _pct(e["last"]["heldout"]), _pct(e["last"]["test_mean"]))
    m = s["mean"]
    t.add_row("[bold]mean", "", _pct(m["heldout_best"]), _pct(m["test_mean_best"]),
              *((_pct(m["test_mean_finetuned"]),) if tuned else ()), *(_pct(m.get(c[2])) for c in novel),
              _pct(m["heldout_last"]),
              _pct(m["test_mean_last"]))
    console.print(t)
    for note in s.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


def render_sweep(res: dict, console: Console) -> None:
    from .sweep import summary_rows

    cols, rows = summary_rows(res["summary"])
    t = Table(title="accuracy (%) mean ± std over seeds at the selected round")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    console.print(t)


def report_path(path, fmt: str, plots: bool, console: Console, partial: bool = False) -> None:
    """Re-render a run folder or a sweep folder from what is on disk. Only what its run completed is rendered: an
    incomplete, mixed or busy folder is a one-line error (``runfolder.check_readable``); a sweep with points still
    to do says "k of n points" and is refused unless ``partial``."""
    from pathlib import Path

    from .federated.runfolder import folder_kind
    from .cache.store import CacheError

    path = Path(path)
    if fmt not in ("table", "md", "csv", "json"):
        raise CacheError(f"--format {fmt!r} unknown; use table, md, csv or json")
    kind = folder_kind(path)  # its state.json's kind, else what its files say
    if kind == "sweep":
        return _report_sweep(path, fmt, plots, console, partial)
    if kind in ("federate", "deploy"):
        return _report_run(path, kind, fmt, plots, console)
    if kind == "pipeline":
        raise CacheError(f"{path}: a pipeline (`run`) output folder; report its federate/ or sweep/ folder")
    raise CacheError(f"{path}: neither a run folder (summary.json) nor a sweep folder (sweep.json)")


def _report_sweep(path, fmt: str, plots: bool, console: Console, partial: bool) -> None:
    import json

    from .federated.runfolder import disk_full
    from .plots import sweep_plots
    from .sweep import collect, summary_csv, summary_rows

    notes = sweep_notes(path, partial)
    res = collect(path)
    if plots:
        with disk_full(path, "plots"):
            sweep_plots(path, res)
    cols, rows = summary_rows(res["summary"])
    _notes(notes, fmt, console)
    if fmt == "table":
        render_sweep(res, console)
    elif fmt == "md":
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    elif fmt == "csv":
        print(summary_csv(res), end="")
    else:
        print(json.dumps(res["summary"], indent=2))


def _report_run(path, kind: str, fmt: str, plots: bool, console: Console) -> None:
    import json

    from .federated.runfolder import check_readable, disk_full

    notes = check_readable(path, kind)
    s = json.loads((path / "summary.json").read_text())
    if plots and (path / "metrics.parquet").is_file():
        from .plots import run_plots

        with disk_full(path, "plots"):
            run_plots(path)
    _notes(notes, fmt, console)
    if fmt == "table":
        render_run_summary(s, console)
    elif fmt == "json":
        print(json.dumps(s, indent=2))
    else:
        sep = "," if fmt == "csv" else " | "
        novel = [c[1] for c in novel_columns(s)]
        head = ["experiment", "best_round", "heldout", "test_mean", *novel, "heldout_last", "test_mean_last"]
        lines = [sep.join(head)] + ([] if fmt == "csv" else ["|".join(["---"] * len(head))])
        for e in s["experiments"]:
            vals = [e["experiment"], e["best"]["round"], _pct(e["best"]["heldout"]), _pct(e["best"]["test_mean"]),
                    *(_pct(e["best"].get(k)) for k in novel), _pct(e["last"]["heldout"]), _pct(e["last"]["test_mean"])]
            lines.append(sep.join(map(str, vals)))
        if fmt == "md":
            lines = ["| " + ln + " |" for ln in lines]
        print("\n".join(lines))


def sweep_notes(path, partial: bool) -> list[str]:
    """What a report of the sweep folder ``path`` must say first: "k of n points" when some are not finished (a
    one-line error unless ``partial``; none finished: always an error)."""
    from .cache.integrity import describe_holder, writer_active
    from .federated.runfolder import RunFolderError, read_state
    from .sweep import status

    if not (path / "sweep.json").is_file():
        raise RunFolderError(f"{path}: a sweep folder without sweep.json (the sweep stopped before recording "
                             f"itself); re-run the sweep command")
    st = status(path)
    k, n = len(st["done"]), len(st["points"])
    holder = writer_active(path)
    running = f"; a sweep is running on it now ({describe_holder(holder)})" if holder else ""
    other = f"; {len(st['other'])} more trained on another commit of the cache, not shown" if st["other"] else ""
    if k == 0:
        raise RunFolderError(f"{path}: no point of this sweep has finished (0 of {n} points){running}{other}; "
                             f"run the sweep command to train them")
    state = read_state(path) or {}
    if k < n:
        msg = f"PARTIAL sweep: {k} of {n} points finished{running}{other}"
        if not partial:
            raise RunFolderError(f"{path}: {msg}; re-run the same sweep command to finish it, or pass --partial to "
                                 f"report the {k} finished points")
        return [msg]
    if state.get("state") not in (None, "complete"):  # every point done; its tables were not rewritten yet
        return [f"all {n} points finished, but the sweep that trained them did not finish writing its tables"
                f"{running}: shown from the points"]
    return []


def _notes(notes: list[str], fmt: str, console: Console) -> None:
    """Warnings above a report: in the table, on stderr for md/csv/json (their stdout stays parseable)."""
    import sys

    for n in notes:
        if fmt == "table":
            console.print(f"[bold red]warning:[/] {escape(n)}", soft_wrap=True)
        else:
            print(f"warning: {n}", file=sys.stderr)
