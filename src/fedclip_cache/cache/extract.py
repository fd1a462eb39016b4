"""Runner of the extract stage: reader (sources) -> mapper (imageio + encoder: the frozen CLIP) -> writer (writer,
store) -> commit.

Run it in one process, or under ``torchrun --nproc-per-node N -m fedclip_cache extract ...``: every rank scans the
same dataset, takes every N-th image still to do, and commits its own shards; rank 0 owns the metadata and the
text embeddings. The reader orders rows canonically, so the cache equals a single-process one.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, NamedTuple, Optional, Sequence

import numpy as np
import torch

from . import integrity, store, views as _views
from .config import ExtractConfig
from .encoder import ImageEncoder, autocast_for, embed_plain, embed_with_views, input_size
from .integrity import CacheBusy, WriterLock
from .models import LoadedModel, load_model
from .schema import FORMAT_VERSION
from .bytesources import source_record
from .sources import OWN_OUTPUT, FileNote, ImageTable, quoted, scan
from .writer import CachedRows, RowSource, ShardTarget, ShardWriter
from ..errors import FedclipCacheError


# A progress bar: called with the number of images to attempt, it returns a context manager that yields a function
# to call with how many more were attempted. The CLI passes one (cache/ draws nothing itself: it imports no rich).
ProgressBar = Callable[[int], ContextManager[Callable[[int], None]]]


class ExtractError(FedclipCacheError, RuntimeError):
    """Extraction cannot go on; the message says why and how to fix it."""


@dataclass
class ExtractReport:
    cache: str
    scanned: int
    already_cached: int
    changed: int
    embedded: int
    skipped: list[FileNote]  # (path, reason)
    ignored: list[FileNote]
    seconds: float
    total_images: int
    total_skipped: int
    warnings: list[str] = field(default_factory=list)
    loop_seconds: float = 0.0  # decode + encode + write only (no scan / model load): the steady-state rate
    retried: int = 0  # files skipped for a transient reason before, tried again now
    refreshed: int = 0  # cached rows whose label, domain, client or split the dataset changed (features kept)
    retired: list[str] = field(default_factory=list)  # cached files no longer in the dataset: no longer served
    repaired: list[FileNote] = field(default_factory=list)  # (shard or file, what was wrong) fixed now
    views: int = 1  # views per image in the cache (extract --views)
    upgraded: str = ""  # what upgrading an older cache format changed, when this run did
    extended: int = 0  # cached images given new augmented views only (their view 0 and older views kept)

    @property
    def images_per_s(self) -> float:
        return (self.embedded + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------- helpers

def resolve_device(device: str) -> torch.device:
    import re

    from .config import DEVICE_PATTERN

    if not re.fullmatch(DEVICE_PATTERN, device or ""):
        raise ExtractError(f"--device {device!r} unknown; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


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
    return {**lm.fingerprint(), "precision": cfg.precision, "dtype": cfg.dtype, "normalised": False,
            "exif_transpose": cfg.exif_transpose}


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
    refusal = integrity.format_refusal(cache, meta)  # format 3 is upgraded in place (_open_or_create)
    if refusal:
        raise ExtractError(refusal)
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
    tokens = torch.cat([lm.tokenizer(prompts[i:i + 256]) for i in range(0, len(prompts), 256)])
    _check_distinct_prompts(lm.tokenizer, tokens, templates, classes)
    out = []
    with autocast_for(device, precision):
        for i in range(0, len(prompts), 256):
            out.append(lm.model.encode_text(tokens[i:i + 256].to(device)).float().cpu())
    emb = torch.cat(out).numpy()
    return emb.reshape(len(templates), len(classes), -1)


def _check_distinct_prompts(tokenizer, tokens: torch.Tensor, templates: Sequence[str], classes: Sequence[str]
                            ) -> None:
    """Refuse two classes whose prompts tokenise the same: their text embeddings would be identical, so zero-shot,
    FedCLIP and the prompt learners could never tell them apart, with exit 0. The tokenizer lower-cases, normalises
    Unicode (ftfy: 'café' typed as e + U+0301 is 'café') and spaces, and cuts at its context length, so 'Cat' and
    'cat', or two long names that differ only past the cut, are one prompt (measured with open_clip's tokenizer)."""
    for t, template in enumerate(templates):
        seen: dict[tuple, int] = {}
        for c, row in enumerate(tokens[t * len(classes):(t + 1) * len(classes)].tolist()):
            first = seen.setdefault(tuple(row), c)
            if first != c and not torch.equal(*tokenizer([classes[first], classes[c]])):
                raise ExtractError(f"--template {quoted(template, 60)} is too long: "
                                   f"the text tokenizer cuts every prompt at its context length before the class name, "
                                   f"so classes {ascii(classes[first])} and {ascii(classes[c])} would get the same "
                                   f"text embedding; shorten the template")
            if first != c:
                raise ExtractError(f"classes {ascii(classes[first])} and {ascii(classes[c])} give the same prompt to "
                                   f"the text tokenizer ({template.format(classes[c])[:80]!r}: it lower-cases, "
                                   f"normalises Unicode and spaces, and cuts long prompts), so their text embeddings "
                                   f"would be identical; rename or merge one (the class folder, the manifest's label "
                                   f"or --classes)")


def _meta_record(lm: LoadedModel, cfg: ExtractConfig, fp: dict, dim: int, cache_id: str) -> dict:
    import open_clip

    return {
        "format_version": FORMAT_VERSION,
        "cache_id": cache_id,  # near the top: a truncated cache.json still tells whose shards are whose
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

class Work(NamedTuple):
    """What :func:`plan_work` found to do: ``todo`` (rows to embed whole), ``already`` (rows cached and unchanged),
    ``changed`` (cached files changed since), ``retried`` (transient skips tried again), ``extend`` (cached rows,
    not re-embedded, that hold fewer views than asked: only their missing views are computed)."""

    todo: np.ndarray
    already: int
    changed: int
    retried: int
    extend: np.ndarray


def plan_work(table: ImageTable, known: dict[str, integrity.Known], views: int = 1) -> Work:
    """Rows of ``table`` still to extract: new ids; files whose size or mtime changed; files whose inode or ctime
    changed (a rename, a swap of two same-size files, a copy) and whose bytes no longer hash to what was embedded;
    files whose last attempt failed for a transient reason (permission denied, I/O error); and the cached rows
    that hold fewer than ``views`` views."""
    todo, changed, retried, suspects = [], 0, 0, []
    stats = zip(table.size.tolist(), table.mtime_ns.tolist(), table.ino.tolist(), table.ctime_ns.tolist())
    for i, (iid, st) in enumerate(zip(table.ids.tolist(), stats)):
        prev = known.get(iid)
        if prev is None:
            todo.append(i)
            continue
        if (prev.stat.size, prev.stat.mtime_ns) != st[:2]:
            todo.append(i)
            changed += 1
        elif prev.kind == "transient":
            todo.append(i)
            retried += 1
        elif (prev.stat.ino, prev.stat.ctime_ns) != st[2:]:
            if prev.kind == "row" and prev.content_hash:
                suspects.append((i, prev.content_hash))  # same size and mtime, another inode or ctime: the bytes
            else:
                todo.append(i)
                changed += 1
    if suspects:
        from concurrent.futures import ThreadPoolExecutor

        from .imageio import hash_file

        paths = [os.path.join(table.root, table.relpath[i]) for i, _ in suspects]
        with ThreadPoolExecutor(8) as pool:
            digests = list(pool.map(hash_file, paths, chunksize=64))
        for (i, old), new in zip(suspects, digests):
            if new != old:
                todo.append(i)
                changed += 1
    todo = np.sort(np.array(todo, np.int64))
    extend = np.zeros(0, np.int64)
    if views > 1:
        redo = set(todo.tolist())
        extend = np.array([i for i, iid in enumerate(table.ids.tolist()) if i not in redo
                           and known[iid].kind == "row" and known[iid].views < views], np.int64)
    return Work(todo, len(table) - len(todo), changed, retried, extend)


def validate_config(cfg: ExtractConfig) -> None:
    """Refuse a bad option before anything is loaded: every declared check (:meth:`ExtractConfig.validate`, the
    same as the command line's and a pipeline's), then what only torch can tell (a CUDA device asked for and none
    visible)."""
    cfg.validate()
    resolve_device(cfg.device)


def extract(cfg: ExtractConfig, progress: Optional[ProgressBar] = None) -> ExtractReport:
    """Embed every image of ``cfg.source`` not yet in ``cfg.out`` and commit the cache; see the module docstring.
    ``progress``: a progress bar (:data:`ProgressBar`) drawn while images are embedded when ``cfg.progress`` is
    set (on rank 0 only); the CLI passes ``fedclip_cache.progress.extract_bar``."""
    validate_config(cfg)
    t0 = time.perf_counter()
    rank, world = _dist()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision="fp16" if device.type == "cuda" else "fp32")
    out = Path(cfg.out)
    store.check_cache_path(out)
    if out.exists() and not out.is_dir():
        raise ExtractError(f"{out}: exists and is not a folder; pass a folder for the cache")
    integrity.check_output_folder(out)
    table = scan(cfg.source, exclude=(out,), columns=cfg.source_columns())  # a cache inside the dataset is not data
    if cfg.strict and table.problems:
        p, why = table.problems[0]
        raise ExtractError(f"{os.path.join(table.root, store.display_text(p))}: {why} (--strict makes any skipped "
                           f"file an error; fix or remove it, or drop --strict)")
    lm = load_model(cfg.model, device)
    fp = fingerprint(lm, cfg)

    try:
        with ExitStack() as stack:
            busy = None
            if rank == 0:  # one writer per cache; a torchrun group is one writer, represented by rank 0
                try:
                    stack.enter_context(WriterLock(out))
                except CacheBusy as e:
                    busy = str(e)
            busy = _broadcast(busy, world)
            if busy:
                raise CacheBusy(busy)
            report = _extract_locked(cfg, table, lm, fp, device, out, rank, world, t0,
                                     progress if cfg.progress else None)
    except OSError as e:
        if _unwritable_here(e, out):  # e.g. a shards/ folder shared by a lab, writable only by its owner
            folder = store.display_text(os.path.dirname(e.filename))
            raise ExtractError(f"cannot write in {folder} ({e.strerror}): make it writable for you (a shards folder "
                               f"shared by caches: for everyone who extracts into it) and re-run the same extract; "
                               f"finished shards are kept") from None
        if not store.is_disk_full(e):
            raise
        # Every file is written to a temporary name first: what was being written is gone, every finished shard is
        # on disk and cache.json still says in-progress, so the same command resumes where this one stopped.
        where = store.display_text(e.filename) if isinstance(e.filename, str) else str(out)
        raise ExtractError(f"disk full writing {where}: free space and re-run the same extract; finished shards are "
                           f"kept") from None
    if rank == 0 and report.total_images == 0:  # committed (the skip records spare the next run), yet no cache
        p, why = report.skipped[0] if report.skipped else ("", "no image kept")
        raise ExtractError(f"{cfg.source}: no image could be embedded ({len(report.skipped)} skipped, first: {p}: "
                           f"{why}); the cache at {out} holds no image: fix or replace the files and run again")
    return report


def _unwritable_here(e: OSError, out: Path) -> bool:
    """Whether ``e`` is a refusal to write a file of the cache folder (permissions, a read-only mount)."""
    import errno

    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not isinstance(e.filename, str):
        return False
    top = os.path.abspath(out)
    return os.path.commonpath([top, os.path.abspath(e.filename)]) == top


def _open_or_create(cfg: ExtractConfig, lm: LoadedModel, fp: dict, out: Path, report: ExtractReport
                    ) -> tuple[dict, bool]:
    """(meta, is_new). A damaged cache.json is rebuilt from this cache's shards, if they were made by this model."""
    meta_file = out / store.META_FILE
    if meta_file.exists():
        try:
            meta = store.read_meta(out)
            check_compatible(out, meta, fp, cfg.format)
            if meta["format_version"] == integrity.PRE_ID_FORMAT:
                # Upgraded in place, not re-extracted (a DomainNet cache is hours of GPU): its listed shards stay
                # as they are, new shards are format 4, and the id is on disk with this run's first write.
                meta = integrity.upgrade(meta)
                n, old = len(integrity.usable_listing(meta)[0]), integrity.PRE_ID_FORMAT
                report.upgraded = (f"cache format {old} upgraded in place to {FORMAT_VERSION}: given a cache id; its "
                                   f"{n} format-{old} shard(s) kept as its own (rows re-embedded only if their "
                                   f"images changed)")
            store.cache_id_of(out, meta)
            return meta, False
        except store.CacheError as e:
            cid = _recover_cache_id(out, cfg.format)
            foreign, found_views = [], {}
            for p in store.shard_files(out, cfg.format):
                try:
                    smeta = store.read_shard_meta(p)
                    if smeta.get("cache_id") != cid:
                        continue  # another cache's (a shared shards/ folder): never used to rebuild this one
                    if smeta.get("fingerprint") != fp:
                        foreign.append(p.name)
                    elif smeta.get("views", 1) > 1:  # the views' settings are recovered from the shards too
                        found_views = {"count": max(smeta["views"], found_views.get("count", 1)),
                                       "augment": smeta.get("augment"), "seed": smeta.get("augment_seed")}
                except store.CacheError:
                    pass  # damaged shards are removed by the inventory
            if foreign:
                raise ExtractError(f"{meta_file}: damaged, and shard {foreign[0]} was made with another model or "
                                   f"preprocessing; extract into a new output folder") from None
            report.repaired.append(FileNote(store.META_FILE, f"damaged ({str(e).split(': ', 2)[1]}); rebuilt"))
            meta = _new_meta(lm, cfg, fp, cid)
            if found_views:
                meta["views"] = found_views
            return meta, True
    return _new_meta(lm, cfg, fp, store.new_cache_id()), True


def _new_meta(lm: LoadedModel, cfg: ExtractConfig, fp: dict, cache_id: str) -> dict:
    meta = _meta_record(lm, cfg, fp, 0, cache_id)
    meta.update(state="in-progress", shards={}, last_session="", skipped=[], classes=[], templates=[],
                counts={"images": 0, "skipped": 0})
    return meta


def _recover_cache_id(out: Path, fmt: str) -> str:
    """The id of a cache whose cache.json is damaged: read from what is left of the file, else the one id that this
    folder's own shards carry (no shards: a new id). Shards of several caches, or any in a ``shards/`` that is a
    link (perhaps shared), cannot tell which are this cache's: refused rather than guessed."""
    import re

    try:
        pattern = rb'"cache_id"\s*:\s*"(' + store.CACHE_ID_PATTERN.encode() + rb')"'
        found = re.search(pattern, (out / store.META_FILE).read_bytes())
    except OSError:
        found = None
    if found:
        return found[1].decode()
    ids = {store.shard_cache_id(p) for p in store.shard_files(out, fmt)} - {None, ""}
    shards = out / store.SHARD_DIR
    if not ids:
        return store.new_cache_id()
    if len(ids) == 1 and not shards.is_symlink():
        return ids.pop()
    where = f"{len(ids)} caches" if len(ids) > 1 else "a cache, and it is a link to a folder that may be shared"
    raise ExtractError(f"{out / store.META_FILE}: damaged, and which shards are this cache's cannot be told "
                       f"({shards} holds shards of {where}); restore cache.json, or extract into a new output "
                       f"folder")


@dataclass
class WorkPlan:
    """What rank 0 decided and every rank of the run follows: the rows to embed whole (``todo``), the cached rows
    that only get new views (``extend``, living where ``cached`` says), the embedding width, the views record and
    the cache's id."""

    todo: np.ndarray
    dim: int
    views: dict
    extend: np.ndarray
    cached: CachedRows
    cache_id: str


@dataclass
class _Opened:
    """Rank 0's hold on the cache between planning and the commit."""

    meta: dict
    inv: integrity.Inventory
    plan: WorkPlan


def _extract_locked(cfg: ExtractConfig, table: ImageTable, lm: LoadedModel, fp: dict, device, out: Path,
                    rank: int, world: int, t0: float, progress: Optional[ProgressBar] = None) -> ExtractReport:
    report = ExtractReport(str(out), len(table), 0, 0, 0, [], list(table.ignored), 0.0, 0, 0,
                           warnings=_layout_warnings(table, cfg.dataset) + _own_output_warnings(table))
    classes, templates = _class_list(cfg, table), list(cfg.templates)
    opened = _open_and_plan(cfg, table, lm, fp, device, out, report, classes, templates) if rank == 0 else None
    session = _broadcast(_dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f"), world)
    plan = _broadcast(opened.plan if opened else None, world)
    report.views = plan.views["count"]
    mine, mine_ext = plan.todo[rank::world], plan.extend[rank::world]
    if len(mine) or len(mine_ext):
        t_loop = time.perf_counter()
        rows = np.concatenate([mine, mine_ext])
        target = ShardTarget(out, cfg.format, cfg.dtype, cfg.shard_size, session, rank, plan.cache_id, fp, plan.dim,
                             plan.views if plan.views["count"] > 1 else None,
                             float(os.environ.get("FEDCLIP_CACHE_SHARD_DELAY", "0")))  # test hook: crash window
        _run_shards(cfg, lm, table.take(rows), table.ids[rows], classes, device, target, report, world,
                    len(mine), plan.cached[rank::world], progress if rank == 0 else None)
        report.loop_seconds = time.perf_counter() - t_loop
    _barrier(world)
    if rank == 0:
        _commit_run(cfg, out, opened, table, classes, templates, session, fp, device, world, report, t0)
    report.seconds = time.perf_counter() - t0
    return report


def _open_and_plan(cfg: ExtractConfig, table: ImageTable, lm: LoadedModel, fp: dict, device, out: Path,
                   report: ExtractReport, classes: list[str], templates: list[str]) -> _Opened:
    """Rank 0, under the writer lock: open (or create, or repair) the cache, mark it in progress with its text
    embeddings and views record on disk, take the inventory of its shards and plan the work."""
    meta, _ = _open_or_create(cfg, lm, fp, out, report)
    integrity.check_not_a_copy(out, meta)  # before anything in a shards folder it may share is touched
    meta["folder"] = os.path.realpath(out)
    removed_tmp = integrity.clean_temporaries(out, meta["cache_id"])  # a killed run's (never visible)
    vcfg = _views.resolve(meta.get("views"), cfg.views, cfg.augment, cfg.augment_seed, str(out))
    if vcfg["count"] > 1:
        _views.AugmentedView(lm.preprocess, lm.preprocess_cfg, vcfg["augment"], vcfg["seed"])  # fails early
        vcfg["size"], vcfg["interpolation"] = list(input_size(lm)), lm.preprocess_cfg.get("interpolation")
        meta["views"] = vcfg  # the target, on disk before any shard: a resume goes on with the same views
    else:
        meta.pop("views", None)
    stale_text = meta.get("classes") != classes or meta.get("templates") != templates or \
        not _text_matches(out, cfg.format, templates, classes, int(meta.get("embedding_dim") or 0))
    if stale_text:  # a resume with the same classes and templates re-encodes nothing
        text = encode_text(lm, templates, classes, device, cfg.precision)
        meta["embedding_dim"] = int(text.shape[-1])
    # From here until the commit, readers refuse the cache: the fingerprint is on disk before the first shard.
    meta["state"] = "in-progress"
    meta["classes"], meta["templates"] = classes, templates
    (out / store.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    store.write_json(out / store.META_FILE, meta)
    if stale_text:
        store.write_text(out, cfg.format, templates, classes, text)
    inv = integrity.take_inventory(out, meta, fp, int(meta["embedding_dim"]), verify=cfg.verify)
    report.warnings += [f"{out / store.SHARD_DIR / f}: not a shard of this tool (by its name); left alone and "
                        f"never read" for f in store.foreign_files(out)]
    report.warnings += _ownership_warnings(out, inv)
    report.repaired += inv.removed
    if removed_tmp:
        report.repaired.append(FileNote("temporary files", f"{removed_tmp} left by a killed run, removed"))
    known = inv.known()
    work = plan_work(table, known, vcfg["count"])
    report.already_cached, report.changed, report.retried = work.already, work.changed, work.retried
    ext_ids = table.ids[work.extend].tolist()
    rows = [inv.winners[i] for i in ext_ids]  # where each row to extend lives now (only rows are extended)
    cached = CachedRows(np.array([w.shard for w in rows], dtype=object), np.array([w.position for w in rows], np.int64),
                        np.array([known[i].views for i in ext_ids], np.int64),
                        np.array([w.content_hash for w in rows], dtype=object))
    return _Opened(meta, inv, WorkPlan(work.todo, int(meta["embedding_dim"]), vcfg, work.extend, cached,
                                       meta["cache_id"]))


def _commit_run(cfg: ExtractConfig, out: Path, opened: _Opened, table: ImageTable, classes: list[str],
                templates: list[str], session: str, fp: dict, device, world: int, report: ExtractReport,
                t0: float) -> None:
    """Rank 0, after every rank's shards are written: record the run and commit the cache (``commit.commit``)."""
    from .commit import commit

    meta, plan = opened.meta, opened.plan
    meta["classes"], meta["templates"] = classes, templates
    meta["domains"] = sorted(set(table.domain.tolist()))
    meta["ignored"] = sorted([p, r] for p, r in table.ignored)
    run = {"time": _now(), "source": source_record(str(cfg.source)), "scanned": len(table),
           "todo": int(len(plan.todo)), "world_size": world, "device": str(device)}
    if plan.views["count"] > 1:
        run.update(views=plan.views["count"], extended=int(len(plan.extend)))
    result = commit(out, meta, opened.inv, table, session, fp, plan.dim, cfg.format, cfg.dtype, run,
                    t0)
    report.retired, report.refreshed = result.retired, result.refreshed
    report.total_images, report.total_skipped = result.images, result.skipped
    report.skipped += [FileNote(store.display_text(p), r) for p, r in table.problems]


def _ownership_warnings(out: Path, inv: integrity.Inventory) -> list[str]:
    """What this run found in shards/ and left alone because it is not this cache's: one line for the shards of
    other caches (a shared folder may hold many), one per shard too damaged to tell whose it is."""
    shards = out / store.SHARD_DIR
    out_w = [f"{shards}: {len(inv.foreign)} shard(s) of another cache (a shards folder shared by caches) left "
             f"alone: never read, adopted or deleted"] if inv.foreign else []
    # Format-3 shards name no cache: one cache.json does not list may be a killed format-3 run's or another cache's.
    out_w += [f"{shards}: {len(inv.no_id)} shard(s) without a cache id (cache format 3) that {store.META_FILE} does "
              f"not list (left by a killed run of an older version, or another cache's in a shared shards folder: "
              f"nothing tells which) left alone: never read, adopted or deleted; their images are embedded again "
              f"(first: {inv.no_id[0]}; delete them if no other cache uses this shards folder)"] if inv.no_id else []
    return out_w + [f"{shards / n}: unreadable shard that {store.META_FILE} does not list, so whose it is cannot be "
                    f"told; left alone (delete it if no other cache uses this shards folder)" for n in inv.unknown]


def _class_list(cfg: ExtractConfig, table: ImageTable) -> list[str]:
    """The cache's classes in label order: ``--classes`` when given (every class in the data must be in it; classes
    without images here are kept, so that every site of a federation indexes labels alike), else the data's own
    classes, sorted."""
    if cfg.classes is None:
        return table.classes
    unknown = sorted(set(table.class_name.tolist()) - set(cfg.classes))  # classes with images (not ClassLabel's)
    if unknown:
        raise ExtractError(f"{cfg.source}: class {unknown[0]!r} ({len(unknown)} class(es) in all) is not in the "
                           f"--classes list; add it to the list every site uses, or remove those images")
    return list(cfg.classes)


def _text_matches(out: Path, fmt: str, templates: list[str], classes: list[str], dim: int) -> bool:
    """Whether the stored text embeddings are readable and are exactly these templates x classes (a missing or
    damaged text file is re-encoded, not trusted)."""
    try:
        t, c, emb = store.read_text(out, fmt)
    except store.CacheError:
        return False
    return t == templates and c == classes and emb.shape == (len(templates), len(classes), dim)


def _own_output_warnings(table: ImageTable) -> list[str]:
    """Our own outputs found inside the dataset (a run's plots would otherwise be embedded as a domain): said, not
    just listed among the ignored files."""
    return [f"{os.path.join(table.root, p)}: {r}" for p, r in table.ignored if r.endswith(OWN_OUTPUT)]


def _layout_warnings(table: ImageTable, dataset: Optional[str]) -> list[str]:
    from . import datasets

    doms, counts = np.unique(table.domain.astype(str), return_counts=True)
    return datasets.check(dataset, dict(zip(doms.tolist(), counts.tolist())), set(table.class_name.tolist()))


@contextmanager
def _no_progress(total: int):
    yield lambda n: None


def _run_shards(cfg: ExtractConfig, lm: LoadedModel, rows: ImageTable, ids: np.ndarray, classes: list[str],
                device: torch.device, target: ShardTarget, report: ExtractReport, world: int, n_full: int,
                cached: CachedRows, progress: Optional[ProgressBar]) -> None:
    """Embed ``rows`` and commit them in shards. With views (``target.views``: K > 1), the first ``n_full`` rows
    are embedded whole (view 0 exactly as without views, plus K-1 augmented views) and the others only get the
    views they lack (``cached``: where their cached row lives, its view count and content hash)."""
    label_of = {c: i for i, c in enumerate(classes)}
    source = RowSource(rows, ids, np.array([label_of[c] for c in rows.class_name], np.int32),
                       np.array([os.fsencode(r) for r in rows.relpath], dtype=object))
    writer = ShardWriter(target, source, n_full, cached)
    enc = ImageEncoder(cfg, lm, device, target.dim)
    paths = [os.path.join(rows.root, r) for r in rows.relpath]
    images = rows.blobs if rows.blobs is not None else paths  # bytes inside container files, or one file per row

    def failed(ok, idx, transient, reasons) -> None:
        _record_failures(cfg, paths, rows, writer, report, ok, idx, transient, reasons)

    with (progress or _no_progress)(len(rows) * world) as advance:
        def step(n: int) -> None:
            advance(n * world)  # every rank embeds about as many: rank 0's bar stands for the group

        with torch.inference_mode(), autocast_for(device, cfg.precision):
            if target.views is None:
                done = embed_plain(enc, images, writer, failed, step)
            else:
                done = embed_with_views(enc, images, ids, writer, failed, step, n_full, cached)
        writer.flush()
    report.embedded += done.embedded
    report.extended += done.extended


def _record_failures(cfg: ExtractConfig, paths: list[str], rows: ImageTable, writer: ShardWriter,
                     report: ExtractReport, ok, idx, transient, reasons) -> None:
    """The images of a batch that could not be decoded: skip records (an error under ``--strict``)."""
    for pos in (~ok).nonzero().flatten().tolist():  # only the failed images of this batch
        i, r = int(idx[pos]), reasons[pos]
        if cfg.strict:
            raise ExtractError(f"{paths[i]}: {r} (--strict makes any skipped image an error; "
                               f"fix or remove the file, or drop --strict)")
        report.skipped.append(FileNote(store.display_text(str(rows.relpath[i])), r))
        writer.skip(i, r, bool(transient[pos]))
