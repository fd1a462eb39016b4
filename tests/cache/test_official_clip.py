"""Features identical to OpenAI's own CLIP code: the activation (QuickGELU for tags trained with it), its record in
the provenance and fingerprint, resume refusal on an activation change, and unsafe checkpoints refused in one line.

OpenAI's reference code is PyPI ``clip-anytorch`` (package ``clip``). Its ``clip/__init__`` imports
``pkg_resources`` only for a torch version warning, and setuptools >= 81 no longer ships ``pkg_resources``; we stand
in a minimal shim (``pkg_resources.packaging`` = the ``packaging`` package) for the import, only when the real one is
missing, and remove it again after.
"""
import importlib
import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedclip_cache import open_cache
from fedclip_cache.cli import app, main
from fedclip_cache.cache.models import ModelLoadError, ModelSpec, built_activation, load_model

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def extract_ok(*args):
    res = cli("extract", *args, "--workers", "0", "-q")
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def openai_clip(monkeypatch):
    """OpenAI's CLIP package (``clip.model``, ``clip.clip``), importable without ``pkg_resources``."""
    try:
        importlib.import_module("pkg_resources")
    except ImportError:
        import packaging.version

        shim = types.ModuleType("pkg_resources")
        shim.packaging = packaging
        monkeypatch.setitem(sys.modules, "pkg_resources", shim)
    clip = pytest.importorskip("clip", reason="clip-anytorch (OpenAI's CLIP code) is in the test extra")
    import clip.clip
    import clip.model

    return clip


def _images(root: Path, n: int = 5) -> Path:
    """A few RGB photos-like images of different sizes and aspect ratios (resize + centre crop both matter)."""
    rng = np.random.default_rng(0)
    sizes = [(320, 240), (240, 320), (224, 224), (500, 300), (180, 260)][:n]
    for i, (w, h) in enumerate(sizes):
        d = root / "photo" / ("cat" if i % 2 else "dog")
        d.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (7 + i)), np.cos(yy / (11 + i)), np.sin((xx + yy) / 13)], -1) * 80 + 128
        img = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    return root


def _plant_hf_checkpoint(hub: Path, repo: str, state_dict: dict) -> Path:
    """Put a checkpoint where huggingface_hub's offline cache lookup finds it: refs/main + snapshots/<hash>/."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    torch.save(state_dict, snap / "open_clip_pytorch_model.bin")
    return snap / "open_clip_pytorch_model.bin"


@pytest.mark.slow  # > 10 s on 2 quiet cores (subprocesses or a ViT-B/32-sized model)
def test_openai_tag_builds_quickgelu_and_equals_openai_clip(tmp_path, monkeypatch, openai_clip):
    """Full-size ViT-B/32 with random fp16 weights in OpenAI's format, served as tag ``openai`` from an offline
    Hugging Face cache: extract must build QuickGELU, and its features must equal OpenAI's ``build_model`` +
    ``_transform(224)`` features."""
    import open_clip
    import huggingface_hub.constants as hfc

    t0 = time.perf_counter()
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert cfg["quick_gelu"] is True and cfg["hf_hub"].startswith("timm/vit_base_patch32_clip_224.openai")

    # Random OpenAI-format weights (ViT-B/32 shapes), rounded to fp16 like OpenAI's release.
    torch.manual_seed(0)
    ref = openai_clip.model.CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(100.0))
    sd = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    del ref
    hub = tmp_path / "hf" / "hub"
    planted = _plant_hf_checkpoint(hub, cfg["hf_hub"].rstrip("/"), sd)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    root = _images(tmp_path / "data")
    out = tmp_path / "cache"
    extract_ok(root, out, "--model", "ViT-B-32", "--pretrained", "openai", "--device", "cpu", "--precision", "fp32")
    c = open_cache(out)
    assert c.meta["fingerprint"]["activation"] == "quick_gelu"
    assert c.meta["model"]["activation"] == "quick_gelu" and "openai" in c.meta["model"]["activation_source"]
    assert c.meta["model"]["num_params"] == 151_277_313
    assert c.meta["model"]["logit_scale"] == pytest.approx(100.0, rel=1e-3)  # exp of fp16-rounded log(100)

    # OpenAI's own code, same weights, its own preprocessing; clip.load on CPU runs the model as float32.
    official = openai_clip.model.build_model({k: v.clone() for k, v in sd.items()}).float().eval()
    del sd
    pre = openai_clip.clip._transform(224)
    x = torch.stack([pre(Image.open(root / p)) for p in c.paths])
    with torch.inference_mode():
        want = official.encode_image(x).float().numpy()
        want_txt = official.encode_text(openai_clip.tokenize([f"a picture of a {k}" for k in c.classes])).numpy()
    rel = np.abs(c.features - want).max() / np.abs(want).max()
    rel_txt = np.abs(c.text_embeddings[0] - want_txt).max() / np.abs(want_txt).max()
    print(f"max relative difference vs OpenAI's CLIP: image {rel:.2e}, text {rel_txt:.2e}")
    assert rel < 5e-6 and rel_txt < 5e-6

    # The comparison is sensitive to the activation: the same model with nn.GELU is far off.
    for block in [*official.visual.transformer.resblocks, *official.transformer.resblocks]:
        block.mlp.gelu = torch.nn.GELU()
    with torch.inference_mode():
        gelu = official.encode_image(x).numpy()
    assert np.abs(c.features - gelu).max() / np.abs(want).max() > 1e-3
    planted.unlink()  # 300 MB: do not leave it in pytest's kept temporary folders
    assert time.perf_counter() - t0 < 300


def _tiny_openai_format(folder: Path, quick_gelu: bool):
    """A small ViT in OpenAI's layout (heads of width 64, as clip.model.build_model infers), as an open_clip JSON."""
    cfg = {"embed_dim": 64, "quick_gelu": quick_gelu,
           "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
    name = "tiny-openai-qg" if quick_gelu else "tiny-openai-gelu"
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def test_small_architecture_equals_openai_clip_and_activation_recorded(tmp_path, openai_clip):
    """The same comparison at a small size, through a checkpoint file: the JSON's quick_gelu is honoured, and the
    override flags win over it."""
    torch.manual_seed(1)
    ref = openai_clip.model.CLIP(64, 64, 2, 128, 16, 77, 49408, 128, 2, 2)
    sd = {k: v.half().float() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ckpt = tmp_path / "w.pt"
    torch.save(sd, ckpt)
    root = _images(tmp_path / "data")
    qg = _tiny_openai_format(tmp_path, True)
    extract_ok(root, tmp_path / "qg", "--model-config", qg, "--pretrained", ckpt, "--image-mean",
               "0.48145466,0.4578275,0.40821073", "--image-std", "0.26862954,0.26130258,0.27577711")
    c = open_cache(tmp_path / "qg")
    assert c.meta["fingerprint"]["activation"] == "quick_gelu"
    official = openai_clip.model.build_model(dict(sd)).float().eval()
    pre = openai_clip.clip._transform(64)
    x = torch.stack([pre(Image.open(root / p)) for p in c.paths])
    with torch.inference_mode():
        want = official.encode_image(x).numpy()
    assert np.abs(c.features - want).max() / np.abs(want).max() < 1e-5

    # a config without quick_gelu builds GELU; --quick-gelu asks for it explicitly; --no-quick-gelu overrides JSON
    gelu_cfg = _tiny_openai_format(tmp_path, False)
    assert load_model(ModelSpec(model_config=str(gelu_cfg), pretrained=str(ckpt))).activation == "gelu"
    lm = load_model(ModelSpec(model_config=str(gelu_cfg), pretrained=str(ckpt), quick_gelu=True))
    assert lm.activation == "quick_gelu" and lm.fingerprint()["activation"] == "quick_gelu"
    lm = load_model(ModelSpec(model_config=str(qg), pretrained=str(ckpt), quick_gelu=False))
    assert lm.activation == "gelu" and built_activation(lm.model) == "gelu"


def test_resume_with_another_activation_is_refused(tmp_path, image_root, model_args):
    out = tmp_path / "c"
    extract_ok(image_root, out, *model_args)
    meta = json.loads((out / "cache.json").read_text())
    assert meta["fingerprint"]["activation"] == "gelu" and meta["model"]["activation"] == "gelu"
    res = cli("extract", image_root, out, *model_args, "--quick-gelu", "--workers", "0", "-q")
    assert res.exit_code != 0
    msg = str(res.exception)
    assert "different activation" in msg and "'quick_gelu'" in msg and "new output folder" in msg
    # an old cache with no activation recorded is refused the same way
    del meta["fingerprint"]["activation"]
    (out / "cache.json").write_text(json.dumps(meta))
    res = cli("extract", image_root, out, *model_args, "--workers", "0", "-q")
    assert res.exit_code != 0 and "different activation" in str(res.exception)
    assert "before the activation was recorded" in str(res.exception)


class Gadget:
    """Stands for the payload of a malicious pickle: any non-tensor global is refused under weights_only."""

    def __init__(self):
        self.x = 1


def test_checkpoint_refused_by_weights_only_is_a_one_line_error(tmp_path, image_root, tiny_model, capsys,
                                                                monkeypatch):
    cfg, ckpt = tiny_model
    bad = tmp_path / "evil.pt"
    sd = torch.load(ckpt)
    sd["payload"] = Gadget()
    torch.save(sd, bad)
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelSpec(model_config=str(cfg), pretrained=str(bad)))
    msg = str(e.value)
    assert str(bad) in msg and "refused" in msg and "Gadget" in msg and "\n" not in msg
    monkeypatch.setattr(sys, "argv", ["fedclip-cache", "extract", str(image_root), str(tmp_path / "c"),
                                      "--model-config", str(cfg), "--pretrained", str(bad), "-q"])
    with pytest.raises(SystemExit) as ex:
        main()
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "refused to load" in err and "evil.pt" in err
    # a TorchScript archive (the form of OpenAI's original ViT-B-32.pt) is refused the same way, with the fix
    ts = tmp_path / "ts.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelSpec(model_config=str(cfg), pretrained=str(ts)))
    assert str(ts) in str(e.value) and "TorchScript" in str(e.value) and "\n" not in str(e.value)
