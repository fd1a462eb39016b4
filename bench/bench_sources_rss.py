"""Peak RSS of ``extract`` from a folder, Parquet with image bytes and WebDataset shards of the same images, at 1k and
10k images: the bytes must stream (flat in the number of rows).

    python bench/bench_sources_rss.py [--sizes 1000 10000] [--workers 0]

Tiny random model (what is measured is the reading, not the forward); 96x96 JPEGs; the Parquet files have
flwrlabs/pacs's schema in 4 files of 100-row row groups, the WebDataset 10 shards. The resident set of the extract
process is sampled every 20 ms (ru_maxrss alone is dominated by torch's import high-water mark); ``--workers 0``
reads every byte in that process. Writes bench/results/extract-sources-rss.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from extract_rss import extract_peak_rss_mb  # bench/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent


def main():
    from fedclip_cache.synthetic import write_hf_parquet, write_image_folder, write_tiny_model, write_wds_shards

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    cfg, ckpt = write_tiny_model(tmp / "model")
    res = {"setup": "extract-sources-rss", "workers": a.workers, "load": os.getloadavg()[0]}
    for n in a.sizes:
        root = write_image_folder(tmp / f"f{n}", domains=("a", "b"), classes=tuple("cdefg"), per_class=n // 10,
                                  size=96, ext="jpg")
        write_hf_parquet(root, tmp / f"pq{n}", files=4, row_group_size=100)
        write_wds_shards(root, tmp / f"wds{n}", shards=10)
        for name, src in (("folder", root), ("parquet", tmp / f"pq{n}"),
                          ("webdataset", f"{tmp / f'wds{n}'}/{{00000..00009}}.tar")):
            res[f"{name}_{n}"] = round(extract_peak_rss_mb(str(src), tmp / f"c-{name}{n}", cfg, ckpt, a.workers), 1)
            print(name, n, res[f"{name}_{n}"], flush=True)
    lo, hi = min(a.sizes), max(a.sizes)
    for name in ("folder", "parquet", "webdataset"):
        res[f"{name}_growth"] = round(res[f"{name}_{hi}"] / res[f"{name}_{lo}"] - 1, 3)
    res["load_after"] = os.getloadavg()[0]
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "extract-sources-rss.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
