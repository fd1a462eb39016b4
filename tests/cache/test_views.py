"""Cached augmented views: extract --views K (view 0 = a plain extract, bit for bit; K-1 seeded augmented views that
hold the cache's guarantees per view) and federate --train-views."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from fedclip_cache import open_cache
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.train import LocalHyper, batch_schedule
from fedclip_cache.cache.store import CacheError
from fedclip_cache.synthetic import write_image_folder
from fedclip_cache.cache.views import AugmentError, AugmentedView, parse_augment, recipe_text
from fedclip_cache.launch.procs import free_port



@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_view0_is_a_plain_extract_and_views_differ(tmp_path, image_root, model_args, run, fmt, extract_ok):
    extract_ok(run, image_root, tmp_path / "plain", model_args, "--format", fmt)
    o = extract_ok(run, image_root, tmp_path / "v3", model_args, "--format", fmt, "--views", "3")
    assert "views: 3 per image" in o
    plain, c = open_cache(tmp_path / "plain"), open_cache(tmp_path / "v3")
    assert c.num_views == 3 and plain.num_views == 1
    assert (c.paths == plain.paths).all()
    assert np.array_equal(c.features, plain.features)  # bit-identical: view 0 goes through today's path
    assert plain.meta["fingerprint"] == c.meta["fingerprint"]  # views are not part of the fingerprint
    v = c.views()
    assert v.shape == (3, len(c), 32) and v.dtype == np.float32
    assert np.array_equal(v[0], plain.features)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert np.abs(v[a] - v[b]).max(axis=1).min() > 0, (a, b)  # every image's views differ
    assert np.shares_memory(c.features, v) and np.array_equal(c.views(2), v[:2])
    with pytest.raises(CacheError, match="4 views asked for, the cache holds 3"):
        c.views(4)
    # info shows K and the recipe
    code, out, err = run("info", tmp_path / "v3")
    assert code == 0 and "views: 3 per image" in out and "rrc=0.5-1,flip, seed 0" in out
    code, out, _ = run("info", tmp_path / "v3", "--json")
    s = json.loads(out)
    assert s["views"] == 3 and s["augment"]["recipe"] == "rrc=0.5-1,flip" and s["augment"]["size"] == [32, 32]
    code, out, _ = run("info", tmp_path / "plain", "--json")
    assert json.loads(out)["views"] == 1 and json.loads(out)["augment"] is None


def test_loader_batches_hold_about_batch_size_images_and_view0_keeps_its_batches(tmp_path, image_root, model_args,
                                                                                   run, extract_ok):
    """With K views a loader batch carries ~batch_size/K images (not batch_size x K images' tensors); view 0 is
    still encoded in the plain path's batches, so it stays bit-identical, bad images included."""
    from fedclip_cache.cache.encoder import view_batches

    parts, ends = view_batches(1000, 256, 8)
    assert sum(parts, []) == list(range(1000)) and max(map(len, parts)) <= 32
    chunk_ends = [p[-1] + 1 for p, e in zip(parts, ends) if e]
    assert chunk_ends == [256, 512, 768, 1000]  # the plain path's batch boundaries
    assert view_batches(36, 256, 3) == ([list(range(36))], [True])  # small enough: one part
    (image_root / "photo" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    extract_ok(run, image_root, tmp_path / "plain", model_args, "--batch-size", "5")
    extract_ok(run, image_root, tmp_path / "v4", model_args, "--batch-size", "5", "--views", "4")
    plain, c = open_cache(tmp_path / "plain"), open_cache(tmp_path / "v4")
    assert (c.paths == plain.paths).all() and np.array_equal(c.features, plain.features)
    assert [s["path"] for s in c.meta["skipped"]] == [s["path"] for s in plain.meta["skipped"]] != []


def test_views_depend_only_on_seed_image_and_k(tmp_path, image_root, model_args, run, extract_ok):
    extract_ok(run, image_root, tmp_path / "a", model_args, "--views", "3", "--batch-size", "64")
    extract_ok(run, image_root, tmp_path / "b", model_args, "--views", "3", "--batch-size", "5", "--shard-size", "7")
    extract_ok(run, image_root, tmp_path / "s", model_args, "--views", "3", "--augment-seed", "1")
    a, b, s = (open_cache(tmp_path / n).views() for n in "abs")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # other batches and shards: the same views
    assert not np.allclose(a[1:], s[1:]) and np.array_equal(a[0], s[0])  # another seed: other views, same view 0
    # the draws themselves are a function of (seed, image id, k) only
    from fedclip_cache.cache.models import ModelSpec, load_model

    lm = load_model(ModelSpec(model_config=model_args[1], pretrained=model_args[3]))
    view = AugmentedView(lm.preprocess, lm.preprocess_cfg, parse_augment("rrc=0.5-1,flip,jitter=0.3"), 7)
    assert view.params(40, 30, "abc", 1) == view.params(40, 30, "abc", 1)
    assert view.params(40, 30, "abc", 1) != view.params(40, 30, "abc", 2)
    img = Image.new("RGB", (40, 30), (10, 200, 30))
    assert view(img, "abc", 1).shape == (3, 32, 32)


@pytest.mark.slow  # > 10 s on 2 quiet cores (subprocesses or a ViT-B/32-sized model)
def test_two_process_torchrun_views_equal_one_process(tmp_path, image_root, model_args, run, extract_ok):
    """Under torchrun every rank augments its share of the images; views depend only on (seed, image, k), so the
    cache equals a one-process extract view for view."""
    extract_ok(run, image_root, tmp_path / "one", model_args, "--views", "3")
    # a free port, not a fixed one: a fixed port failed when another torchrun (a parallel test run) held it
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "fedclip_cache", "extract", str(image_root), str(tmp_path / "two"), *model_args,
           "--workers", "0", "-q", "--batch-size", "5", "--device", "cpu", "--views", "3"]
    env = {**os.environ, "FEDCLIP_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    one, two = open_cache(tmp_path / "one"), open_cache(tmp_path / "two")
    assert two.meta["runs"][-1]["world_size"] == 2 and two.num_views == 3
    assert (one.paths == two.paths).all()
    np.testing.assert_allclose(one.views(), two.views(), rtol=1e-5, atol=1e-6)
    assert two.meta["views"] == one.meta["views"]


def test_more_views_extend_and_the_cache_holds_per_view(tmp_path, image_root, model_args, run, extract_ok):
    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args)
    before = open_cache(out).features
    o = extract_ok(run, image_root, out, model_args, "--views", "3")
    assert "+0 embedded" in o and "36 cached image(s) given their missing views" in o
    c = open_cache(out)
    assert np.array_equal(c.features, before)  # view 0 of an existing cache is never recomputed
    extract_ok(run, image_root, tmp_path / "fresh", model_args, "--views", "3")
    np.testing.assert_allclose(c.views(), open_cache(tmp_path / "fresh").views(), rtol=1e-5, atol=1e-6)
    o = extract_ok(run, image_root, out, model_args)  # the same command again (K is the cache's): nothing to do
    assert "+0 embedded" in o and "0 cached image(s) given their missing views" in o
    v3 = c.views()
    extract_ok(run, image_root, out, model_args, "--views", "4")
    c4 = open_cache(out)
    assert np.array_equal(c4.views()[:3], v3)  # the views held are copied, only view 3 is new
    # a deleted image takes its views with it; a changed one gets new ones
    (image_root / "art/cat/art_cat_0000.png").unlink()
    changed = image_root / "photo/dog/photo_dog_0001.png"
    Image.new("RGB", (40, 40), (250, 0, 0)).save(changed)
    o = extract_ok(run, image_root, out, model_args)
    assert "+1 embedded" in o and "1 retired" in o
    c5 = open_cache(out)
    assert len(c5) == 35 and c5.views().shape == (4, 35, 32)
    i_old, i_new = list(c4.paths).index("photo/dog/photo_dog_0001.png"), list(c5.paths).index(
        "photo/dog/photo_dog_0001.png")
    assert not np.allclose(c4.views()[:, i_old], c5.views()[:, i_new])
    keep = [list(c4.paths).index(p) for p in c5.paths if p != "photo/dog/photo_dog_0001.png"]
    same = [i for i, p in enumerate(c5.paths) if p != "photo/dog/photo_dog_0001.png"]
    assert np.array_equal(c4.views()[:, keep], c5.views()[:, same])
    # every shard file holds complete rows: anyone reading them directly sees K-1 views per row
    import pyarrow.parquet as pq

    t = pq.read_table(sorted((out / "shards").glob("*.parquet")))
    assert t.num_rows == 35 and t.column("views").type.list_size == 3 * 32


def test_bad_view_options_are_one_line_errors(tmp_path, image_root, model_args, run, extract_ok, one_line_error):
    out = tmp_path / "c"
    for args, frag in ((["--views", "0"], "--views 0"), (["--views", "-2"], "--views -2"),
                       (["--views", "2", "--augment", "rrc=2-1"], "rrc='2-1'"),
                       (["--views", "2", "--augment", "blur"], "unknown step 'blur'"),
                       (["--views", "2", "--augment", "flip=0"], "changes nothing"),
                       (["--augment", "flip"], "--augment only applies with --views 2 or more")):
        one_line_error(*run("extract", image_root, out, *model_args, "-q", *args), frag)
    code, o, e = run("extract", image_root, out, *model_args, "-q", "--views", "two")
    assert code == 2 and "Traceback" not in o + e
    extract_ok(run, image_root, out, model_args, "--views", "3", "--augment", "rrc=0.3-1,flip=0.5")
    assert open_cache(out).meta["views"]["augment"] == parse_augment("flip,rrc=0.3-1")
    one_line_error(*run("extract", image_root, out, *model_args, "-q", "--views", "2"),
                   "--views 2", "holds 3 views", "--train-views 2")
    one_line_error(*run("extract", image_root, out, *model_args, "-q", "--augment", "rrc=0.5-1,flip"),
                   "mixing recipes", "rrc=0.3-1,flip")
    one_line_error(*run("extract", image_root, out, *model_args, "-q", "--augment-seed", "9"), "seed 0")
    extract_ok(run, image_root, out, model_args, "--augment", "flip,rrc=0.3-1")  # the same recipe, spelt otherwise
    assert recipe_text(parse_augment("rrc=0.5-1,flip,jitter=0.4")) == "rrc=0.5-1,flip,jitter=0.4"
    with pytest.raises(AugmentError, match="ratio= only shapes"):
        parse_augment("ratio=0.5-2,flip")


@pytest.mark.slow  # > 10 s on 2 quiet cores (subprocesses or a ViT-B/32-sized model)
def test_resume_after_sigkill_with_views(tmp_path, model_args, kill_after_shards):
    root = write_image_folder(tmp_path / "data", per_class=6)  # 54 images
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(root), str(out), *model_args, "--workers", "0",
           "-q", "--batch-size", "3", "--shard-size", "3", "--views", "3"]
    committed = kill_after_shards(cmd, out)
    assert 3 <= committed < 18, "the kill must land mid-run"
    with pytest.raises(CacheError, match="incomplete cache"):
        open_cache(out)
    partial = open_cache(out, allow_incomplete=True)
    with pytest.raises(CacheError, match="unfinished cache serves no augmented views"):
        partial.views()
    # the resume runs without --views: the cache remembers the views it is being built with
    subprocess.run(cmd[:-2], check=True, stdout=subprocess.DEVNULL)
    resumed = open_cache(out)
    assert len(resumed) == 54 and resumed.num_views == 3
    assert len(list((out / "shards").glob("*.parquet"))) == 18  # nothing was extracted twice
    subprocess.run([*cmd[:5], str(tmp_path / "clean"), *cmd[6:]], check=True, stdout=subprocess.DEVNULL)
    clean = open_cache(tmp_path / "clean")
    assert (resumed.paths == clean.paths).all()
    np.testing.assert_allclose(resumed.views(), clean.views(), rtol=1e-5, atol=1e-6)


