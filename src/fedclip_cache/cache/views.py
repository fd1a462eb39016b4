"""Cached augmented views: ``extract --views K`` stores, besides the deterministic evaluation view (view 0, the
model's own preprocessing), K-1 seeded augmented views of every image.

The recipe (``--augment``) is a comma-separated list of steps, applied to the decoded image before the model's own
normalisation; the geometric part of the model's preprocessing (resize + center crop) is replaced by the crop:

* ``rrc=LO-HI``   RandomResizedCrop to the model's input size with the model's interpolation, area scale in
  [LO, HI] (default 0.5-1, as PromptFL / CoOp / FedOTP train; torchvision's own default is 0.08-1);
* ``ratio=LO-HI`` aspect-ratio range of the crop (default 3/4-4/3, torchvision's);
* ``flip`` / ``flip=P``  horizontal flip with probability P (default 0.5);
* ``jitter=S``    colour jitter: brightness, contrast and saturation factors drawn from [1-S, 1+S] (default off).

View k >= 1 of an image depends only on (``--augment-seed``, the image's id -- a hash of its path in the dataset --,
k): never on batches, workers, ranks or resume order. This module parses recipes without importing torch (the CLI,
``info`` and pipelines check them cheaply); the transform itself runs in the DataLoader workers.
"""
from __future__ import annotations

import hashlib
import math
from typing import Optional

from ..errors import FedclipCacheError

DEFAULT_AUGMENT = "rrc=0.5-1,flip"
DEFAULT_RATIO = (3 / 4, 4 / 3)
STEPS = ("rrc", "ratio", "flip", "jitter")


class AugmentError(FedclipCacheError, ValueError):
    """A bad ``--views`` / ``--augment`` / ``--augment-seed``; the message names the option and the fix."""


def _range(step: str, raw: str, spec: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in raw.split("-", 1))
    except ValueError:
        raise AugmentError(f"--augment {spec!r}: {step}={raw!r} takes a range LO-HI, e.g. {step}=0.5-1") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
        raise AugmentError(f"--augment {spec!r}: {step}={raw!r} needs 0 < LO <= HI")
    return lo, hi


