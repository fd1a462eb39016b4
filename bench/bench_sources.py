"""Benchmark: extract sources on the SAME images (not a test).

    python bench/bench_sources.py [--images 2000] [--size 256] [--model tiny|ViT-B-32] [--repeat 3]
    python bench/bench_sources.py --decode-only          # no extract: reading + decoding alone

One set of generated JPEGs (4 domains x 7 classes) is written three ways:
  folder   DomainBed layout ROOT/<domain>/<class>/<name>.jpg
  parquet  flwrlabs/pacs's schema: image struct<bytes, path>, domain string, label int64 (ClassLabel names in the
           schema's ``huggingface`` metadata), two files under data/, row groups of 100 rows (as `datasets` writes
           image datasets)
  wds      WebDataset shards as img2dataset writes them: {00000..0000K}.tar of KEY.jpg + KEY.json + KEY.txt
and measured per source:
  read     the image bytes alone (file reads / Parquet column batches / tar members), images/s
  decode   read + the pipeline's decoder (cache.imageio.open_rgb: full decode to RGB), images/s, one process;
           and the decoder alone on the same bytes read beforehand (decode_in_memory)
  pipeline `extract` of the whole source (DataLoader workers, preprocess, encode, shards), steady-state images/s
           (report.embedded / report.loop_seconds) and end to end, in a fresh process per run, with its peak RSS
Every rate is also given per CPU second (``*_img_cpu_s``: this process, and for extract its reaped workers too):
on a shared machine the wall-clock rates follow the load, the CPU cost of a source does not.
Peak RSS at 1k vs 10k images per source: bench/bench_sources_rss.py.
Runs are interleaved (folder, parquet, wds, folder, ...) --repeat times; the median is reported. The source forms
other than the folder need the extract sources of issue 21 (fedclip_cache.cache.bytesources).
Writes bench/results/sources-<setup>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
from PIL import Image

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]  # PACS's 7
DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
SOURCES = ("folder", "parquet", "wds")


class Sample(NamedTuple):
    domain: str
    label: int
    name: str
    data: bytes  # JPEG bytes


def make_samples(n: int, size: int = 256, seed: int = 0) -> list[Sample]:
    """n photo-like JPEGs (smooth image + noise, different per image), spread over domains and classes."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        img = Image.fromarray(np.roll(base, i, axis=(0, 1))).resize((size, size), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (size, size, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(Sample(DOMAINS[i % 4], i % 7, f"{i:06d}.jpg", buf.getvalue()))
    return out


def write_folder(samples: list[Sample], root: Path) -> str:
    for s in samples:
        d = root / s.domain / CLASSES[s.label]
        d.mkdir(parents=True, exist_ok=True)
        (d / s.name).write_bytes(s.data)
    return str(root)


