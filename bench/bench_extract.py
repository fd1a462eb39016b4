"""Benchmark: extraction throughput and memory (not a test).

    python bench/bench_extract.py [--images 512] [--model ViT-B-32] [--device cpu|cuda] [--rss]

Compares, on generated JPEGs and a random-init open_clip model (no hub):
  pipeline  fedclip-cache extract (DataLoader workers, pinned memory, inference_mode, shards)
  pure      model.encode_image on already-preprocessed tensors (the ceiling)
  naive     per batch: PIL open + preprocess each image in the main process, then encode
--rss measures peak RSS of a full extract at 1k and 10k images (tiny model; streaming is what is measured).
Writes bench/results/extract-<setup>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fedclip_cache import ExtractConfig, ModelSpec
from fedclip_cache import extract
from fedclip_cache.cache.extract import autocast_for, resolve_device
from fedclip_cache.cache.models import load_model

from extract_rss import extract_peak_rss_mb  # bench/ is on sys.path when run as a script


def make_jpegs(root: Path, n: int, size: int = 256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    for i in range(n):
        d = root / f"dom{i % 4}" / f"class{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth image + noise: JPEG-compressible like a photo, different per file
        img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((size, size), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)
    return root


def bench_pure(lm, files, batch, device, precision) -> float:
    x = torch.stack([lm.preprocess(Image.open(f).convert("RGB")) for f in files])
    model = lm.model
    with torch.inference_mode(), autocast_for(device, precision):
        model.encode_image(x[:batch].to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            model.encode_image(x[i:i + batch].to(device)).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - t)


def bench_naive(lm, files, batch, device, precision) -> float:
    t = time.perf_counter()
    with torch.inference_mode(), autocast_for(device, precision):
        for i in range(0, len(files), batch):
            x = torch.stack([lm.preprocess(Image.open(f).convert("RGB")) for f in files[i:i + batch]])
            lm.model.encode_image(x.to(device)).float().cpu()
    return len(files) / (time.perf_counter() - t)


def peak_rss_mb(n: int, tmp: Path) -> float:
    from fedclip_cache.synthetic import write_tiny_model

    cfg, ckpt = write_tiny_model(tmp / "model")
    data = make_jpegs(tmp / f"rss{n}", n, size=96)
    return extract_peak_rss_mb(str(data), tmp / f"rss-cache{n}", cfg, ckpt, workers=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rss", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the memory measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(a.device)
    precision = a.precision if a.precision != "auto" else ("fp16" if device.type == "cuda" else "fp32")
    tmp = Path(tempfile.mkdtemp())
    if a.rss_only:
        r1, r10 = peak_rss_mb(1000, tmp), peak_rss_mb(10000, tmp)
        res = {"setup": "rss-tiny-clip-cpu", "peak_rss_mb_1k": round(r1, 1), "peak_rss_mb_10k": round(r10, 1),
               "rss_growth": round(r10 / r1 - 1, 3)}
        print(json.dumps(res, indent=2))
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"extract-{res['setup']}.json").write_text(json.dumps(res, indent=2))
        return
    data = make_jpegs(tmp / "data", a.images)
    files = sorted(str(p) for p in data.rglob("*.jpg"))
    spec = ModelSpec(model=a.model, pretrained=None)
    rep = extract(ExtractConfig(source=str(data), out=str(tmp / "cache"), model=spec, device=str(device),
                                precision=precision, batch_size=a.batch, workers=a.workers, progress=False))
    pipeline = rep.embedded / rep.loop_seconds
    lm = load_model(spec, device)
    pure = bench_pure(lm, files, a.batch, device, precision)
    naive = bench_naive(lm, files, a.batch, device, precision)
    res = {"setup": f"{a.model}-{device.type}-{precision}-{torch.get_num_threads()}threads-{a.images}img",
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
           "threads": torch.get_num_threads(), "workers": a.workers if a.workers is not None else min(4, os.cpu_count()),
           "images": a.images, "batch": a.batch, "pipeline_img_s": round(pipeline, 1),
           "pipeline_end_to_end_img_s": round(rep.embedded / rep.seconds, 1), "pure_forward_img_s": round(pure, 1),
           "naive_img_s": round(naive, 1), "pipeline_over_pure": round(pipeline / pure, 3),
           "pipeline_over_naive": round(pipeline / naive, 3)}
    if a.rss:
        r1, r10 = peak_rss_mb(1000, tmp), peak_rss_mb(10000, tmp)
        res.update(peak_rss_mb_1k=round(r1, 1), peak_rss_mb_10k=round(r10, 1), rss_growth=round(r10 / r1 - 1, 3))
    print(json.dumps(res, indent=2))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"extract-{res['setup']}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
