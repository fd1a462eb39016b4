"""The run folder of a federated *deployment*: the same ``summary.json``, ``metrics.parquet``, ``config.json`` and
``adapter.pt`` as ``federate``, built on the server from what the sites report.

The server of a deployment holds no data. Each evaluated round every site scores the global adapter on its own
splits and reports (in its reply's config record) its accuracies and losses with their sizes (a training site:
validation and test; the held-out site: its whole domain) and the facts ``federate`` reads from a cache (dimension,
classes, model size, logit scale, cache identity). :class:`RunRecorder` turns those reports into the loop's result
type and writes through ``results.summarise`` and ``results.write_run``, so selection (best mean validation, first
best), the summary and the metrics table are computed by the same code as in-process; without ``--curves`` it keeps
test and held-out numbers only where the loop's lazy evaluation scores them (validation improved, or the last
round), so ``metrics.parquet`` has the same rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .config import FederateConfig
from .protocols import Client, Experiment, federation_name


@dataclass
class SiteCaches:
    """What ``summarise`` reads from a cache, as reported by the sites (the server has no cache)."""

    dim: int
    classes: list
    model_params: Optional[int]
    sites: dict = field(default_factory=dict)  # site -> its cache record (path, images, complete, identity)

    def record(self) -> dict:
        return {"sites": self.sites, "complete": all(s.get("complete", False) for s in self.sites.values())}


def client_key(site: str, facts: dict) -> tuple:
    """Sort key of a site in the order of the experiment's clients: a shared cache's partition index, which the site
    reports as ``order``; sites with their own caches (``order`` -1): by name, as the domains of one cache are
    ordered ("b#10" is client 10, not before "b#2")."""
    order = int(facts.get("order", -1))
    return (order < 0, order, site)


def lane_order(sites: list, reports: dict) -> list:
    """Training sites in the loop's lane order (``loop.client_lanes``: the experiment's clients (:func:`client_key`),
    then largest training split first, a stable sort): the server's sampling order, and the order in which a
    personal algorithm's segments are scored (one group per lane)."""
    ordered = sorted(sites, key=lambda s: client_key(s, reports[s]))
    return sorted(ordered, key=lambda s: -int(reports[s]["train_n"]))


