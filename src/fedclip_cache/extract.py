"""Runner of the extract stage: reader (sources) -> mapper (imageio + frozen CLIP) -> writer (store).

Run it in one process, or under ``torchrun --nproc-per-node N -m fedclip_cache extract ...``: every rank scans the
same dataset, takes every N-th image still to do, and commits its own shards; rank 0 owns the metadata and the
text embeddings. The reader orders rows canonically, so the cache equals a single-process one.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import store
from .imageio import ImageFiles
from .models import LoadedModel, ModelSpec, load_model
from .sources import ImageTable, scan

DEFAULT_TEMPLATES = ("a picture of a {}",)  # the official FedCLIP prompt: 'a picture of a' + ' ' + classname
FORMAT_VERSION = 1


class ExtractError(RuntimeError):
    """Extraction cannot go on; the message says why and how to fix it."""


@dataclass
class ExtractConfig:
    source: str
    out: str
    model: ModelSpec = field(default_factory=ModelSpec)
    format: str = "parquet"
    device: str = "auto"
    precision: str = "auto"  # fp16 autocast on CUDA, fp32 on CPU
    dtype: str = "float32"
    batch_size: int = 64
    workers: Optional[int] = None
    shard_size: int = 4096
    templates: Sequence[str] = DEFAULT_TEMPLATES
    strict: bool = False
    progress: bool = True
    dataset: Optional[str] = None  # known dataset to check the layout against (None: identify by domain names)


@dataclass
class ExtractReport:
    cache: str
    scanned: int
    already_cached: int
    changed: int
    embedded: int
    skipped: list[tuple[str, str]]
    ignored: list[tuple[str, str]]
    seconds: float
    total_images: int
    total_skipped: int
    warnings: list[str] = field(default_factory=list)
    loop_seconds: float = 0.0  # decode + encode + write only (no scan / model load): the steady-state rate

    @property
    def images_per_s(self) -> float:
        return (self.embedded + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- helpers

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("FEDCLIP_DIST_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _broadcast(obj, world: int):
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(lm: LoadedModel, cfg: ExtractConfig) -> dict:
    return {**lm.fingerprint(), "precision": cfg.precision, "dtype": cfg.dtype, "normalised": False}


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: cache has {a!r}, this run has {b!r}")
    return out


def check_compatible(cache: Path, meta: dict, fp: dict, fmt: str) -> None:
    if meta.get("format") != fmt:
        raise ExtractError(f"{cache}: cache is {meta.get('format')}, this run asks for --format {fmt}; "
                           f"use --format {meta.get('format')} or a new output folder")
    old_act = meta.get("fingerprint", {}).get("activation")
    if old_act != fp.get("activation"):
        made = f"with activation {old_act!r}" if old_act else "before the activation was recorded"
        raise ExtractError(
            f"{cache}: the cached features were made with a different activation ({made}; this run builds "
            f"{fp.get('activation')!r}), so they are not comparable; re-extract into a new output folder")
    diff = _diff(meta.get("fingerprint", {}), fp)
    if diff:
        raise ExtractError(f"{cache}: built with a different model/preprocessing ({'; '.join(diff[:3])}); "
                           f"features would be mixed, so write to a new output folder")


@torch.inference_mode()
def encode_text(lm: LoadedModel, templates: Sequence[str], classes: Sequence[str], device, precision) -> np.ndarray:
    """Raw ``encode_text`` for every (template, class): shape (T, C, D), float32."""
    prompts = [t.format(c) for t in templates for c in classes]
    out = []
    with autocast_for(device, precision):
        for i in range(0, len(prompts), 256):
            tokens = lm.tokenizer(prompts[i:i + 256]).to(device)
            out.append(lm.model.encode_text(tokens).float().cpu())
    emb = torch.cat(out).numpy()
    return emb.reshape(len(templates), len(classes), -1)


def _input_size(lm: LoadedModel) -> tuple[int, int]:
    s = lm.preprocess_cfg.get("size", 224)
    return tuple(s) if isinstance(s, (list, tuple)) else (s, s)


def _meta_record(lm: LoadedModel, cfg: ExtractConfig, fp: dict, dim: int) -> dict:
    import open_clip

    return {
        "format_version": FORMAT_VERSION,
        "format": cfg.format,
        "dtype": cfg.dtype,
        "normalised": False,
        "embedding_dim": dim,
        "fingerprint": fp,
        "model": {"name": lm.spec.model, "pretrained": lm.spec.pretrained, "weights": lm.weights,
                  "num_params": lm.num_params, "logit_scale": lm.logit_scale,
                  "activation": lm.activation, "activation_source": lm.activation_source,
                  "open_clip_version": open_clip.__version__, "torch_version": torch.__version__},
        "preprocess": lm.preprocess_cfg,
        "precision": cfg.precision,
        "created": _now(),
        "runs": [],
    }


# --------------------------------------------------------------------------------------------- the run

def _plan(table: ImageTable, index: dict) -> tuple[np.ndarray, int, int]:
    """Rows of ``table`` still to extract: new ids, plus files whose size or mtime changed."""
    ids = table.ids
    known = dict(zip(index["id"].tolist(), zip(index["size"].tolist(), index["mtime_ns"].tolist())))
    todo, changed = [], 0
    for i, (iid, sz, mt) in enumerate(zip(ids, table.size.tolist(), table.mtime_ns.tolist())):
        prev = known.get(iid)
        if prev is None:
            todo.append(i)
        elif prev != (sz, mt):
            todo.append(i)
            changed += 1
    return np.array(todo, np.int64), len(table) - len(todo), changed


def extract(cfg: ExtractConfig) -> ExtractReport:
    """Embed every image of ``cfg.source`` not yet in ``cfg.out``; see the module docstring."""
    if cfg.format not in store.FORMATS:
        raise ExtractError(f"--format {cfg.format!r} unknown; use parquet or hdf5")
    if cfg.dtype not in ("float32", "float16"):
        raise ExtractError(f"--dtype {cfg.dtype!r} unknown; use float32 or float16")
    if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ExtractError(f"--precision {cfg.precision!r} unknown; use auto, fp32, fp16 or bf16")
    bad = [t for t in cfg.templates if "{}" not in t]
    if bad:
        raise ExtractError(f"template {bad[0]!r} has no '{{}}' placeholder for the class name")
    t0 = time.perf_counter()
    rank, world = _dist()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision="fp16" if device.type == "cuda" else "fp32")
    out = Path(cfg.out)
    table = scan(cfg.source)
    lm = load_model(cfg.model, device)
    fp = fingerprint(lm, cfg)

    meta_file = out / store.META_FILE
    meta = store.read_meta(out) if meta_file.is_file() else None
    if meta is not None:
        check_compatible(out, meta, fp, cfg.format)

    old_classes = meta.get("classes", []) if meta else []
    classes = sorted(set(old_classes) | set(table.classes))
    templates = list(cfg.templates)
    if rank == 0:
        stale_text = meta is None or meta.get("classes") != classes or meta.get("templates") != templates or \
            not (out / f"text{store.FORMATS[cfg.format]}").is_file()
        if meta is None:
            text = encode_text(lm, templates, classes, device, cfg.precision)
            meta = _meta_record(lm, cfg, fp, text.shape[-1])
            meta.update(classes=classes, templates=templates, counts={"images": 0, "skipped": 0})
            (out / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
            store.write_json(meta_file, meta)  # the fingerprint is on disk before the first shard
        elif stale_text:
            text = encode_text(lm, templates, classes, device, cfg.precision)
        if stale_text:  # a resume with the same classes and templates re-encodes nothing
            store.write_text(out, cfg.format, templates, classes, text)
            meta.update(classes=classes, templates=templates)
            store.write_json(meta_file, meta)
        # A run killed mid-write leaves its half-written temporary file behind (never a visible shard): tidy up
        # before any rank writes again.
        for stale in (out / store.SHARD_DIR).glob(".*.tmp"):
            stale.unlink()
    session = _broadcast(_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f"), world)
    _barrier(world)
    if rank != 0:
        meta = store.read_meta(out)
    dim = int(meta["embedding_dim"])

    index = store.read_index(out, cfg.format)
    todo, already, changed = _plan(table, index)
    mine = todo[rank::world]
    report = ExtractReport(str(out), len(table), already, changed, 0, [], list(table.ignored), 0.0, 0, 0,
                           warnings=_layout_warnings(table, cfg.dataset))
    if len(mine):
        t_loop = time.perf_counter()
        _run_shards(cfg, lm, table.take(mine), table.ids[mine], classes, dim, device, out, session, rank, report,
                    world)
        report.loop_seconds = time.perf_counter() - t_loop
    _barrier(world)

    if rank == 0:
        final = store.read_index(out, cfg.format)
        uniq_ok = len(set(final["id"][final["skip_reason"] == ""].tolist()))
        meta = store.read_meta(out)
        meta["domains"] = sorted(set(meta.get("domains", [])) | set(table.domain.tolist()))
        meta["counts"] = {"images": uniq_ok, "skipped": int((final["skip_reason"] != "").sum())}
        ignored = {p: r for p, r in meta.get("ignored", [])}
        ignored.update({p: r for p, r in table.ignored})
        meta["ignored"] = sorted([p, r] for p, r in ignored.items())
        meta["updated"] = _now()
        meta["runs"].append({"time": _now(), "source": str(Path(cfg.source).resolve()), "scanned": len(table),
                             "todo": int(len(todo)), "world_size": world, "device": str(device),
                             "seconds": round(time.perf_counter() - t0, 3)})
        store.write_json(meta_file, meta)
        report.total_images, report.total_skipped = meta["counts"]["images"], meta["counts"]["skipped"]
    report.seconds = time.perf_counter() - t0
    return report


def _layout_warnings(table: ImageTable, dataset: Optional[str]) -> list[str]:
    from . import datasets

    doms, counts = np.unique(table.domain.astype(str), return_counts=True)
    return datasets.check(dataset, dict(zip(doms.tolist(), counts.tolist())), set(table.class_name.tolist()))


def _run_shards(cfg: ExtractConfig, lm: LoadedModel, rows: ImageTable, ids: np.ndarray, classes: list[str], dim: int,
                device: torch.device, out: Path, session: str, rank: int, report: ExtractReport,
                world: int) -> None:
    from torch.utils.data import DataLoader

    # CPU: workers share the cores with the forward, a few suffice; GPU: decoding is the bottleneck, use them all.
    cpus = os.cpu_count() or 1
    workers = cfg.workers if cfg.workers is not None else (min(cpus, 32) if device.type == "cuda" else min(4, cpus))
    paths = [str(rows.root / r) for r in rows.relpath]
    loader = DataLoader(
        ImageFiles(paths, lm.preprocess, _input_size(lm)), batch_size=cfg.batch_size, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)
    model = lm.model
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    label_of = {c: i for i, c in enumerate(classes)}
    labels = np.array([label_of[c] for c in rows.class_name], np.int32)
    slow = float(os.environ.get("FEDCLIP_CACHE_SHARD_DELAY", "0"))  # test hook: widen the crash window

    pending_idx: list[np.ndarray] = []
    pending_emb: list[np.ndarray] = []
    pending_reason: list[np.ndarray] = []
    n_pending = 0
    seq = 0

    def flush():
        nonlocal n_pending, seq, pending_idx, pending_emb, pending_reason
        if not n_pending:
            return
        idx = np.concatenate(pending_idx)
        emb = np.concatenate(pending_emb)
        reasons = np.concatenate(pending_reason)
        cols = {"id": ids[idx], "path": rows.relpath[idx], "domain": rows.domain[idx], "client": rows.client[idx],
                "class_name": rows.class_name[idx], "split": rows.split[idx], "skip_reason": reasons,
                "label": labels[idx], "size": rows.size[idx], "mtime_ns": rows.mtime_ns[idx]}
        name = f"part-{session}-r{rank:03d}-{seq:05d}{store.FORMATS[cfg.format]}"
        store.write_shard(out / store.SHARD_DIR / name, cfg.format, cols, emb, cfg.dtype)
        seq += 1
        pending_idx, pending_emb, pending_reason, n_pending = [], [], [], 0
        if slow:
            time.sleep(slow)

    progress = _progress(cfg.progress and rank == 0, len(rows) * world)
    with progress as bar:
        task = bar.add_task("extract", total=len(rows) * world) if bar else None
        with torch.inference_mode(), autocast_for(device, cfg.precision):
            for x, idx, ok, reasons in loader:
                n = len(idx)
                emb = np.full((n, dim), np.nan, np.float32)
                n_ok = int(ok.sum())
                if n_ok == n:
                    emb[:] = model.encode_image(_to_device(x, device)).float().cpu().numpy()
                else:
                    for pos in (~ok).nonzero().flatten().tolist():  # only the failed images of this batch
                        path_i, r = int(idx[pos]), reasons[pos]
                        if cfg.strict:
                            raise ExtractError(f"{paths[path_i]}: {r} (--strict makes any skipped image an error; "
                                               f"fix or remove the file, or drop --strict)")
                        report.skipped.append((str(rows.relpath[path_i]), r))
                    if n_ok:
                        emb[ok.numpy()] = model.encode_image(_to_device(x[ok], device)).float().cpu().numpy()
                pending_idx.append(idx.numpy())
                pending_emb.append(emb)
                pending_reason.append(np.asarray(reasons, dtype=object))
                n_pending += n
                report.embedded += n_ok
                if n_pending >= cfg.shard_size:
                    flush()
                if bar:
                    bar.update(task, advance=n * world)
        flush()


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x


def _progress(enabled: bool, total: int):
    if not enabled:
        return nullcontext(None)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    class _Rate(TextColumn):
        def render(self, task):
            from rich.text import Text
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "… img/s")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(""),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
