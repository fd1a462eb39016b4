"""Experiment tracking (``--log tensorboard,mlflow,wandb``): a finished run folder sent to the trackers researchers
already follow their runs in.

One source of truth: every number a tracker receives is read back from the run folder just written
(``metrics.parquet``, ``summary.json``, ``config.json``), after the folder is complete, so the trackers hold exactly
what the folder holds and a tracker that fails (a backend raising, a server gone) never costs the run folder: it is
warned about once and skipped (:class:`Tracker`). One tracked run per experiment (held-out domain x seed), named
``experiment`` (a sweep point: ``POINT/experiment``), grouped by the run folder's name; a sweep point is tagged with
its grid values.

What each tracked run holds (metric names are the same in every backend):

- per evaluated round (the step is the round): ``{split}/acc/{client}`` and ``{split}/loss/{client}`` for split
  val, test and heldout (the rows of ``metrics.parquet``), their means ``{split}/acc_mean`` and
  ``{split}/loss_mean``, and ``comm/bytes``: bytes communicated up to that round (``summary.json``'s
  communication: up + down per round, plus the prototype sums sent once);
- the configuration (``config.json``'s federate options, and the experiment's seed and held-out domain) as
  hyper-parameters;
- the selected (``best/...``) and last (``last/...``) round's numbers of ``summary.json`` as summary metrics, with
  ``comm/bytes_total`` and ``trainable_params``;
- ``summary.json``, ``config.json`` and ``plots/*.png`` as artifacts.

Backends import their library lazily; :func:`check_available` refuses a missing one in one line naming the extra,
before any run starts (it only looks the package up). Where they write: TensorBoard ``RUN/tb/NAME/`` (torch's
``SummaryWriter``); MLflow ``sqlite:///RUN/mlflow.db`` with artifacts in ``RUN/mlartifacts/`` (MLflow 3.17 refuses
its file store, ``./mlruns``, unless ``MLFLOW_ALLOW_FILE_STORE`` is set: SQLite is its supported local store), or
``--mlflow-uri``; W&B ``RUN/wandb/offline-run-*`` (offline unless the user is logged in, see :func:`wandb_mode`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..options import named

TRACKERS = ("tensorboard", "mlflow", "wandb")
# tracker -> (the package it needs, the extra that installs it)
_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
SPLITS = ("val", "test", "heldout")
WANDB_PROJECT = "fedclip-cache"  # W&B project of every tracked run (WANDB_PROJECT overrides it)


def parse_log(text: Optional[str], label: str = "--log") -> tuple[str, ...]:
    """The trackers ``--log`` names (comma-separated, any subset of :data:`TRACKERS`; "" or None: none), in the
    order given, each once; an unknown name is a one-line ConfigError."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise ConfigError(f"{named(label)} {text!r}: unknown tracker {bad[0]!r}; choose any of {','.join(TRACKERS)} "
                          f"(comma-separated)")
    return tuple(dict.fromkeys(names))


def check_available(text: Optional[str], label: str = "--log") -> tuple[str, ...]:
    """:func:`parse_log`, and a one-line ConfigError naming the extra of a tracker whose package is not installed
    (looked up, not imported: a check before the run starts costs nothing)."""
    names = parse_log(text, label)
    for n in names:
        package, extra = _NEEDS[n]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{named(label)} {n}: the {package} package is not installed; pip install "
                              f"'fedclip-cache[{extra}]' (or 'fedclip-cache[tracking]' for all three)")
    return names


def wandb_mode() -> str:
    """W&B's mode: ``WANDB_MODE`` when set; else online when the user is logged in (``WANDB_API_KEY`` set, or
    ``wandb login``'s entry for the W&B host in ~/.netrc), else offline (``wandb sync RUN/wandb/offline-run-*``
    uploads later). Decided without any network call."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


@dataclass
class RunInfo:
    """One tracked run: its name, group (the run folder's name), tags (a sweep point's grid values, the experiment)
    and configuration (the hyper-parameters)."""

    name: str
    group: str
    tags: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- backends

class Backend:
    """The interface every tracker implements; ``root`` is the folder its files go to (the run folder)."""

    name = ""

    def __init__(self, root: Path, mlflow_uri: Optional[str] = None):
        self.root = Path(root)

    def warm(self) -> None:
        """Import the library (and open the store) ahead of time: :meth:`Tracker.warm` runs it while the run
        trains."""

    def open(self, info: RunInfo) -> None: ...

    def log_round(self, rnd: int, metrics: dict) -> None: ...

    def log_summary(self, metrics: dict) -> None: ...

    def log_artifacts(self, files: list, base: Path) -> None: ...

    def close(self) -> None: ...


def _flat(config: dict) -> dict:
    """Hyper-parameters as scalars every tracker takes (lists and None as text)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.items()}