@dataclass
class RunRecorder:
    cfg: FederateConfig
    out: Optional[Path]
    t0: float = field(default_factory=time.perf_counter)
    rounds: list = field(default_factory=list)  # round numbers evaluated
    reports: list = field(default_factory=list)  # per round: {site: metrics}
    health: list = field(default_factory=list)  # per round: results / failures of fit and evaluate
    info: Optional[SiteCaches] = None
    sampled: list = field(default_factory=list)  # per round: sites sampled to train (the loop's fit_clients)
    finetuned: Optional[dict] = None  # --finetune-steps: site -> test accuracy after fine-tuning (lane order)
    finetune_health: Optional[dict] = None  # --finetune-steps: the sites that answered and those that did not

    def fit_round(self, rnd: int, results: int, failures: int, sampled: Optional[int] = None,
                  wire: Optional[dict] = None) -> None:
        """Round ``rnd``'s training: adapters received, sampled sites that sent none, and (``wire``) the tensor
        bytes that crossed the wire (``tensor_bytes_down``: the round message's, each node; ``tensor_bytes_up``:
        the replies', summed)."""
        self.health.append({"round": rnd, "fit_results": results, "fit_failures": failures, **(wire or {})})
        self.sampled.append(results + failures if sampled is None else sampled)

    def evaluate_round(self, rnd: int, site_metrics: list[dict], failures: int) -> None:
        by_site = {m["client"]: m for m in site_metrics}
        self.rounds.append(rnd)
        self.reports.append(by_site)
        h = next((x for x in self.health if x["round"] == rnd), None)
        if h is None:
            h = {"round": rnd}
            self.health.append(h)
        h.update(evaluate_results=len(site_metrics), evaluate_failures=failures)
        for m in site_metrics:
            info = self.info or SiteCaches(int(m["dim"]), [None] * int(m["num_classes"]),
                                           int(m["model_params"]) or None)
            info.sites[m["client"]] = {"path": m["cache"], "images": int(m["images"]),
                                       "complete": bool(m["complete"]), "identity": m["identity"]}
            self.info = info

    def finetune_round(self, accuracies: dict, failures: list) -> None:
        """``--finetune-steps``: each training site's test accuracy after fine-tuning the selected adapter (a site
        with no test split, or that did not answer, has none: left out of the means, never imputed)."""
        self.finetuned = dict(accuracies)
        self.finetune_health = {"results": len(accuracies), "failures": list(failures)}

    def _last(self) -> dict:
        """Every site that ever reported, with its latest report (a site lost mid-run keeps its earlier rounds)."""
        last = {}
        for rep in self.reports:
            last.update(rep)
        return last

    def val_means(self) -> np.ndarray:
        """Per evaluated round, the mean validation accuracy over the training sites that reported it (NaN when
        none did; 0 when no site has a validation split): the curve the selection reads
        (``results.selected_round``)."""
        val_sites = self._val_sites()
        out = []
        for rep in self.reports:
            v = np.array([rep[s]["val_accuracy"] if s in rep else np.nan for s in val_sites], dtype=float)
            v = v[~np.isnan(v)]
            out.append(float(v.mean()) if len(v) else (float("nan") if val_sites else 0.0))
        return np.array(out, dtype=float)

    def selected(self) -> bool:
        """Whether the round evaluated last is the selected one so far (the global adapter to keep for
        ``--finetune-steps``)."""
        from .results import selected_round

        curve = self.val_means()
        if len(curve) and not self._val_sites():  # no validation data: the last round is the one reported
            return True  # (results.summarise), so --finetune-steps fine-tunes it
        return len(curve) > 0 and selected_round(curve) == len(curve) - 1

    def _val_sites(self) -> list:
        last = self._last()
        return [s for s in sorted(s for s, m in last.items() if not m["heldout"]) if last[s]["val_n"]]

    # ------------------------------------------------------------------------------------------ the result

    def result(self, final_params: dict, trainable: int):
        """A ``loop.LoopResult`` built from the reports: the clients every report agrees on, their segments in the
        in-process order (per client val, test; then the held-out domain), NaN where a site did not report."""
        from .algorithms import make_algorithm
        from .loop import LoopResult, finetune_notes, improves, segment

        last = self._last()
        train_sites = sorted(s for s, m in last.items() if not m["heldout"])
        held = [s for s, m in last.items() if m["heldout"]]
        heldout = held[0] if held else None
        cfg = self.cfg
        name = federation_name(cfg)  # as the sites and the Coordinator name it

        def rows(n: int) -> np.ndarray:
            return np.zeros(int(n), np.int64)  # summaries count rows; they never index them

        clients = [Client(s, rows(last[s]["train_n"]), rows(last[s]["val_n"]), rows(last[s]["test_n"]),
                          int(last[s]["dropped"])) for s in train_sites]
        exp = Experiment(name, cfg.seed, clients, heldout, rows(last[heldout]["n"]) if heldout else None)
        segments, keys = [], []
        algo = make_algorithm(cfg)
        for s in lane_order(train_sites, last) if algo.personal else train_sites:  # as the loop's Evaluator
            for split in ("val", "test"):
                if last[s][f"{split}_n"]:
                    segments.append(segment(exp, s, split, last[s][f"{split}_n"]))
                    keys.append((s, split))
        if heldout:
            segments.append(segment(exp, heldout, "heldout", last[heldout]["n"]))
            keys.append((heldout, "heldout"))
        acc = np.full((len(self.rounds), len(keys)), np.nan)
        loss = np.full_like(acc, np.nan)
        for r, rep in enumerate(self.reports):
            for k, (s, split) in enumerate(keys):
                if s in rep:
                    acc[r, k], loss[r, k] = rep[s][f"{split}_accuracy"], rep[s][f"{split}_loss"]
        val = [k for k, (_, split) in enumerate(keys) if split == "val"]
        val_mean = self.val_means().reshape(len(self.rounds), 1)
        if not cfg.curves:  # as the loop's lazy Evaluator: test/held-out kept where validation improved, and last
            best, rest = np.full(1, -np.inf), [k for k in range(len(keys)) if k not in val]
            has_val = np.array([bool(self._val_sites())])
            for r in range(len(self.rounds)):
                improved = improves(val_mean[r], best, has_val)
                best = np.where(improved, val_mean[r], best)
                if not improved.any() and r != len(self.rounds) - 1:
                    acc[r, rest] = loss[r, rest] = np.nan
        first = last[train_sites[0]] if train_sites else next(iter(last.values()))
        views = int(first.get("train_views", 1))  # --train-views as the sites resolved it
        finetuned = {name: dict(self.finetuned)} if self.finetuned is not None else None
        return LoopResult([exp], segments, list(self.rounds), acc, loss, trainable, time.perf_counter() - self.t0,
                          final_params, float(first["logit_scale"]), str(first["logit_scale_source"]), val_mean,
                          finetuned=finetuned, fit_clients=list(self.sampled) or [len(train_sites)] * len(self.rounds),
                          notes=finetune_notes(cfg, algo, views), train_views=views)

    def write(self, final_params: dict, trainable: int, ctx_shape: Optional[tuple] = None,
              communicated: Optional[int] = None) -> dict:
        """The summary (and, with ``out``, the run folder) of the deployment. ``ctx_shape``: the context's shape as
        the sites report it, for a personal prompt algorithm whose contexts stay at the sites (the server has none
        to read it from)."""
        from .results import summarise

        res = self.result(final_params, trainable)
        res.communicated_params = communicated if communicated and communicated != trainable else None
        summary = summarise(res, self.cfg, self.info)
        if ctx_shape and "prompt" in summary:
            summary["prompt"].update(n_ctx=int(ctx_shape[-2]), width=int(ctx_shape[-1]))
        summary["deployment"] = {"rounds": self.health,
                                 **({"finetune": self.finetune_health} if self.finetune_health is not None else {})}
        if self.out is not None:
            from .runfolder import RUN_OUTPUTS, begin, mark_complete, read_state
            from .results import write_run

            out = Path(self.out)
            if (read_state(out) or {}).get("state") != "in-progress":  # `deploy` claimed it already; a ServerApp
                begin(out, "deploy")  # run by hand (`flwr run`) marks it itself
            write_run(out, None, self.cfg, res, summary, [self.cfg.seed], sites=self.info.sites)
            mark_complete(out, "deploy", RUN_OUTPUTS)
        return summary
