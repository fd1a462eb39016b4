"""PNG plots for sweeps and runs (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported on first use: ~0.6 s; the ServerApp imports it
    early, while its rounds wait for replies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str = "", logx: bool = False) -> Path:
    """Shared styling and saving of every figure."""
    if logx:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on short log ranges overlap
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):  # `report` re-draws into a folder it finds
        from .errors import FedclipCacheError

        raise FedclipCacheError(f"{path}: cannot write the plot ({path.parent} is not a folder, or {path.name} is "
                                f"one); remove or rename it and re-run (or --no-plots)") from None
    finally:
        plt.close(fig)
    return path


def _label(c: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={c[k]}" for k in keys) or c["algo"]


def round_curve(metrics_path: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """Mean accuracy per round over seeds and held-out runs (held-out split for LODO, else clients' test)."""
    import pyarrow.parquet as pq

    df = pq.read_table(metrics_path, columns=["round", "split", "accuracy"]).to_pandas()
    split = "heldout" if (df["split"] == "heldout").any() else "test"
    if df[df["split"] == split]["round"].nunique() < df[df["split"] == "val"]["round"].nunique():
        split = "val"  # lazy evaluation scored test/held-out at a few rounds only (--curves scores all)
    g = df[df["split"] == split].groupby("round")["accuracy"].mean()
    return g.index.to_numpy(), g.to_numpy(), split


def sweep_plots(out: Path, results: dict) -> list[Path]:
    summary, curves, keys = results["summary"], results["curves"], results["keys"]
    if not summary:
        return []
    plt = pyplot()
    pdir = Path(out) / "plots"
    written = []

    # 1. adapter-size ablation: accuracy vs trainable parameters (log x), one line per algorithm
    fig, ax = plt.subplots(figsize=(6, 4))
    other = [k for k in keys if k not in ("hidden", "algo", "adapter")]
    lines: dict[str, list] = {}
    for rec in summary:
        name = rec["algo"] + (f" ({rec.get('adapter')})" if "adapter" in rec else "") + \
            "".join(f", {k}={rec[k]}" for k in other if k in rec)
        lines.setdefault(name, []).append((rec["params"], rec["avg"]["mean"], rec["avg"]["std"]))
    for name, pts in lines.items():
        pts.sort()
        x, y, e = map(np.array, zip(*pts))
        ax.errorbar(np.maximum(x, 1), 100 * y, yerr=100 * e, marker="o", capsize=3, label=name)
    written.append(_finish(plt, fig, ax, pdir / "accuracy_vs_params.png", "trainable (communicated) parameters",
                           "accuracy (%)", "accuracy vs adapter size (mean ± std over seeds)", logx=True))

    # 2. accuracy vs round
    fig, ax = plt.subplots(figsize=(6, 4))
    split = "test"
    for c in curves:
        m = Path(c["folder"]) / "metrics.parquet"
        if m.is_file():
            r, a, split = round_curve(m)
            ax.plot(r, 100 * a, label=_label(c, keys), lw=1.2)
    written.append(_finish(plt, fig, ax, pdir / "accuracy_vs_round.png", "round", f"{split} accuracy (%)",
                           "accuracy vs communication round"))

    # 3. communication cost vs accuracy
    table = results["table"].to_pandas()
    cost = table.groupby("point")["bytes_total"].first()
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in summary:
        b = float(cost.get(rec["point"], 0))
        ax.scatter(max(b, 1) / 2**20, 100 * rec["avg"]["mean"], label=_label(rec, keys))
    written.append(_finish(plt, fig, ax, pdir / "communication_vs_accuracy.png", "total bytes communicated (MiB)",
                           "accuracy (%)", "communication cost vs accuracy", logx=True))
    return written


def run_plots(run_dir: Path) -> list[Path]:
    """Accuracy-vs-round curves of one run, one line per experiment and split."""
    import pyarrow.parquet as pq

    plt = pyplot()
    df = pq.read_table(Path(run_dir) / "metrics.parquet").to_pandas()
    fig, ax = plt.subplots(figsize=(6, 4))
    val_rounds = df[df["split"] == "val"]["round"].nunique()
    for (exp, split), g in df.groupby(["experiment", "split"]):
        curve = g.groupby("round")["accuracy"].mean()
        if split == "val":
            ax.plot(curve.index, 100 * curve.to_numpy(), label=f"{exp} val (mean)", lw=0.8, ls="--")
        elif len(curve) == val_rounds:  # a full curve (--curves)
            ax.plot(curve.index, 100 * curve.to_numpy(), label=f"{exp} {split}", lw=1.2)
        else:  # lazy evaluation: scored when the best validation improved, and at the last round
            ax.plot(curve.index, 100 * curve.to_numpy(), label=f"{exp} {split} (scored rounds)", lw=0, marker=".")
    return [_finish(plt, fig, ax, Path(run_dir) / "plots" / "accuracy_vs_round.png", "round", "accuracy (%)")]
