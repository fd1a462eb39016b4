"""Mapper, second half: the frozen image tower over decoded batches (``imageio`` is the first half).

One pass per loader batch: view 0 exactly as the model's own preprocessing gives it, and, with ``extract --views
K``, K-1 augmented views per image (``views.py``), encoded in forward passes of at most ``batch_size`` images. The
rows go to the :class:`~.writer.ShardWriter`; failures to the ``failed`` callback the runner gives.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import views as _views
from .config import ExtractConfig
from .imageio import ImageFiles
from .models import LoadedModel
from .writer import CachedRows, ShardWriter

# Called with a batch's (ok, idx, transient, reasons) when some of its images could not be decoded.
Failed = Callable[..., None]


class Embedded(NamedTuple):
    """Rows embedded whole, and cached rows given only their missing views."""

    embedded: int
    extended: int


def autocast_for(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def input_size(lm: LoadedModel) -> tuple[int, int]:
    """(height, width) of the model's input images."""
    s = lm.preprocess_cfg.get("size", 224)
    return tuple(s) if isinstance(s, (list, tuple)) else (s, s)


class ImageEncoder:
    """The frozen image tower on this process's device, and the loaders that feed it."""

    def __init__(self, cfg: ExtractConfig, lm: LoadedModel, device: torch.device, dim: int):
        self.cfg, self.lm, self.device, self.dim = cfg, lm, device, dim
        self.model = lm.model.to(memory_format=torch.channels_last) if device.type == "cuda" else lm.model
        # CPU: workers share the cores with the forward, a few suffice; GPU: decoding is the bottleneck, use them all.
        cpus = os.cpu_count() or 1
        self.workers = cfg.workers if cfg.workers is not None else \
            (min(cpus, 32) if device.type == "cuda" else min(4, cpus))

    def loader(self, dataset, batches=None):
        """A DataLoader over ``dataset``: plain batches of ``batch_size``, or the given ``batches`` of indices."""
        from torch.utils.data import DataLoader

        sizes = {"batch_size": self.cfg.batch_size, "shuffle": False} if batches is None else {"batch_sampler": batches}
        return DataLoader(dataset, **sizes, num_workers=self.workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=False, prefetch_factor=4 if self.workers > 0 else None)

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) -> (n, D) float32, in one forward pass (none for n = 0)."""
        if not len(x):
            return np.zeros((0, self.dim), np.float32)
        return self.model.encode_image(_to_device(x, self.device)).float().cpu().numpy()

    def encode_views(self, xa: torch.Tensor) -> np.ndarray:
        """(n, V, 3, H, W) -> (n, V, D), in forward passes of at most batch_size images."""
        n, v = xa.shape[:2]
        flat = xa.reshape(n * v, *xa.shape[2:])
        bs = self.cfg.batch_size
        parts = [self.model.encode_image(_to_device(flat[s:s + bs].contiguous(), self.device)).float().cpu()
                 for s in range(0, len(flat), bs)]
        return (torch.cat(parts).numpy() if parts else np.zeros((0, self.dim), np.float32)).reshape(n, v, self.dim)


def embed_plain(enc: ImageEncoder, paths, writer: ShardWriter, failed: Failed,
                advance: Callable[[int], None]) -> Embedded:
    """One view per image: the plain path, exactly as it always was."""
    embedded = 0
    lm, cfg = enc.lm, enc.cfg
    for x, idx, ok, transient, reasons, digests in enc.loader(
            ImageFiles(paths, lm.preprocess, input_size(lm), cfg.exif_transpose)):
        n, n_ok = len(idx), int(ok.sum())
        if n_ok < n:
            failed(ok, idx, transient, reasons)
        emb = enc.encode(x if n_ok == n else x[ok])
        keep = ok.numpy()
        writer.add(idx.numpy()[keep], emb, np.asarray(digests, dtype=object)[keep])
        embedded += n_ok
        advance(n)
    return Embedded(embedded, 0)


def embed_with_views(enc: ImageEncoder, paths, ids: np.ndarray, writer: ShardWriter, failed: Failed,
                     advance: Callable[[int], None], n_full: int, cached: CachedRows) -> Embedded:
    """K views per image: one pass over the new/changed images (every view), then one per view count already held
    by the cached rows being extended (only the views they lack)."""
    lm, cfg, k_views = enc.lm, enc.cfg, writer.target.views["count"]
    vcfg = writer.target.views
    embedded = extended = 0
    aug = _views.AugmentedView(lm.preprocess, lm.preprocess_cfg, vcfg["augment"], vcfg["seed"])
    passes = [(np.arange(n_full), 0)]
    passes += [(n_full + np.flatnonzero(cached.held == h), int(h)) for h in np.unique(cached.held)]
    for order, first in passes:
        if not len(order):
            continue
        ds = ViewFiles(paths, lm.preprocess, input_size(lm), cfg.exif_transpose, order, ids, aug,
                       max(first, 1), k_views, with_view0=first == 0)
        parts, ends = view_batches(len(order), cfg.batch_size, k_views - max(first, 1) + (first == 0))
        held_back: list[_HeldBack] = []  # the parts of a batch_size chunk whose view 0 is not encoded yet
        for (x, xa, idx, ok, transient, reasons, digests), end in zip(enc.loader(ds, parts), ends):
            n, n_ok = len(idx), int(ok.sum())
            if n_ok < n:
                failed(ok, idx, transient, reasons)
            keep = ok.numpy()
            new = enc.encode_views(xa[ok] if n_ok < n else xa)
            if first == 0:  # view 0 exactly as the plain path computes it: one pass per chunk
                held_back.append(_HeldBack(x if n_ok == n else x[ok], idx.numpy()[keep],
                                           np.asarray(digests, dtype=object)[keep], new))
                if end:
                    embedded += _write_chunk(enc, writer, held_back)
                    held_back = []
            else:
                extended += writer.extend(idx.numpy()[keep], new, np.asarray(digests, dtype=object)[keep])
            advance(n)
    return Embedded(embedded, extended)


class _HeldBack(NamedTuple):
    """One loader part of a chunk with views: its view-0 inputs, row indices, content hashes and encoded views."""

    x: torch.Tensor
    idx: np.ndarray
    digests: np.ndarray
    views: np.ndarray


def _write_chunk(enc: ImageEncoder, writer: ShardWriter, parts: list[_HeldBack]) -> int:
    """Encode view 0 of a whole ``batch_size`` chunk in one pass (as the plain path batches it) and hand the rows,
    with their augmented views, to the writer; returns the number of rows."""
    x0 = torch.cat([p.x for p in parts])
    writer.add(np.concatenate([p.idx for p in parts]), enc.encode(x0), np.concatenate([p.digests for p in parts]),
               np.concatenate([p.views for p in parts]))
    return len(x0)


def view_batches(n: int, batch_size: int, per_image: int) -> tuple[list[list[int]], list[bool]]:
    """Loader batches for an extraction with views: each ``batch_size`` chunk of the images (the plain path's
    batches, so view 0 is still encoded in exactly those batches) split into parts of about ``batch_size //
    per_image`` images, so that a loader batch holds about ``batch_size`` images' tensors whatever the number of
    views (``batch_size`` images x K views would hold K times the memory, times the prefetched batches). Returns
    the parts and, for each, whether it ends its chunk."""
    parts, ends = [], []
    for start in range(0, n, batch_size):
        chunk = np.arange(start, min(start + batch_size, n))
        count = min(len(chunk), max(1, -(-len(chunk) * per_image // batch_size)))  # ~batch_size images' tensors
        pieces = [p for p in np.array_split(chunk, count) if len(p)]
        parts += [p.tolist() for p in pieces]
        ends += [False] * (len(pieces) - 1) + [True]
    return parts, ends


class ViewFiles(ImageFiles):
    """Decode each image once and produce view 0 (the model's preprocessing; only when ``with_view0``) and the
    augmented views ``first..count-1``. Items: (x, views (V, 3, H, W), index, ok, transient, reason, hash)."""

    def __init__(self, paths, preprocess, input_size, exif_transpose, order, ids, augment, first: int, count: int,
                 with_view0: bool):
        super().__init__(paths, preprocess, input_size, exif_transpose)
        self.order, self.ids, self.augment = order, ids, augment
        self.first, self.count, self.with_view0 = first, count, with_view0

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int):
        from .imageio import BadImage, content_hash, open_rgb

        i = int(self.order[j])
        v = self.count - self.first
        blank = torch.zeros(3, *self.input_size) if self.with_view0 else torch.zeros(0)
        try:
            data = self.paths.read(i)
            img = open_rgb("", self.exif_transpose, data)
            x = self.preprocess(img) if self.with_view0 else blank
            xa = torch.stack([self.augment(img, str(self.ids[i]), k) for k in range(self.first, self.count)])
            return x, xa, i, True, False, "", content_hash(data)
        except BadImage as e:
            return blank, torch.zeros(v, 3, *self.input_size), i, False, e.transient, str(e), ""
        except Exception as e:  # preprocessing of an odd image (e.g. 1x0 pixels)
            return blank, torch.zeros(v, 3, *self.input_size), i, False, False, \
                f"preprocessing failed: {type(e).__name__}: {e}", ""


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x
