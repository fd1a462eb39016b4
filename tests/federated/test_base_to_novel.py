"""--base-to-novel (federated/protocols.class_split, the loop's Evaluator, results.summarise): FedTPG's class split,
training and validation on base classes only, base / novel / harmonic-mean test numbers equal to an independent
computation from the saved adapter or context and the cache's embeddings; refusals; report and sweep tables."""
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fedclip_cache.cache.reader import open_cache
from fedclip_cache.federated.config import ConfigError, FederateConfig
from fedclip_cache.federated.protocols import build_experiments, class_split
from fedclip_cache.federated.results import federate
from fedclip_cache.synthetic import write_synthetic_cache

REPO = Path(__file__).resolve().parents[2]
C = 5  # base = classes 0, 1, 2 (ceil(5/2) = 3), novel = 3, 4


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("b2n") / "c", {"a": 90, "b": 80, "c": 100}, C, dim=16,
                                 seed=2, class_sep=0.3)


def hm(b, n):
    return 2 * b * n / (b + n)


def test_class_split_is_fedtpgs_first_half_rounded_up():
    for c in range(1, 12):
        s = class_split(c)
        m = math.ceil(c / 2)  # FedTPG dataloader/dm_federated.py: m = math.ceil(n / 2); base [:m], new [m:]
        assert s.base.tolist() == list(range(m)) and s.novel.tolist() == list(range(m, c))
        labels = np.arange(c)
        assert s.is_base(labels).tolist() == [y < m for y in range(c)]
        assert s.local_labels(labels).tolist() == [y if y < m else y - m for y in range(c)]


@pytest.mark.parametrize("protocol", ["lodo", "personal"])
def test_train_and_val_keep_base_classes_test_is_unchanged(cache, protocol):
    fc = open_cache(cache)
    full = build_experiments(fc, FederateConfig(protocol=protocol))
    b2n = build_experiments(fc, FederateConfig(protocol=protocol, base_to_novel=True).validate())
    for ef, eb in zip(full, b2n):
        np.testing.assert_array_equal(ef.heldout if ef.heldout is not None else [],
                                      eb.heldout if eb.heldout is not None else [])
        for cf, cb in zip(ef.clients, eb.clients):
            np.testing.assert_array_equal(cb.train, cf.train[fc.labels[cf.train] < 3])
            np.testing.assert_array_equal(cb.val, cf.val[fc.labels[cf.val] < 3])
            np.testing.assert_array_equal(cb.test, cf.test)
    # with --shots: K per base class; novel classes have no training rows at all
    shots = build_experiments(fc, FederateConfig(protocol=protocol, base_to_novel=True, shots=2).validate())
    for e in shots:
        for cl in e.clients:
            assert np.bincount(fc.labels[cl.train], minlength=C).tolist() == [2, 2, 2, 0, 0]