def safe_name(name: str) -> str:
    """A run name as a relative path (TensorBoard's folder): each part made of safe characters, no ``..``."""
    parts = [re.sub(r"[^\w=.,+-]", "_", p).lstrip(".") or "_" for p in name.split("/")]
    return "/".join(parts)


class TensorBoard(Backend):
    """Event files under ``RUN/tb/NAME/`` (an earlier run's of that name are replaced); the configuration and the
    summary metrics as TensorBoard's hparams of the run (its HPARAMS view compares the runs)."""

    name = "tensorboard"

    def warm(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    def open(self, info: RunInfo) -> None:
        import shutil

        from torch.utils.tensorboard import SummaryWriter

        self.info = info
        logdir = self.root / "tb" / safe_name(info.name)
        shutil.rmtree(logdir, ignore_errors=True)  # ours: a rerun of this folder replaces its events
        self.writer = SummaryWriter(str(logdir))
        self.writer.add_text("config", "```\n" + json.dumps(info.config, indent=1, default=str) + "\n```")

    def log_round(self, rnd: int, metrics: dict) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, rnd)

    def log_summary(self, metrics: dict) -> None:
        hp = _flat({**self.info.config, **{f"tag/{k}": v for k, v in self.info.tags.items()}})
        self.writer.add_hparams(hp, dict(metrics), run_name=".")  # "." : in this run's own folder

    def log_artifacts(self, files: list, base: Path) -> None:
        for f in files:
            if f.suffix == ".json":
                self.writer.add_text(str(f.relative_to(base)), "```\n" + f.read_text() + "\n```")

    def close(self) -> None:
        self.writer.close()


class Mlflow(Backend):
    """An MLflow run per experiment in the experiment named after the group; the store is ``--mlflow-uri`` or the
    run folder's ``sqlite:///RUN/mlflow.db`` (artifacts in ``RUN/mlartifacts``). Metrics are sent in batches."""

    name = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch
    PARAMS = 100  # and of params

    def __init__(self, root: Path, mlflow_uri: Optional[str] = None):
        super().__init__(root)
        self.uri = mlflow_uri or f"sqlite:///{self.root.resolve() / 'mlflow.db'}"
        self.local = not mlflow_uri
        self.client = None

    def warm(self) -> None:
        if self.client is None:
            self.client = self._client()

    def open(self, info: RunInfo) -> None:
        from mlflow.entities import Param

        self.warm()
        exp = self.client.get_experiment_by_name(info.group)
        if exp is None:
            where = (self.root / "mlartifacts").resolve().as_uri() if self.local else None
            eid = self.client.create_experiment(info.group, artifact_location=where)
        else:
            eid = exp.experiment_id
        tags = {k: str(v) for k, v in info.tags.items()}
        self.run = self.client.create_run(eid, run_name=info.name, tags={**tags, "group": info.group})
        self.pending = []
        params = [Param(k, str(v)[:6000]) for k, v in _flat(info.config).items()]
        for i in range(0, len(params), self.PARAMS):
            self.client.log_batch(self.run.info.run_id, params=params[i:i + self.PARAMS])

    def _client(self):
        if self.local:
            self.root.mkdir(parents=True, exist_ok=True)
        # no usage statistics sent by MLflow (as `simulate` switches off Ray's and Flower's); the user's own
        # MLFLOW_DISABLE_TELEMETRY wins
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if not self.local:  # a server: MLflow's defaults (7 retries, 120 s each) wait ~4 min on an unreachable
            # one after the run is complete; fail within ~30 s instead (the user's own settings win)
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SQLAlchemy's deprecation of a loader MLflow 3.17 uses
            from mlflow.tracking import MlflowClient  # (importing mlflow sets up its loggers: quieted after)

            logging.getLogger("alembic").setLevel(logging.WARNING)  # the SQLite store's schema set-up, at INFO
            logging.getLogger("mlflow").setLevel(logging.WARNING)
            client = MlflowClient(tracking_uri=self.uri)
            client.search_experiments(max_results=1)  # opens (and, new, creates) the store now
        return client

    def log_round(self, rnd: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(k, float(v), 0, rnd) for k, v in metrics.items()]
        if len(self.pending) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:self.BATCH], self.pending[self.BATCH:]
            self.client.log_batch(self.run.info.run_id, metrics=batch)

    def log_summary(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        self.pending += [Metric(f"summary/{k}", float(v), 0, 0) for k, v in metrics.items()]
        self._flush()

    def log_artifacts(self, files: list, base: Path) -> None:
        for f in files:
            sub = str(f.parent.relative_to(base))
            self.client.log_artifact(self.run.info.run_id, str(f), None if sub == "." else sub)

    def close(self) -> None:
        self._flush()
        self.client.set_terminated(self.run.info.run_id)


class Wandb(Backend):
    """A W&B run per experiment in project :data:`WANDB_PROJECT`, grouped by the run folder's name, its tags the
    grid values (``key=value``); files under ``RUN/wandb/`` (offline unless logged in: :func:`wandb_mode`)."""

    name = "wandb"

    def warm(self) -> None:
        import wandb

        wandb.setup()  # W&B's service process, started once per process

    def open(self, info: RunInfo) -> None:
        import wandb

        tags = [f"{k}={v}"[:64] for k, v in info.tags.items()]  # W&B's limit: 64 characters a tag
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), group=info.group,
                              name=info.name, config=info.config, tags=tags, dir=str(self.root), mode=wandb_mode(),
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def log_round(self, rnd: int, metrics: dict) -> None:
        self.run.log(dict(metrics), step=rnd)

    def log_summary(self, metrics: dict) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in metrics.items()})

    def log_artifacts(self, files: list, base: Path) -> None:
        for f in files:
            self.run.save(str(f), base_path=str(base), policy="now")

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": Mlflow, "wandb": Wandb}