def parse_augment(spec: str) -> dict:
    """``rrc=0.5-1,flip`` -> {"rrc": [0.5, 1.0], "ratio": [0.75, 1.333..], "flip": 0.5, "jitter": 0.0} (every step
    present, so that two spellings of one recipe compare equal). Raises :class:`AugmentError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise AugmentError(f"--augment {spec!r}: give steps such as {DEFAULT_AUGMENT!r}")
    out: dict = {"rrc": None, "ratio": list(DEFAULT_RATIO), "flip": 0.0, "jitter": 0.0}
    seen = set()
    for part in (p.strip() for p in spec.split(",")):
        step, _, raw = part.partition("=")
        step = step.strip().lower()
        if step not in STEPS:
            raise AugmentError(f"--augment {spec!r}: unknown step {step or part!r}; use rrc=LO-HI, ratio=LO-HI, "
                               f"flip[=P], jitter=S (e.g. {DEFAULT_AUGMENT!r})")
        if step in seen:
            raise AugmentError(f"--augment {spec!r}: step {step!r} given twice")
        seen.add(step)
        raw = raw.strip()
        if step in ("rrc", "ratio"):
            lo, hi = _range(step, raw, spec)
            if step == "rrc" and hi > 1:
                raise AugmentError(f"--augment {spec!r}: rrc={raw!r}: the crop's area scale is at most 1")
            out[step] = [lo, hi]
        else:
            try:
                v = float(raw) if raw else (0.5 if step == "flip" else float("nan"))
            except ValueError:
                v = float("nan")
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise AugmentError(f"--augment {spec!r}: {step}={raw!r} takes a number in [0, 1]"
                                   + (", e.g. jitter=0.4" if step == "jitter" else ""))
            out[step] = v
    if out["rrc"] is None:
        if "ratio" in seen:
            raise AugmentError(f"--augment {spec!r}: ratio= only shapes the random crop; add rrc=LO-HI")
        out["ratio"] = None
    if out["rrc"] is None and not out["flip"] and not out["jitter"]:
        raise AugmentError(f"--augment {spec!r}: this recipe changes nothing, every view would equal view 0")
    return out


def recipe_text(recipe: dict) -> str:
    """The canonical spelling of a parsed recipe (what ``info`` shows)."""
    parts = []
    if recipe.get("rrc"):
        parts.append(f"rrc={recipe['rrc'][0]:g}-{recipe['rrc'][1]:g}")
        if [round(x, 6) for x in recipe["ratio"]] != [round(x, 6) for x in DEFAULT_RATIO]:
            parts.append(f"ratio={recipe['ratio'][0]:g}-{recipe['ratio'][1]:g}")
    if recipe.get("flip"):
        parts.append("flip" if recipe["flip"] == 0.5 else f"flip={recipe['flip']:g}")
    if recipe.get("jitter"):
        parts.append(f"jitter={recipe['jitter']:g}")
    return ",".join(parts)


MAX_VIEWS = 256  # K x 3 x 224 x 224 float32 = 154 MB for one image at K = 256: beyond that, memory, not data


def view_seed(seed: int, image_id: str, k: int) -> int:
    """The seed of view ``k`` of image ``image_id``: a hash, so that it depends on nothing else."""
    h = hashlib.blake2b(f"{seed}/{image_id}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------- the transform

_GEOMETRIC = {"Resize", "CenterCrop", "ResizeKeepRatio", "CenterCropOrPad", "ResizeMaxSize", "RandomResizedCrop"}


class AugmentedView:
    """``view(img, image_id, k)`` -> the model-ready tensor of augmented view k. Picklable (DataLoader workers).

    The model's preprocessing minus its geometric steps (resize, center crop) is kept as the tail: the crop is
    resized to the model's input size with the model's interpolation, then the tail converts and normalises."""

    def __init__(self, preprocess, preprocess_cfg: dict, recipe: dict, seed: int):
        steps = list(getattr(preprocess, "transforms", []))
        geo = [i for i, t in enumerate(steps) if type(t).__name__ in _GEOMETRIC]
        if not geo:
            raise AugmentError("the model's preprocessing has no resize/crop step to replace with the augmented "
                               "crop; extract without --views")
        self.tail = steps[geo[-1] + 1:]
        size = preprocess_cfg.get("size", 224)
        self.size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.interpolation = str(preprocess_cfg.get("interpolation", "bicubic"))
        self.recipe, self.seed = recipe, seed

    def params(self, width: int, height: int, image_id: str, k: int) -> dict:
        """The random draws of view k (crop box, flip, jitter factors), from its own generator."""
        import torch

        g = torch.Generator().manual_seed(view_seed(self.seed, image_id, k))
        r = self.recipe
        out: dict = {"box": None, "flip": False, "jitter": None}
        if r.get("rrc"):
            out["box"] = _rrc_box(g, width, height, r["rrc"], r["ratio"])
        if r.get("flip"):
            out["flip"] = bool(torch.rand(1, generator=g).item() < r["flip"])
        if r.get("jitter"):
            s = r["jitter"]
            out["jitter"] = [float(1 - s + 2 * s * torch.rand(1, generator=g).item()) for _ in range(3)]
        return out

    def __call__(self, img, image_id: str, k: int):
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        p = self.params(img.width, img.height, image_id, k)
        mode = InterpolationMode(self.interpolation)
        if p["box"] is not None:
            i, j, h, w = p["box"]
            img = TF.resized_crop(img, i, j, h, w, self.size, interpolation=mode, antialias=True)
        else:  # no crop step: the model's own resize + center crop
            img = TF.center_crop(TF.resize(img, min(self.size), interpolation=mode, antialias=True), self.size)
        if p["flip"]:
            img = TF.hflip(img)
        if p["jitter"] is not None:
            b, c, s = p["jitter"]
            img = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(img, b), c), s)
        for t in self.tail:
            img = t(img)
        return img


def _rrc_box(g, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (same algorithm: 10 tries, then a center crop of the clamped
    aspect ratio), drawing from the generator ``g`` instead of the global RNG."""
    import torch

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(1, generator=g).item())
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand(1, generator=g).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
            j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resolve(meta_views: Optional[dict], views: Optional[int], augment: Optional[str],
            augment_seed: Optional[int], cache: str = "") -> dict:
    """The views of this run: {"count": K, "augment": recipe or None, "seed": s}. ``None`` options keep the
    cache's own settings (or the defaults for a new / single-view cache). Refuses what would mix recipes or drop
    views, with one line naming the option and the fix."""
    old = meta_views or {"count": 1}
    old_k = int(old.get("count", 1))
    k = old_k if views is None else views
    if k < old_k:
        raise AugmentError(f"--views {k}: the cache {cache} holds {old_k} views per image and views are never "
                           f"dropped; pass --views {old_k} (or leave it out), use fewer at training time with "
                           f"`federate --train-views {k}`, or extract into a new folder")
    recipe = parse_augment(augment) if augment is not None else None
    if old_k >= 2:
        if recipe is not None and recipe != old["augment"]:
            raise AugmentError(f"--augment {augment!r}: the cache {cache} holds views made with "
                               f"{recipe_text(old['augment'])!r}; mixing recipes would make views incomparable: "
                               f"leave --augment out, or extract into a new folder")
        if augment_seed is not None and augment_seed != old.get("seed"):
            raise AugmentError(f"--augment-seed {augment_seed}: the cache {cache} holds views made with seed "
                               f"{old.get('seed')}; leave --augment-seed out, or extract into a new folder")
        return {"count": k, "augment": old["augment"], "seed": old.get("seed", 0)}
    if k == 1:
        if augment is not None or augment_seed is not None:
            flag = "--augment" if augment is not None else "--augment-seed"
            raise AugmentError(f"{flag} only applies with --views 2 or more (the cache {cache} has 1 view); add "
                               f"--views K")
        return {"count": 1}
    return {"count": k, "augment": recipe or parse_augment(DEFAULT_AUGMENT),
            "seed": 0 if augment_seed is None else augment_seed}