def test_a_killed_extension_is_finished_by_the_next_run(tmp_path, image_root, model_args, run, extract_ok):
    out = tmp_path / "c"
    extract_ok(run, image_root, out, model_args, "--batch-size", "4", "--shard-size", "4")  # 9 shards
    plain = open_cache(out).features
    cmd = [sys.executable, "-m", "fedclip_cache", "extract", str(image_root), str(out), *model_args, "--workers",
           "0", "-q", "--batch-size", "4", "--shard-size", "4", "--views", "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "FEDCLIP_CACHE_SHARD_DELAY": "0.3"}, stdout=subprocess.DEVNULL)
    meta = out / "cache.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (json.loads(meta.read_text()).get("views") and
                                          len(list((out / "shards").glob("*.parquet"))) >= 11):  # 2 extended
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(CacheError, match="incomplete cache"):
        open_cache(out)
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o
    c = open_cache(out)
    assert c.num_views == 2 and np.array_equal(c.features, plain) and c.views().shape == (2, 36, 32)


# ------------------------------------------------------------------------------------------------ federate

def test_batch_schedule_views():
    train = np.arange(3, 40, 2)
    hp = LocalHyper(batch_size=4, epochs=2)
    one = batch_schedule(train, 0, 3, 11, hp)
    many = batch_schedule(train, 0, 3, 11, hp, views=3, n_rows=50)
    assert [len(b) for b in one] == [len(b) for b in many]
    for a, b in zip(one, many):
        assert np.array_equal(b % 50, a) and (b // 50 < 3).all()  # the same shuffle, one view per sample
    picks = np.concatenate(many) // 50
    assert set(picks.tolist()) == {0, 1, 2}
    assert all(np.array_equal(a, b) for a, b in zip(many, batch_schedule(train, 0, 3, 11, hp, 3, 50)))
    assert not all(np.array_equal(a, b) for a, b in zip(many, batch_schedule(train, 0, 4, 11, hp, 3, 50)))


def test_federate_train_views(tmp_path, image_root, model_args, run, extract_ok, one_line_error):
    extract_ok(run, image_root, tmp_path / "c", model_args, "--views", "3")
    cache = tmp_path / "c"
    common = ("--rounds", "2", "--heldout", "art", "--batch-size", "4", "--lr", "0.01")
    outs = {}
    for tv in ("1", "2", "all"):
        code, o, e = run("federate", cache, *common, "--train-views", tv, "--out", tmp_path / tv)
        assert code == 0, o + e
        s = json.loads((tmp_path / tv / "summary.json").read_text())
        assert s["train_views"] == {"1": 1, "2": 2, "all": 3}[tv]
        assert json.loads((tmp_path / tv / "config.json").read_text())["federate"]["train_views"] == tv
        outs[tv] = s
    code, o, e = run("federate", cache, *common, "--out", tmp_path / "default")
    default = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert default["experiments"] == outs["1"]["experiments"]  # the default is the single view
    import torch

    a1 = torch.load(tmp_path / "1" / "adapter.pt")
    a3 = torch.load(tmp_path / "all" / "adapter.pt")
    assert any(not torch.equal(a1[k], a3[k]) for k in a1)  # other views were trained on
    # a cache without views gives the same default run as one with them (view 0 is the same)
    extract_ok(run, image_root, tmp_path / "plain", model_args)
    code, o, e = run("federate", tmp_path / "plain", *common, "--out", tmp_path / "p")
    plain = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert plain["experiments"] == default["experiments"]
    one_line_error(*run("federate", cache, *common, "--train-views", "5"),
                   "--train-views 5", "holds 3 view(s)")
    one_line_error(*run("federate", tmp_path / "plain", *common, "--train-views", "2"), "holds 1 view(s)")
    one_line_error(*run("federate", cache, *common, "--train-views", "0"), "--train-views '0'")
    with pytest.raises(ConfigError, match="train_views"):
        FederateConfig(train_views="most").validate({"train_views": "federate.train_views"})
    assert FederateConfig(train_views=4).validate().train_views == "4"  # TOML `train_views = 4`


def test_promptfl_trains_on_views(tmp_path, image_root, model_args, run, extract_ok):
    extract_ok(run, image_root, tmp_path / "c", model_args, "--views", "2")
    for tv in ("1", "2"):
        code, o, e = run("federate", tmp_path / "c", "--algo", "promptfl", "--rounds", "1", "--n-ctx", "2",
                         "--heldout", "art", "--text-model-config", model_args[1], "--train-views", tv,
                         "--out", tmp_path / tv)
        assert code == 0, o + e
    import torch

    c1, c2 = (torch.load(tmp_path / tv / "adapter.pt")["ctx"] for tv in ("1", "2"))
    assert not torch.equal(c1, c2)


def test_sweep_preflight_and_point_ids(tmp_path):
    from fedclip_cache.sweep import point_id, preflight
    from fedclip_cache.synthetic import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "c", {"a": 20, "b": 20}, 3, dim=8)
    with pytest.raises(ConfigError, match="train_views '2': the cache holds 1 view"):
        preflight(cache, [FederateConfig(train_views="2")], {"train_views": "train_views"})
    # runs made before --train-views existed keep their point ids
    assert point_id(FederateConfig()) == point_id(FederateConfig(train_views="1"))
    assert point_id(FederateConfig()) != point_id(FederateConfig(train_views="all"))


def test_shipped_views_pipeline_and_help(run):
    from pathlib import Path

    from fedclip_cache.pipeline import prepare

    plan = prepare(Path(__file__).resolve().parents[2] / "pipelines" / "pacs-views.toml", None)
    assert plan.cfg["extract"]["views"] == 8 and plan.federate.train_views == "all"
    assert plan.grid == {"train_views": [1, "all"]}
    with pytest.raises(ConfigError, match="extract.views=0: expected a whole number >= 1"):
        prepare(Path(__file__).resolve().parents[2] / "pipelines" / "pacs-views.toml", ["extract.views=0"])
    code, out, _ = run("extract", "--help")
    assert code == 0 and "--views" in out and "--augment" in out and "--augment-seed" in out
    code, out, _ = run("federate", "--help")
    assert code == 0 and "--train-views" in out
