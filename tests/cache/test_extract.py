"""Extract stage: correctness of stored embeddings, formats, resume after a crash, growth, bad files."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedclip_cache import open_cache
from fedclip_cache.cli import app, main
from fedclip_cache.cache.models import ModelSpec, load_model
from fedclip_cache.cache.store import CacheError
from fedclip_cache.synthetic import write_image_folder

runner = CliRunner()


def run_cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def fail_cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code != 0
    return res


def extract(src, out, model_args, *extra):
    res = run_cli("extract", src, out, *model_args, "--workers", "0", "-q", *extra)
    assert res.exit_code == 0, res.output
    return res


def direct_embeddings(tiny_model, root, rel_paths):
    cfg, ckpt = tiny_model
    lm = load_model(ModelSpec(model_config=str(cfg), pretrained=str(ckpt)))
    x = torch.stack([lm.preprocess(Image.open(root / p).convert("RGB")) for p in rel_paths])
    with torch.inference_mode():
        return lm, lm.model.encode_image(x).numpy()


def test_rows_ids_and_embeddings_match_direct_encode(tmp_path, image_root, tiny_model, model_args):
    extract(image_root, tmp_path / "c", model_args)
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 and c.features.shape == (36, 32) and c.features.dtype == np.float32
    assert len(set(c.ids.tolist())) == 36
    assert c.domain_names == ["art", "photo", "sketch"] and c.classes == ["cat", "dog", "fish"]
    assert (c.labels == np.array([c.classes.index(n) for n in c.class_names])).all()
    lm, direct = direct_embeddings(tiny_model, image_root, c.paths)
    np.testing.assert_allclose(c.features, direct, rtol=1e-4, atol=1e-5)
    # raw, not L2-normalised
    assert not np.allclose(np.linalg.norm(c.features, axis=1), 1.0)
    with torch.inference_mode():
        txt = lm.model.encode_text(lm.tokenizer([f"a picture of a {k}" for k in c.classes])).numpy()
    assert c.templates == ["a picture of a {}"] and c.text_embeddings.shape == (1, 3, 32)
    np.testing.assert_allclose(c.text_embeddings[0], txt, rtol=1e-4, atol=1e-5)
    prov = c.meta
    assert prov["model"]["weights"]["kind"] == "file" and len(prov["model"]["weights"]["sha256"]) == 64
    assert prov["preprocess"]["size"] == [32, 32] and prov["normalised"] is False
    assert prov["model"]["num_params"] == sum(p.numel() for p in lm.model.parameters())


def test_parquet_and_hdf5_give_identical_arrays(tmp_path, image_root, model_args):
    extract(image_root, tmp_path / "p", model_args, "--format", "parquet")
    extract(image_root, tmp_path / "h", model_args, "--format", "hdf5")
    p, h = open_cache(tmp_path / "p"), open_cache(tmp_path / "h")
    assert (tmp_path / "h" / "text.h5").is_file() and list((tmp_path / "h" / "shards").glob("*.h5"))
    np.testing.assert_array_equal(p.features, h.features)
    np.testing.assert_array_equal(p.text_embeddings, h.text_embeddings)
    for col in ("ids", "paths", "domains", "clients", "labels"):
        assert (getattr(p, col) == getattr(h, col)).all(), col


def test_float16_storage_and_several_templates(tmp_path, image_root, model_args):
    tf = tmp_path / "templates.txt"
    tf.write_text("a photo of a {}\n\na sketch of a {}\n")
    extract(image_root, tmp_path / "c", model_args, "--dtype", "float16", "--template", "a picture of a {}",
            "--templates-file", tf)
    extract(image_root, tmp_path / "ref", model_args)
    c, ref = open_cache(tmp_path / "c"), open_cache(tmp_path / "ref")
    assert c.templates == ["a picture of a {}", "a photo of a {}", "a sketch of a {}"]
    assert c.text_embeddings.shape == (3, 3, 32)
    np.testing.assert_allclose(c.text_embeddings[0], ref.text_embeddings[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c.features, ref.features, rtol=2e-3, atol=2e-3)
    assert c.meta["dtype"] == "float16"


@pytest.mark.slow  # > 10 s on 2 quiet cores (subprocesses or a ViT-B/32-sized model)
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, tiny_model, model_args, kill_after_shards):
    root = write_image_folder(tmp_path / "data", per_class=8)  # 72 images
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(root), str(out), *model_args,
           "--workers", "0", "-q", "--batch-size", "4", "--shard-size", "4"]
    committed = kill_after_shards(cmd, out)
    assert 3 <= committed < 18, "the kill must land mid-run"
    with pytest.raises(CacheError, match="incomplete cache: the extract that was writing it stopped"):
        open_cache(out)  # never used silently
    partial = open_cache(out, allow_incomplete=True)
    assert 0 < len(partial) < 72 and not partial.complete  # but valid and readable on request
    cid = json.loads((out / "cache.json").read_text())["cache_id"]  # a killed shard write leaves this name:
    (out / "shards" / f".fedclip-tmp-{cid}.part-20260101T000000000000-r000-00099.parquet.abc12345.tmp").write_bytes(
        b"half a shard")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    assert not list((out / "shards").glob(".*.tmp"))  # leftovers of the killed write are cleaned up
    resumed = open_cache(out)
    assert len(resumed) == 72 and len(set(resumed.ids.tolist())) == 72
    assert len(list((out / "shards").glob("*.parquet"))) == 18  # nothing was extracted twice
    extract(root, tmp_path / "clean", model_args)
    clean = open_cache(tmp_path / "clean")
    assert (resumed.paths == clean.paths).all()
    np.testing.assert_allclose(resumed.features, clean.features, rtol=1e-5, atol=1e-6)


def test_rerun_skips_and_growth_adds_only_new(tmp_path, model_args):
    root = write_image_folder(tmp_path / "data", domains=("art", "photo"))
    out = tmp_path / "c"
    extract(root, out, model_args)
    res = extract(root, out, model_args)
    assert "+0 embedded" in res.output and "24 already cached" in res.output
    write_image_folder(tmp_path / "more", domains=("sketch",), classes=("cat", "zebra"), seed=5)
    os.rename(tmp_path / "more" / "sketch", root / "sketch")
    res = extract(root, out, model_args)
    assert "+8 embedded" in res.output
    c = open_cache(out)
    assert len(c) == 32 and c.classes == ["cat", "dog", "fish", "zebra"]
    assert c.text_embeddings.shape == (1, 4, 32)
    assert (c.class_names[c.labels == 3] == "zebra").all() and (c.labels == 3).sum() == 4
    # a changed file is re-extracted and supersedes its old row
    f = root / "art" / "cat" / "art_cat_0000.png"
    Image.new("RGB", (40, 40), (255, 0, 0)).save(f)
    res = extract(root, out, model_args)
    assert "+1 embedded" in res.output and "1 changed" in res.output
    c2 = open_cache(out)
    assert len(c2) == 32
    i = list(c2.paths).index("art/cat/art_cat_0000.png")
    assert not np.allclose(c2.features[i], c.features[i])


def _bad_files(root):
    d = root / "art" / "cat"
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("definitely not a png")
    good = d / "art_cat_0000.png"
    (d / "truncated.jpg").write_bytes(b"")
    Image.open(good).convert("RGB").save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "full.jpg").unlink()
    Image.open(good).convert("CMYK").save(d / "cmyk.jpg")
    Image.open(good).convert("P").save(d / "palette.png")
    arr = (np.asarray(Image.open(good).convert("L"), np.uint16) * 257)
    Image.fromarray(arr.astype(np.uint16)).save(d / "sixteen.png")
    (d / "notes.txt").write_text("not data")


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_bad_files_are_skipped_with_reasons_and_converted_modes_kept(tmp_path, image_root, model_args, fmt):
    _bad_files(image_root)
    model_args = [*model_args, "--format", fmt]
    res = extract(image_root, tmp_path / "c", model_args)
    assert "3 skipped" in res.output
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 + 3  # cmyk, palette and 16-bit were converted
    reasons = {Path(s["path"]).name: s["reason"] for s in c.skipped}
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.jpg"}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert ["art/cat/notes.txt", "not an image file extension"] in c.meta["ignored"]
    assert np.isfinite(c.features).all()
    # 16-bit is scaled, not clipped to white: it matches the 8-bit grey version
    i16 = list(c.paths).index("art/cat/sixteen.png")
    assert c.features[i16].std() > 0
    info = json.loads(run_cli("info", tmp_path / "c", "--json").output)
    assert len(info["skipped"]) == 3 and info["images"] == 39
    # skipped files are not retried when unchanged
    assert "+0 embedded, 0 skipped" in extract(image_root, tmp_path / "c", model_args).output


def test_strict_fails_on_first_bad_file(tmp_path, image_root, model_args):
    (image_root / "art" / "cat" / "empty.jpg").write_bytes(b"")
    res = fail_cli("extract", image_root, tmp_path / "c", *model_args, "--workers", "0", "-q", "--strict")
    assert res.exit_code != 0
    assert "empty.jpg" in str(res.exception) and "--strict" in str(res.exception)


def test_cache_from_other_model_is_refused(tmp_path, image_root, tiny_model, model_args):
    from fedclip_cache.synthetic import write_tiny_model
    extract(image_root, tmp_path / "c", model_args)
    cfg2, ckpt2 = write_tiny_model(tmp_path / "other", seed=1)
    res = fail_cli("extract", image_root, tmp_path / "c", "--model-config", tiny_model[0], "--pretrained", ckpt2,
                  "-q", "--workers", "0")
    assert res.exit_code != 0 and "different model" in str(res.exception) and "new output folder" in str(res.exception)
    res = fail_cli("extract", image_root, tmp_path / "c", *model_args, "--image-mean", "0.5,0.5,0.5", "-q")
    assert res.exit_code != 0 and "preprocess" in str(res.exception)
    res = fail_cli("extract", image_root, tmp_path / "c", *model_args, "--format", "hdf5", "-q")
    assert res.exit_code != 0 and "--format parquet" in str(res.exception)


def test_manifest_csv_and_parquet(tmp_path, image_root, model_args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(p.relative_to(image_root) for p in image_root.rglob("*.png"))
    man = tmp_path / "m.csv"
    lines = ["path,label,domain,client,split"]
    for i, r in enumerate(rows):
        lines.append(f"data/{r},{r.parts[1]},{r.parts[0]},site{i % 2},{'train' if i % 3 else 'test'}")
    man.write_text("\n".join(lines) + "\n")
    extract(man, tmp_path / "c", model_args)
    c = open_cache(tmp_path / "c")
    assert len(c) == 36 and set(c.clients.tolist()) == {"site0", "site1"}
    assert set(c.splits.tolist()) == {"train", "test"}
    extract(image_root, tmp_path / "f", model_args)
    f = open_cache(tmp_path / "f")
    np.testing.assert_allclose(c.features, f.features, rtol=1e-5, atol=1e-6)
    pq.write_table(pa.table({"path": [f"data/{r}" for r in rows], "label": [r.parts[1] for r in rows],
                             "domain": [r.parts[0] for r in rows]}), tmp_path / "m.parquet")
    extract(tmp_path / "m.parquet", tmp_path / "q", model_args)
    assert len(open_cache(tmp_path / "q")) == 36
    (tmp_path / "bad.csv").write_text("file,label\nx.png,cat\n")
    res = fail_cli("extract", tmp_path / "bad.csv", tmp_path / "z", *model_args, "-q")
    assert res.exit_code != 0 and "bad.csv" in str(res.exception) and "path" in str(res.exception)


@pytest.mark.slow  # > 10 s on 2 quiet cores (subprocesses or a ViT-B/32-sized model)
def test_two_process_gloo_run_equals_single_process(tmp_path, image_root, model_args, torchrun_extract_equals):
    extract(image_root, tmp_path / "one", model_args)
    _, two = torchrun_extract_equals(image_root, tmp_path / "one", tmp_path / "two", model_args)
    assert two.meta["counts"]["images"] == 36 and two.meta["runs"][-1]["world_size"] == 2


def test_model_forms_local_dir_and_offline_tag(tmp_path, image_root, tiny_model, model_args):
    from fedclip_cache.synthetic import TINY_CLIP_CONFIG

    d = tmp_path / "localdir"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CONFIG,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    sd = torch.load(tiny_model[1])
    torch.save(sd, d / "open_clip_pytorch_model.bin")
    extract(image_root, tmp_path / "ld", ["--model", f"local-dir:{d}"])
    ld = open_cache(tmp_path / "ld")
    assert ld.meta["preprocess"]["mean"] == [0.5, 0.5, 0.5] and ld.meta["model"]["weights"]["kind"] == "local-dir"
    # the same weights and mean/std given as overrides produce the same features
    extract(image_root, tmp_path / "ov", model_args, "--image-mean", "0.5,0.5,0.5", "--image-std", "0.5,0.5,0.5")
    np.testing.assert_allclose(open_cache(tmp_path / "ov").features, ld.features, rtol=1e-5, atol=1e-6)
    # a hub tag with no network fails at once with the fix in the message
    t0 = time.time()
    res = fail_cli("extract", image_root, tmp_path / "hub", "--model", "ViT-B-32/openai", "-q")
    assert res.exit_code != 0 and time.time() - t0 < 60
    assert "cannot download weights" in str(res.exception) and "--pretrained /path/to" in str(res.exception)
    assert not (tmp_path / "hub" / "cache.json").exists()


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fedclip-cache", "info", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert "nope" in msg and "fedclip-cache extract" in msg and "Traceback" not in msg
