"""Shared by the bench scripts (not a bench itself): peak resident set of one ``extract`` run in a fresh process.

The resident set is sampled every 20 ms from /proc/self/statm (ru_maxrss alone is dominated by torch's import
high-water mark).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def extract_peak_rss_mb(source: str, out: Path, cfg: Path, ckpt: Path, workers: int) -> float:
    """Peak RSS (MiB) of ``extract(source -> out)`` with the open_clip model ``cfg``/``ckpt`` in a subprocess."""
    code = ("import threading,time\n"
            "def rss(): return int(open('/proc/self/statm').read().split()[1])*4096/2**20\n"
            "from fedclip_cache import *\n"
            "peak=[0]; stop=[False]\n"
            "def watch():\n"
            "    while not stop[0]: peak[0]=max(peak[0],rss()); time.sleep(0.02)\n"
            "t=threading.Thread(target=watch); t.start()\n"
            f"extract(ExtractConfig(source=r'{source}', out=r'{out}', progress=False, workers={workers}, "
            f"model=ModelSpec(model_config=r'{cfg}', pretrained=r'{ckpt}'), shard_size=1024))\n"
            "stop[0]=True; t.join(); print(peak[0])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return float(res.stdout.strip().splitlines()[-1])
