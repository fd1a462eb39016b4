"""Synthetic inputs for tests, benchmarks and the quick demo: image folders, tiny open_clip models, and caches.

Nothing here downloads anything: tiny models are random-initialised from a JSON config registered with open_clip.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_tiny_model(folder: str | Path, name: str = "tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """Write ``<name>.json`` (an open_clip architecture) and ``<name>.pt`` (its random weights, fixed by seed)."""
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / f"{name}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    ckpt = folder / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    return cfg_path, ckpt


def write_image_folder(root: str | Path, domains: Sequence[str] = ("art", "photo", "sketch"),
                       classes: Sequence[str] = ("cat", "dog", "fish"), per_class: int = 4, size: int = 40,
                       seed: int = 0, ext: str = "png") -> Path:
    """A DomainBed-layout folder of small images whose colour depends on class and domain."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            (root / d / c).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                base = np.array([40 + 70 * ci, 60 + 50 * di, 120], np.float64) % 255
                img = (base + rng.normal(0, 25, (size, size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / d / c / f"{d}_{c}_{k:04d}.{ext}")
    return root


def synthetic_cache_arrays(domain_sizes: dict[str, int], num_classes: int, dim: int = 512, seed: int = 0,
                           class_sep: float = 2.0, domain_shift: float = 1.0, align_text: bool = True):
    """Features, labels, domains and text embeddings with controllable class separability and prompt alignment.

    Class means are random directions; each domain adds its own offset. With ``align_text=False`` the text
    embeddings are unrelated to the class means, so zero-shot is at chance while training can still succeed.
    """
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * class_sep
    feats, labels, doms = [], [], []
    for d, n in domain_sizes.items():
        shift = rng.normal(size=dim) * domain_shift
        y = rng.integers(0, num_classes, n)
        feats.append(means[y] + shift + rng.normal(size=(n, dim)))
        labels.append(y)
        doms += [d] * n
    text = means + rng.normal(size=means.shape) * 0.5 if align_text else rng.normal(size=means.shape)
    return (np.concatenate(feats).astype(np.float32), np.concatenate(labels).astype(np.int64),
            np.array(doms, dtype=object), text[None].astype(np.float32))


def write_synthetic_cache(out: str | Path, domain_sizes: dict[str, int], num_classes: int, dim: int = 512,
                          seed: int = 0, fmt: str = "parquet", model_params: int = 151_277_313,
                          shard_rows: int = 65_536, logit_scale: float = 100.0, **kw) -> Path:
    """A complete, committed cache folder (the same files extract writes) holding synthetic features."""
    from .cache import store
    from .cache.integrity import shard_record
    from .cache.schema import FORMAT_VERSION, complete_columns
    from .cache.sources import image_id

    feats, labels, doms, text = synthetic_cache_arrays(domain_sizes, num_classes, dim, seed, **kw)
    classes = [f"class{c:03d}" for c in range(num_classes)]
    out = Path(out)
    n = len(labels)
    paths = np.array([f"{d}/{classes[y]}/{i:06d}.jpg" for i, (d, y) in enumerate(zip(doms, labels))], dtype=object)
    cols = complete_columns({"id": np.array([image_id(p) for p in paths], dtype=object), "path": paths,
                             "domain": doms, "client": doms, "split": np.full(n, "", dtype=object), "label": labels,
                             "class_name": np.array([classes[y] for y in labels], dtype=object)}, n)
    fingerprint = {"model": "synthetic", "seed": seed}
    session = store.FIXED_SESSION
    cache_id = store.new_cache_id()
    listing = {}
    for k, start in enumerate(range(0, n, shard_rows)):
        part = slice(start, start + shard_rows)
        name = store.shard_name(session, 0, k, fmt)
        store.write_shard(out / store.SHARD_DIR / name, fmt, {c: v[part] for c, v in cols.items()}, feats[part],
                          "float32", {"fingerprint": fingerprint, "session": session, "cache_id": cache_id,
                                       "skipped": []})
        listing[name] = shard_record(out / store.SHARD_DIR / name, len(labels[part]))
    templates = ["a picture of a {}"]
    store.write_text(out, fmt, templates, classes, text)
    store.write_json(out / store.META_FILE, {
        "format_version": FORMAT_VERSION, "cache_id": cache_id, "format": fmt, "dtype": "float32", "normalised": False,
        "embedding_dim": dim, "fingerprint": fingerprint,
        "model": {"name": "synthetic", "pretrained": None, "weights": {"kind": "synthetic", "seed": seed},
                  "num_params": model_params, "logit_scale": logit_scale},
        "preprocess": {}, "precision": "fp32", "classes": classes, "templates": templates,
        "domains": sorted(domain_sizes), "counts": {"images": n, "skipped": 0}, "runs": [],
        "state": "complete", "shards": listing, "last_session": session, "skipped": [],
        "retired": {"count": 0, "paths": []}})
    return out


# ------------------------------------------------------------------ the same images as Parquet and WebDataset shards
# (extract's sources: cache/bytesources.py). Rows follow the folder's scan order (domain, class, file name).

def folder_images(root: str | Path) -> list[tuple[Path, str, str]]:
    """(file, domain, class) of every image of a DomainBed folder written by :func:`write_image_folder`, in the
    order ``extract`` scans it."""
    root = Path(root)
    return [(p, p.parent.parent.name, p.parent.name) for p in sorted(root.glob("*/*/*")) if p.is_file()]


def hf_image_schema(classes: Sequence[str]):
    """The Arrow schema of ``flwrlabs/pacs`` / ``flwrlabs/office-home`` on the Hub: ``image`` struct<bytes, path>,
    ``domain`` string, ``label`` int64 whose class names are the ClassLabel in the ``huggingface`` metadata."""
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "domain": {"dtype": "string", "_type": "Value"},
                "label": {"names": list(classes), "_type": "ClassLabel"}}
    return pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("domain", pa.string()), ("label", pa.int64())],
                     metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def write_hf_parquet(root: str | Path, out: str | Path, files: int = 2, row_group_size: int = 5,
                     prefix: str = "train") -> list[Path]:
    """The images of the folder ``root`` as Parquet files ``out/<prefix>-0000k-of-0000n.parquet`` with exactly
    ``flwrlabs/pacs``'s schema (:func:`hf_image_schema`; classes sorted as the folder's), split over ``files``
    files of small row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = folder_images(root)
    classes = sorted({c for _, _, c in images})
    schema = hf_image_schema(classes)
    recs = [{"image": {"bytes": p.read_bytes(), "path": p.name}, "domain": d, "label": classes.index(c)}
            for p, d, c in images]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(len(recs)), files)):
        path = out / f"{prefix}-{k:05d}-of-{files:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([recs[i] for i in part], schema=schema), path,
                       row_group_size=row_group_size)
        paths.append(path)
    return paths


def write_wds_shards(root: str | Path, out: str | Path, shards: int = 2) -> list[Path]:
    """The images of the folder ``root`` as WebDataset shards ``out/0000k.tar`` (img2dataset's layout): per
    image ``KEY.<ext>`` (its bytes), ``KEY.json`` ({"label": class, "domain": domain}) and ``KEY.txt``."""
    import io
    import tarfile

    images = folder_images(root)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, part in enumerate(np.array_split(np.arange(len(images)), shards)):
        path = out / f"{k:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in part.tolist():
                p, d, c = images[i]
                key = f"{i:09d}"
                for name, data in ((f"{key}{p.suffix}", p.read_bytes()),
                                   (f"{key}.json", json.dumps({"label": c, "domain": d}).encode()),
                                   (f"{key}.txt", f"a picture of a {c}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths
