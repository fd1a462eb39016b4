"""Offline demo tooling: digits builder, EfficientNet-Lite0 -> open_clip converter, scaled-down demo end to end."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / "data"
sys.path.insert(0, str(DATA))

build_digits = pytest.importorskip("build_digits")
convert_efficientnet = pytest.importorskip("convert_efficientnet")


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_digits_builder_domains_classes_counts_and_determinism(tmp_path):
    counts = build_digits.build(tmp_path / "a", per_class=3, seed=7, quiet=True)
    assert list(counts) == ["mnist", "optdigits", "fonts", "mnistm"]
    assert all(list(row) == [str(i) for i in range(10)] and set(row.values()) == {3} for row in counts.values())
    for d in counts:
        for c in range(10):
            files = list((tmp_path / "a" / d / str(c)).glob("*.png"))
            assert len(files) == 3
    from PIL import Image
    im = Image.open(next((tmp_path / "a" / "mnistm" / "3").glob("*.png")))
    assert im.mode == "RGB" and np.asarray(im).std() > 0
    build_digits.build(tmp_path / "b", per_class=3, seed=7, quiet=True)
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    build_digits.build(tmp_path / "c", per_class=3, seed=8, quiet=True)
    assert _tree_hash(tmp_path / "a") != _tree_hash(tmp_path / "c")


def test_converter_really_loads_the_package_weights(tmp_path):
    from fedclip_cache.cache.models import ModelSpec, load_model

    out = convert_efficientnet.convert(tmp_path / "enc")
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["preprocess_cfg"]["mean"] == convert_efficientnet.NORMS[convert_efficientnet.DEFAULT_NORM][0]
    lm = load_model(ModelSpec(model=f"local-dir:{out}"))
    trunk = {k: v for k, v in lm.model.visual.trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    pkg = list(convert_efficientnet.package_weights().values())
    assert len(trunk) == 245 and len(pkg) == 247  # the package's 2 extra tensors are its ImageNet classifier
    for (k, v), w in zip(trunk.items(), pkg):
        assert torch.equal(v, w), k
    assert lm.preprocess_cfg["size"] in (224, [224, 224])
    proj = lm.model.visual.head.proj.weight
    torch.testing.assert_close(proj @ proj.T, torch.eye(512), atol=1e-5, rtol=0)  # orthonormal rows
    # it is a real ImageNet network: its features separate digit classes far better than chance
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert lm.model.encode_image(x).shape == (2, 512)


@pytest.mark.slow  # ~15 s on 2 quiet cores: the scaled-down demo, every stage
def test_tiny_demo_runs_end_to_end(tmp_path, capsys):
    import demo

    res = demo.main(["--tiny", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out  # not a terminal, as in a log or CI: the tables keep every run's full name
    rows = [line for line in out.splitlines() if line.startswith("│ ")]
    assert any(r.startswith("│ prototype-only ") for r in rows) and not any("…" in r for r in rows), rows[:3]
    assert max(len(line) for line in out.splitlines() if line.startswith("──")) <= 100  # headings: terminal-wide
    assert set(res["results"]) == {"prototype-only", "fedclip", "local", "central", "fedclip-text-head"}
    for name, s in res["results"].items():
        assert len(s["experiments"]) == 4
        assert (tmp_path / "demo" / "runs" / name / "plots" / "accuracy_vs_round.png").is_file()
    proto = res["results"]["prototype-only"]["mean"]["heldout_best"]
    assert proto > 0.15  # real pretrained features: clearly above the 10 % of chance, even with 8 images a class
    assert (tmp_path / "demo" / "sweep" / "plots" / "accuracy_vs_params.png").stat().st_size > 5000
    assert len(res["sweep"]["summary"]) == 2