class Tracker:
    """The trackers of one run folder (or sweep folder) behind the backends' one interface. A backend that raises
    is warned about once (on stderr) and dropped; the others go on, and the run folder is never touched."""

    def __init__(self, names, root: Path, mlflow_uri: Optional[str] = None):
        self.backends = [BACKENDS[n](Path(root), mlflow_uri) for n in names]
        self.failed: dict = {}  # tracker -> what it raised
        self._warming = None

    def warm(self) -> "Tracker":
        """Import the trackers' libraries and open MLflow's store in a background thread, while the run trains
        (a few seconds of imports and MLflow's schema set-up otherwise added after the run); the first call that
        sends anything waits for it."""
        import threading

        self._warming = threading.Thread(target=self._each, args=("warm",), name="tracking-warm", daemon=True)
        self._warming.start()
        return self

    def _ready(self) -> None:
        if self._warming is not None:
            self._warming.join()
            self._warming = None

    def _each(self, method: str, *args) -> None:
        for b in list(self.backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # noqa: BLE001  (a tracker never costs the run)
                self.backends.remove(b)
                if method != "close":
                    with contextlib.suppress(Exception):  # its run ended (a W&B run's process stopped)
                        b.close()
                self.failed[b.name] = f"{type(e).__name__}: {e}"
                print(f"warning: --log {b.name}: {method} failed ({type(e).__name__}: {str(e)[:200]}); the run "
                      f"folder is complete, {b.name} gets nothing more from this run", file=sys.stderr)

    def open(self, info: RunInfo) -> None:
        self._ready()
        self._each("open", info)

    def log_round(self, rnd: int, metrics: dict) -> None:
        self._each("log_round", rnd, metrics)

    def log_summary(self, metrics: dict) -> None:
        self._each("log_summary", metrics)

    def log_artifacts(self, files: list, base: Path) -> None:
        self._each("log_artifacts", files, base)

    def close(self) -> None:
        self._each("close")


# ---------------------------------------------------------------------------------- what a run folder holds

def round_metrics(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Per round, the numbers of one experiment's ``metrics.parquet`` rows: accuracy and loss per client and split
    and their means over the clients scored that round."""
    out: dict[int, dict[str, float]] = {}
    by: dict = {}
    for r in rows:
        m = out.setdefault(int(r["round"]), {})
        for what in ("acc", "loss"):
            v = r["accuracy" if what == "acc" else "loss"]
            if v is not None and not math.isnan(v):
                m[f"{r['split']}/{what}/{r['client']}"] = float(v)
                by.setdefault((int(r["round"]), r["split"], what), []).append(float(v))
    for (rnd, split, what), vs in by.items():
        out[rnd][f"{split}/{what}_mean"] = sum(vs) / len(vs)
    return out


def summary_metrics(exp: dict, communication: dict) -> dict[str, float]:
    """The selected (``best``) and last round's numbers of one experiment of ``summary.json``, flattened, with the
    run's communication and size."""
    out = {}
    for which in ("best", "last"):
        for k, v in exp[which].items():
            if isinstance(v, dict):
                out.update({f"{which}/{k}/{c}": float(x) for c, x in v.items() if x is not None})
            elif v is not None:
                out[f"{which}/{k}"] = float(v)
    out["comm/bytes_total"] = float(communication["bytes_total"])
    out["trainable_params"] = float(communication["trainable_params"])
    return out


def bytes_at(communication: dict, rnd: int) -> float:
    """Bytes communicated up to round ``rnd`` (``summary.json``'s communication: what ``bytes_total`` counts)."""
    c = communication
    return float((c["bytes_up_per_round"] + c["bytes_down_per_round"]) * rnd + c["prototype_bytes_once"])


def artifacts(folder: Path) -> list[Path]:
    """The files a tracked run keeps: ``summary.json``, ``config.json`` and the plots."""
    return [f for f in (folder / "summary.json", folder / "config.json") if f.is_file()] + \
        sorted((folder / "plots").glob("*.png"))


def track_folder(tracker: Tracker, folder: Path, group: str, prefix: str = "", tags: Optional[dict] = None) -> int:
    """Send one finished run folder (``federate``'s, a deployment's or a sweep point's) to ``tracker``: one tracked
    run per experiment, named ``prefix + experiment``. Returns the number of tracked runs."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    fed = {k: v for k, v in config.get("federate", {}).items() if k not in TRACKING_FIELDS}
    table = pq.read_table(folder / "metrics.parquet")
    comm, files = summary["communication"], artifacts(folder)
    for exp in summary["experiments"]:
        rows = table.filter(pc.equal(table["experiment"], exp["experiment"])).to_pylist()
        hp = {**fed, "seed": exp["seed"], "heldout": exp["heldout"] or ""}
        tracker.open(RunInfo(prefix + exp["experiment"], group,
                             {**(tags or {}), "experiment": exp["experiment"]}, hp))
        for rnd, metrics in sorted(round_metrics(rows).items()):
            tracker.log_round(rnd, {**metrics, "comm/bytes": bytes_at(comm, rnd)})
        tracker.log_summary(summary_metrics(exp, comm))
        tracker.log_artifacts(files, folder)
        tracker.close()
    return len(summary["experiments"])


# The FederateConfig fields of tracking: where a run's numbers are also sent, never what the run is (left out of a
# sweep point's id and of the hyper-parameters sent)
TRACKING_FIELDS = ("log", "mlflow_uri")


def start_tracking(folder: Path, log: Optional[str], mlflow_uri: Optional[str] = None) -> Optional[Tracker]:
    """The trackers of run folder ``folder``, warming up (:meth:`Tracker.warm`) while the run trains; None when
    ``log`` names none. Send the finished folder with :func:`track_run` (``tracker=``)."""
    names = parse_log(log)
    return Tracker(names, folder, mlflow_uri).warm() if names else None


def track_run(folder: Path, log: Optional[str], mlflow_uri: Optional[str] = None,
              tracker: Optional[Tracker] = None) -> Optional[Tracker]:
    """``federate -o RUN --log ...`` and a deployment's ServerApp: the finished run folder ``RUN`` to its trackers
    (``tracker``: those :func:`start_tracking` warmed), grouped by the folder's name (None when ``log`` names
    none)."""
    tracker = tracker or (Tracker(parse_log(log), folder, mlflow_uri) if parse_log(log) else None)
    if tracker is not None:
        track_folder(tracker, folder, Path(folder).resolve().name)
    return tracker