def reference_numbers(fc, params: dict, e, exp_index: int, scale_free=True) -> dict:
    """Base / novel accuracies of one experiment computed here: the fedclip gate applied with numpy to the cache's
    features, cosine scores against the cache's text embeddings of the base (novel) classes only."""
    p = {k: v[exp_index].numpy().astype(np.float64) for k, v in params.items()}
    X = np.asarray(fc.features, dtype=np.float64)
    z = np.tanh(X @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    att = np.exp(z - z.max(1, keepdims=True))
    emb = att / att.sum(1, keepdims=True) * X
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    T = np.asarray(fc.text_embeddings[0], dtype=np.float64)
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    y = fc.labels

    def acc(rows, classes):
        rows = rows[np.isin(y[rows], classes)]
        pred = np.asarray(classes)[(emb[rows] @ T[classes].T).argmax(1)]
        return float((pred == y[rows]).mean())

    base, novel = [0, 1, 2], [3, 4]
    out = {"test": {cl.name: acc(cl.test, base) for cl in e.clients},
           "test_novel": {cl.name: acc(cl.test, novel) for cl in e.clients}}
    out["test_mean"], out["test_novel_mean"] = np.mean(list(out["test"].values())), np.mean(
        list(out["test_novel"].values()))
    if e.heldout is not None:
        out["heldout"], out["heldout_novel"] = acc(e.heldout, base), acc(e.heldout, novel)
    return out


def test_fedclip_base_novel_hm_equal_an_independent_computation(cache, tmp_path):
    out = tmp_path / "run"
    cfg = FederateConfig(rounds=1, lr=1e-2, base_to_novel=True)  # one round: the selected model is the saved one
    s = federate(cache, cfg, out, seeds=[0, 1])
    fc = open_cache(cache)
    exps = build_experiments(fc, cfg, seeds=[0, 1])
    params = torch.load(out / "adapter.pt")
    assert s["base_to_novel"]["base_classes"] == fc.classes[:3] and s["base_to_novel"]["novel_classes"] == \
        fc.classes[3:]
    bases, novels = [], []
    for ei, (e, rec) in enumerate(zip(exps, s["experiments"])):
        want = reference_numbers(fc, params, e, ei)
        got = rec["best"]
        assert got["test"] == pytest.approx(want["test"]) and got["test_novel"] == pytest.approx(want["test_novel"])
        assert got["test_mean"] == pytest.approx(want["test_mean"])
        assert got["test_novel_mean"] == pytest.approx(want["test_novel_mean"])
        assert got["test_hm"] == pytest.approx(hm(want["test_mean"], want["test_novel_mean"]))
        assert got["heldout"] == pytest.approx(want["heldout"])
        assert got["heldout_novel"] == pytest.approx(want["heldout_novel"])
        assert got["heldout_hm"] == pytest.approx(hm(want["heldout"], want["heldout_novel"]))
        bases.append(want["heldout"]), novels.append(want["heldout_novel"])
    m = s["mean"]  # HM of the mean base and mean novel accuracies (CoCoOp's / FedTPG's tables)
    assert m["heldout_best"] == pytest.approx(np.mean(bases))
    assert m["heldout_novel_best"] == pytest.approx(np.mean(novels))
    assert m["heldout_hm_best"] == pytest.approx(hm(np.mean(bases), np.mean(novels)))
    # metrics.parquet: base rows under test/heldout, novel rows under test_novel/heldout_novel, with their counts
    t = pq.read_table(out / "metrics.parquet").to_pandas()
    e0 = exps[0]
    seg = t[(t["experiment"] == e0.name) & (t["split"] == "heldout_novel")]
    assert seg["n"].tolist() == [int(np.isin(fc.labels[e0.heldout], [3, 4]).sum())]
    val = t[(t["experiment"] == e0.name) & (t["split"] == "val")]
    assert sorted(val["n"]) == sorted(len(cl.val) for cl in e0.clients)


def test_novel_class_prompts_never_enter_training(cache, tmp_path):
    """With the CE loss every class's prompt would enter the softmax: changing the novel classes' text embeddings
    must leave the trained adapter and the base numbers unchanged, and change the novel numbers."""
    from fedclip_cache.federated.results import train

    fc = open_cache(cache)
    cfg = FederateConfig(rounds=2, lr=1e-2, loss="ce", base_to_novel=True, heldout=["a"]).validate()
    res1, s1 = train(fc, cfg)
    fc.text_embeddings = fc.text_embeddings.copy()
    fc.text_embeddings[:, 3:] = np.random.default_rng(0).normal(size=fc.text_embeddings[:, 3:].shape)
    res2, s2 = train(fc, cfg)
    for k in res1.final_params:
        torch.testing.assert_close(res1.final_params[k], res2.final_params[k])
    assert s1["experiments"][0]["best"]["heldout"] == s2["experiments"][0]["best"]["heldout"]
    assert s1["experiments"][0]["best"]["heldout_novel"] != s2["experiments"][0]["best"]["heldout_novel"]


def test_promptfl_trains_base_prompts_and_scores_novel_prompts(tiny_model, tmp_path):
    """promptfl with --base-to-novel, one round by hand: each client trains the context on base-class prompts only
    (labels among the base classes), the server averages; held-out novel accuracy is that context's novel-class
    prompts scored among the novel classes."""
    import torch.nn.functional as F

    from fedclip_cache.cache.extract import ExtractConfig, extract
    from fedclip_cache.cache.config import ModelSpec
    from fedclip_cache.cache.models import load_model
    from fedclip_cache.federated.loop import run_loop
    from fedclip_cache.federated.prompts import PromptLearner
    from fedclip_cache.federated.train import LocalHyper, batch_schedule, lane_key
    from fedclip_cache.synthetic import write_image_folder

    cfg_file, ckpt = tiny_model
    src = write_image_folder(tmp_path / "data", classes=("cat", "dog", "fish", "owl"), per_class=5)
    extract(ExtractConfig(str(src), str(tmp_path / "cache"), ModelSpec(model_config=str(cfg_file),
                          pretrained=str(ckpt)), workers=0, progress=False, device="cpu"))
    cache = open_cache(tmp_path / "cache")
    cfg = FederateConfig(algo="promptfl", rounds=1, n_ctx=2, prompt_lr=0.05, heldout=["art"], batch_size=4,
                         base_to_novel=True, text_model_config=str(cfg_file)).validate()
    e = build_experiments(cache, cfg)[0]
    res = run_loop(cache, cfg, [e])
    lm = load_model(ModelSpec(model_config=str(cfg_file), pretrained=cache.meta["model"]["pretrained"]))
    base = PromptLearner(lm.model, lm.tokenizer, cache.classes[:2], n_ctx=2)
    novel = PromptLearner(lm.model, lm.tokenizer, cache.classes[2:], n_ctx=2)
    X, Y = torch.from_numpy(np.asarray(cache.features)), torch.from_numpy(cache.labels)
    assert all(int(Y[cl.train].max()) < 2 for cl in e.clients)
    start = base.init_ctx(e.seed)
    trained = [base.train(start.unsqueeze(0), [batch_schedule(cl.train, e.seed, 1, lane_key(e.name, cl.name),
                                                              LocalHyper(batch_size=4))],
                          X, Y, 0.05, res.logit_scale, cfg.prompt_momentum, cfg.prompt_weight_decay)[0]
               for cl in e.clients]
    want = torch.stack(trained).mean(0)
    torch.testing.assert_close(res.final_params["ctx"][0], want, atol=1e-6, rtol=1e-5)
    rows = e.heldout[cache.labels[e.heldout] >= 2]
    T = novel.class_embeddings(want).detach()
    acc = float((F.normalize(X[rows], dim=-1) @ T.t()).argmax(-1).add(2).eq(Y[rows]).float().mean())
    si = next(i for i, sg in enumerate(res.segments) if sg["split"] == "heldout_novel")
    assert res.acc[-1, si] == pytest.approx(acc)


@pytest.mark.parametrize("opts,fragment", [
    ({"head": "prototype"}, "--head 'prototype': a prototype head has no novel-class prototypes"),
    ({"algo": "zeroshot", "head": "prototype"}, "--head 'prototype'"),
    ({"algo": "promptfl", "prompt_csc": True}, "--prompt-csc True: class-specific contexts of novel classes"),
    ({"finetune_steps": 5}, "--finetune-steps 5: not supported with --base-to-novel"),
])
def test_refusals_are_one_line(opts, fragment):
    with pytest.raises(ConfigError) as e:
        FederateConfig(base_to_novel=True, **opts).validate()
    assert str(e.value).startswith(fragment) and "\n" not in str(e.value)
    FederateConfig(**opts).validate()  # each is fine without --base-to-novel
    FederateConfig(algo="promptfl", head="prototype", base_to_novel=True).validate()  # prompts: --head unused


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_caches_with_a_one_class_group_are_refused(tmp_path, classes):
    """Under 4 classes base or novel holds one class, whose accuracy among itself is always 100 %."""
    few = write_synthetic_cache(tmp_path / "few", {"a": 20, "b": 20}, classes, dim=8)
    with pytest.raises(ConfigError, match=f"has {classes} class.*at least two classes each"):
        build_experiments(open_cache(few), FederateConfig(base_to_novel=True))
    four = write_synthetic_cache(tmp_path / "four", {"a": 20, "b": 20}, 4, dim=8)
    assert build_experiments(open_cache(four), FederateConfig(base_to_novel=True))


def test_flower_apps_refuse(tmp_path):
    from fedclip_cache.flower.task import check_supported

    with pytest.raises(ConfigError, match="^--base-to-novel True: not supported by the Flower apps"):
        check_supported(FederateConfig(base_to_novel=True, protocol="personal"), per_site_caches=True)


def test_report_and_sweep_tables_show_base_novel_hm(cache, tmp_path, run, one_line_error):
    out = tmp_path / "r"
    code, o, err = run("federate", str(cache), "--base-to-novel", "--rounds", "1", "--heldout", "a", "--out", out)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    code, o, err = run("report", out, "--format", "md")
    assert code == 0, err
    head, _, row = o.strip().splitlines()[:3]
    cols = [c.strip() for c in head.strip("|").split("|")]
    vals = [c.strip() for c in row.strip("|").split("|")]
    got = dict(zip(cols, vals))
    b = s["experiments"][0]["best"]
    for key in ("heldout", "heldout_novel", "heldout_hm", "test_novel_mean", "test_hm"):
        assert got[key] == f"{100 * b[key]:.2f}", key
    code, o, err = run("report", out)
    assert code == 0 and "held-out novel" in o and "held-out HM" in o and "base-to-novel: 3 base / 2 novel" in o
    one_line_error(*run("federate", str(cache), "--base-to-novel", "--head", "prototype", "--rounds", "1"),
                   "--head 'prototype'")
    sw = tmp_path / "sw"
    code, o, err = run("sweep", str(cache), "--grid", "base_to_novel=false,true", "--rounds", "1", "--heldout", "a",
                       "--seeds", "0,1", "--out", sw)
    assert code == 0, err
    md = (sw / "summary.md").read_text().splitlines()
    cols = [c.strip() for c in md[0].strip("|").split("|")]
    assert {"base", "novel", "hm"} <= set(cols)
    rows = [dict(zip(cols, (c.strip() for c in r.strip("|").split("|")))) for r in md[2:]]
    off = next(r for r in rows if r["base_to_novel"] == "False")
    on = next(r for r in rows if r["base_to_novel"] == "True")
    assert off["base"] == off["novel"] == off["hm"] == "-"
    point = next(p for p in (sw / "points").glob("*/summary.json") if json.loads(p.read_text())["base_to_novel"])
    ps = json.loads(point.read_text())
    per_seed = [(e["best"]["heldout"], e["best"]["heldout_novel"]) for e in ps["experiments"]]
    base = np.array([p[0] for p in per_seed])
    novel = np.array([p[1] for p in per_seed])
    h = np.array([hm(x, y) for x, y in per_seed])
    for key, v in (("base", base), ("novel", novel), ("hm", h)):
        assert on[key] == f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f}", key
    import csv

    flat = {r["base_to_novel"]: r for r in csv.DictReader((sw / "summary.csv").open())}
    assert flat["False"]["hm_mean"] == "" and float(flat["True"]["hm_mean"]) == pytest.approx(h.mean())


def test_shipped_base_to_novel_pipeline():
    from fedclip_cache.pipeline import load
    from fedclip_cache.sweep import expand

    cfg = load(REPO / "pipelines" / "pacs-base2novel.toml")
    assert cfg["federate"]["base_to_novel"] is True and cfg["federate"]["head"] == "text"
    pts = expand(FederateConfig(**{k: v for k, v in cfg["federate"].items() if k != "split"}), cfg["sweep"]["grid"])
    assert sorted(p.algo for p in pts) == ["fedclip", "promptfl", "zeroshot"] and all(p.base_to_novel for p in pts)
    with pytest.raises(ConfigError, match="prototype"):
        load(REPO / "pipelines" / "pacs-base2novel.toml", ["federate.head=prototype", "federate.algo=fedclip"])