def pacs_schema():
    """flwrlabs/pacs's Parquet schema, with the `datasets` features in the ``huggingface`` metadata."""
    import pyarrow as pa

    features = {"image": {"_type": "Image"}, "domain": {"dtype": "string", "_type": "Value"},
                "label": {"names": CLASSES, "_type": "ClassLabel"}}
    fields = [pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
              pa.field("domain", pa.string()), pa.field("label", pa.int64())]
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def write_parquet(samples: list[Sample], root: Path, files: int = 2, row_group: int = 100) -> str:
    """The Hub's layout: ROOT/data/train-0000i-of-0000N.parquet; returns ROOT/data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(len(samples)), files)):
        rows = [samples[i] for i in part]
        table = pa.table({"image": [{"bytes": s.data, "path": s.name} for s in rows],
                          "domain": [s.domain for s in rows], "label": [s.label for s in rows]}, schema=pacs_schema())
        pq.write_table(table, data / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=row_group)
    return str(data)


def write_wds(samples: list[Sample], root: Path, per_shard: int = 1000) -> str:
    """img2dataset's output: {00000..}.tar with KEY.jpg, KEY.json (label as class name, domain), KEY.txt; returns
    the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    shards = (len(samples) + per_shard - 1) // per_shard
    for k in range(shards):
        with tarfile.open(root / f"{k:05d}.tar", "w") as tf:
            for j, s in enumerate(samples[k * per_shard:(k + 1) * per_shard]):
                key = f"{k:05d}{j:04d}"
                meta = {"key": key, "caption": f"a {CLASSES[s.label]}", "label": CLASSES[s.label], "domain": s.domain,
                        "status": "success"}
                for ext, payload in (("jpg", s.data), ("json", json.dumps(meta).encode()),
                                     ("txt", meta["caption"].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return f"{root}/{{00000..{shards - 1:05d}}}.tar"


def build(samples: list[Sample], root: Path) -> dict[str, str]:
    """The three sources of the same images: name -> what `extract` is given."""
    return {"folder": write_folder(samples, root / "folder"), "parquet": write_parquet(samples, root / "parquet"),
            "wds": write_wds(samples, root / "wds")}


# ------------------------------------------------------------------------------------ reading and decoding alone
def read_folder(src: str) -> Iterator[bytes]:
    for p in sorted(Path(src).rglob("*.jpg")):
        yield p.read_bytes()


def read_parquet(src: str) -> Iterator[bytes]:
    import pyarrow.parquet as pq

    for f in sorted(Path(src).glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(batch_size=100, columns=["image"]):
            yield from batch.column(0).field("bytes").to_pylist()


def read_wds(src: str) -> Iterator[bytes]:
    root, _, pattern = src.rpartition("/")
    lo, hi = pattern.strip("{}.tar").split("..")
    for k in range(int(lo), int(hi) + 1):
        with tarfile.open(f"{root}/{k:05d}.tar") as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    yield tf.extractfile(m).read()


READERS: dict[str, Callable[[str], Iterator[bytes]]] = {"folder": read_folder, "parquet": read_parquet,
                                                         "wds": read_wds}


class Rate(NamedTuple):
    img_s: float  # images per wall-clock second
    img_cpu_s: float  # images per CPU second of this process (what the work costs, whatever the machine's load)


def rate(images: Iterator) -> Rate:
    t, c = time.perf_counter(), time.process_time()
    n = sum(1 for _ in images)
    return Rate(n / (time.perf_counter() - t), n / (time.process_time() - c))


def rate_read(kind: str, src: str) -> Rate:
    return rate(READERS[kind](src))


def rate_decode(kind: str, src: str, in_memory: bool = False) -> Rate:
    """Read + decode, streamed; ``in_memory``: the bytes read first, only the decoding timed."""
    from fedclip_cache.cache.imageio import open_rgb

    images = list(READERS[kind](src)) if in_memory else READERS[kind](src)
    return rate(open_rgb("bench", data=data) for data in images)


# ------------------------------------------------------------------------------------ the whole pipeline
def run_extract(src: str, out: Path, model: dict, workers: int, batch: int, device: str) -> dict:
    """``extract`` in a fresh process; its rates and the main process's peak resident set (sampled every 20 ms:
    ru_maxrss alone is dominated by torch's import high-water mark)."""
    code = ("import json,threading,time\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1])*4096/2**20\n"
            "from fedclip_cache import ExtractConfig, ModelSpec, extract\n"
            "peak=[0]; stop=[False]\n"
            "def watch():\n"
            "    while not stop[0]: peak[0]=max(peak[0],rss()); time.sleep(0.02)\n"
            "t=threading.Thread(target=watch); t.start()\n"
            "import resource\n"
            "def cpu(): return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF), "
            "resource.getrusage(resource.RUSAGE_CHILDREN)))\n"
            "c0=cpu()\n"
            f"spec=ModelSpec(**{model!r})\n"
            f"rep=extract(ExtractConfig(source={src!r}, out={str(out)!r}, progress=False, workers={workers}, "
            f"batch_size={batch}, device={device!r}, model=spec, shard_size=1024))\n"
            "stop[0]=True; t.join(); c1=cpu()\n"
            "print(json.dumps({'embedded': rep.embedded, 'img_s': rep.embedded / rep.loop_seconds, "
            "'end_to_end_img_s': rep.embedded / rep.seconds, 'img_cpu_s': rep.embedded / (c1 - c0), "
            "'peak_rss_mb': peak[0]}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode:
        raise SystemExit(f"extract of {src} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def model_spec(name: str, tmp: Path) -> dict:
    """ModelSpec arguments: the tiny random open_clip model, or an open_clip architecture with random weights."""
    if name != "tiny":
        return {"model": name, "pretrained": None}
    from fedclip_cache.synthetic import write_tiny_model

    cfg, ckpt = write_tiny_model(tmp / "model")
    return {"model_config": str(cfg), "pretrained": str(ckpt)}


def medians(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0] if k != "embedded"}


def measure(sources: dict[str, str], a, tmp: Path) -> dict:
    out: dict = {k: {"read": [], "decode": [], "memory": [], "pipeline": []} for k in sources}
    model = None if a.decode_only else model_spec(a.model, tmp)
    for r in range(a.repeat):
        for kind, src in sources.items():
            out[kind]["read"].append(rate_read(kind, src))
            out[kind]["decode"].append(rate_decode(kind, src))
            out[kind]["memory"].append(rate_decode(kind, src, in_memory=True))
            if model is not None:
                res = run_extract(src, tmp / f"cache-{kind}-{r}", model, a.workers, a.batch, a.device)
                assert res["embedded"] == a.images, (kind, res)
                out[kind]["pipeline"].append(res)
    return {k: {"read_img_s": round(statistics.median(r.img_s for r in v["read"]), 1),
                "read_img_cpu_s": round(statistics.median(r.img_cpu_s for r in v["read"]), 1),
                "decode_img_s": round(statistics.median(r.img_s for r in v["decode"]), 1),
                "decode_img_cpu_s": round(statistics.median(r.img_cpu_s for r in v["decode"]), 1),
                "decode_in_memory_img_cpu_s": round(statistics.median(r.img_cpu_s for r in v["memory"]), 1),
                **({"pipeline": medians(v["pipeline"])} if v["pipeline"] else {})} for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--model", default="tiny", help="tiny (random tiny open_clip: the sources dominate) or an "
                                                     "open_clip name (random init)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--decode-only", action="store_true", help="read and decode alone; no extract")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    t = time.perf_counter()
    sources = {k: v for k, v in build(make_samples(a.images, a.size), tmp / "data").items()
               if k in a.sources.split(",")}
    built = time.perf_counter() - t
    res = {"setup": f"{'decode' if a.decode_only else a.model + '-' + a.device}-{a.images}img-{a.size}px",
           "machine": platform.machine(), "cpus": os.cpu_count(), "images": a.images, "size": a.size,
           "workers": a.workers, "batch": a.batch, "repeat": a.repeat, "build_s": round(built, 1),
           "load_before": os.getloadavg()[0], "sources": measure(sources, a, tmp)}
    res["load_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"sources-{res['setup']}.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
