"""``federate --precision bf16``: bf16 autocast around the adapter forward and the frozen text tower
(federated/precision.py, train.training_logits, prompts.text_transformer); fp32 stays the default and the reference.

Tolerances: bfloat16 keeps 8 bits of mantissa, so one rounding is off by up to 2^-9 = 0.2 % relative; through a few
layers of matmuls the outputs of unit-norm embeddings differ from fp32 by ~1e-3 (measured on the tiny tower: 3e-3 at
most). The bounds below are a few times that, and far below what a wrong implementation (a missing layer, a wrong
head split, no cast back to fp32) produces: O(1) differences.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedclip_cache.cache.config import ModelSpec
from fedclip_cache.cache.models import load_model
from fedclip_cache.errors import ConfigError
from fedclip_cache.federated import precision
from fedclip_cache.federated.adapters import ADAPTERS, init_params
from fedclip_cache.federated.config import FederateConfig, parse_text
from fedclip_cache.federated.prompts import PromptLearner, text_transformer
from fedclip_cache.federated.train import LocalHyper, batch_schedule, local_update
from fedclip_cache.synthetic import write_synthetic_cache

CLASSES = ["cat", "dog", "fish", "golden_retriever", "sea lion"]
needs_bf16 = pytest.mark.skipif(precision.bf16_matmul("cpu") is not None, reason="this CPU has no bf16 matmul")


@pytest.fixture(scope="module")
def lm(tiny_model):
    cfg, ckpt = tiny_model
    return load_model(ModelSpec(model_config=str(cfg), pretrained=str(ckpt)))


@pytest.fixture
def no_bf16_cpu(monkeypatch):
    """A CPU without AVX512-BF16 / AMX: the flag source precision.cpu_flags answers without them."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"fpu", "sse2", "avx2", "avx512f"}))


# ------------------------------------------------------------------------------------------------ the text tower

def test_written_out_blocks_are_open_clips_transformer(lm):
    """The bf16 path's blocks (attention written out) computed in fp32 -- outside autocast -- are open_clip's own
    forward to float rounding: what changes under bf16 is the dtype, not the function."""
    tower = lm.model
    x = torch.randn(6, 11, tower.positional_embedding.shape[1])
    mask = tower.attn_mask[:11, :11]
    want = tower.transformer(x, attn_mask=mask)
    torch.testing.assert_close(text_transformer(tower.transformer, x, mask, "bf16"), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(text_transformer(tower.transformer, x, mask, "fp32"), want)  # fp32: the tower's own call


@needs_bf16
def test_bf16_class_embeddings_and_gradients_are_close_to_fp32(lm):
    pl = PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4)
    ctx = pl.init_ctx(0).unsqueeze(0).repeat(2, 1, 1)
    d = pl.class_embeddings(ctx[0]).shape[-1]
    x, y = torch.randn(2, 8, d), torch.randint(0, len(CLASSES), (2, 8))

    def step(prec):
        leaf = ctx.clone().requires_grad_(True)
        T = pl.class_embeddings_many(leaf, precision=prec)
        loss = F.cross_entropy(100 * torch.bmm(F.normalize(x, dim=-1), T.transpose(1, 2)).flatten(0, 1), y.flatten())
        return T.detach(), torch.autograd.grad(loss, [leaf])[0]

    (t32, g32), (t16, g16) = step("fp32"), step("bf16")
    assert t16.dtype == torch.float32 and g16.dtype == torch.float32  # embeddings and gradients come back fp32
    assert 0 < (t16 - t32).abs().max() < 2e-2  # bf16 did run (not bit-equal), and is close
    assert float((g16 - g32).norm() / g32.norm()) < 0.1  # bf16 gradient: a few % off, same direction
    assert float(F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)) > 0.99


@needs_bf16
def test_bf16_prompt_training_keeps_fp32_context_and_tracks_fp32(lm):
    pls = {p: PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4, precision=p) for p in ("fp32", "bf16")}
    d = pls["fp32"].class_embeddings(pls["fp32"].init_ctx(0)).shape[-1]
    X, Y = torch.randn(40, d), torch.randint(0, len(CLASSES), (40,))
    start = pls["fp32"].init_ctx(1).unsqueeze(0)
    sched = [[np.arange(i, i + 8) for i in range(0, 40, 8)]]
    out = {p: pl.train(start, sched, X, Y, 0.05, 100.0, 0.9, 5e-4) for p, pl in pls.items()}
    assert out["bf16"].dtype == torch.float32
    moved = (out["fp32"] - start).norm()
    assert moved > 1e-3 and float((out["bf16"] - out["fp32"]).norm() / moved) < 0.1


@needs_bf16
def test_bf16_fedpgp_training_keeps_fp32_parameters_and_tracks_fp32(lm):
    """FedPGP's training pass (both contexts of every client through the text tower) runs under --precision too."""
    from fedclip_cache.federated.pgp import PGPLearner

    pgps = {p: PGPLearner(PromptLearner(lm.model, lm.tokenizer, CLASSES, n_ctx=4, precision=p), 2, 0.5, 0.5)
            for p in ("fp32", "bf16")}
    start = {n: v.unsqueeze(0) for n, v in pgps["fp32"].init_params(1).items()}
    d = pgps["fp32"].heads(start).shape[-1]
    X, Y = torch.randn(40, d), torch.randint(0, len(CLASSES), (40,))
    sched = [[np.arange(i, i + 8) for i in range(0, 40, 8)]]
    out = {p: pl.train(start, sched, X, Y, 0.05, 100.0, 0.9, 5e-4) for p, pl in pgps.items()}
    for n in start:
        assert out["bf16"][n].dtype == torch.float32
    moved = (out["fp32"]["sigma"] - start["sigma"]).norm()
    assert not torch.equal(out["bf16"]["sigma"], out["fp32"]["sigma"])  # the bf16 pass did run
    assert moved > 1e-3 and float((out["bf16"]["sigma"] - out["fp32"]["sigma"]).norm() / moved) < 0.1


# ------------------------------------------------------------------------------------------------ the adapter

@needs_bf16
@pytest.mark.parametrize("adapter", ["fedclip", "residual"])
def test_bf16_local_update_tracks_fp32_with_fp32_parameters(adapter):
    kind = ADAPTERS[adapter]
    g = torch.Generator().manual_seed(0)
    d, c = 32, 4
    X, Y = torch.randn(64, d, generator=g), torch.randint(0, c, (64,), generator=g)
    heads = F.normalize(torch.randn(1, c, d, generator=g), dim=-1)
    p0 = {n: v.unsqueeze(0) for n, v in init_params(adapter, d, kind.default_hidden(d), 0).items()}
    out = {}
    for prec in ("fp32", "bf16"):
        hp = LocalHyper(lr=1e-3, batch_size=8, epochs=2, precision=prec)
        sched = batch_schedule(np.arange(64), 0, 1, 7, hp)
        out[prec] = local_update(kind, p0, X, Y, heads, [sched], hp, {"residual_alpha": 0.2})
    for n in p0:
        assert out["bf16"][n].dtype == torch.float32  # master weights (and Adam state) stay fp32
        moved = (out["fp32"][n] - p0[n]).norm()
        assert moved > 0 and float((out["bf16"][n] - out["fp32"][n]).norm() / moved) < 0.1, n


# ------------------------------------------------------------------------------------------------ whole runs

@needs_bf16
def test_bf16_federate_completes_close_to_fp32(tmp_path):
    """A synthetic PACS-like cache, fedclip: the bf16 run's selected test and held-out accuracies are the fp32
    run's within 5 points (bf16 may move a borderline sample or two: the test splits hold ~20 samples, so one
    sample is ~2 points of the mean over clients, the held-out domain 40, 2.5 points)."""
    from fedclip_cache.federated.results import federate

    cache = write_synthetic_cache(tmp_path / "c", {"a": 60, "b": 50, "c": 40}, 4, dim=32, seed=3)
    base = FederateConfig(rounds=4, batch_size=8, lr=3e-3, heldout=["c"])
    s32 = federate(cache, base.validate())
    s16 = federate(cache, dataclasses.replace(base, precision="bf16").validate())
    assert s16["precision"] == "bf16" and "precision" not in s32  # fp32 summaries are as before the option
    for key in ("test_mean", "heldout"):
        a32, a16 = s32["experiments"][0]["best"][key], s16["experiments"][0]["best"][key]
        assert np.isfinite(a16) and abs(a16 - a32) <= 0.05, (key, a32, a16)


def test_bf16_refused_in_one_line_without_bf16_hardware(no_bf16_cpu, tmp_path, run, one_line_error):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 20, "b": 20}, 2, dim=8)
    code, out, err = run("federate", cache, "--rounds", "1", "--precision", "bf16", "--out", tmp_path / "r")
    msg = one_line_error(code, out, err, "--precision bf16", "no bf16 matmul", "avx512_bf16", "--precision fp32")
    assert not (tmp_path / "r" / "summary.json").exists(), msg  # refused before training (only the lock is there)
    code, out, err = run("federate", cache, "--rounds", "1", "--precision", "fp16")
    one_line_error(code, out, err, "--precision", "fp16", "fp32", "bf16")


def test_bf16_refusal_names_the_gpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match=r"^--precision bf16: the GPU 'Tesla V100' has no bf16 matmul"):
        precision.check_precision("bf16", "cuda")
    precision.check_precision("fp32", "cuda")  # fp32 never asks


def test_cpu_flags_decide(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert precision.bf16_matmul("cpu") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.bf16_matmul("cpu") is None
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f"}))
    assert "no bf16 matmul" in precision.bf16_matmul("cpu")


# ------------------------------------------------------------------------------------------------ the option

def test_precision_is_a_grid_and_pipeline_key_and_fp32_keeps_point_ids(tmp_path, no_bf16_cpu):
    from fedclip_cache.pipeline import load
    from fedclip_cache.sweep import expand, point_id, preflight

    assert FederateConfig().precision == "fp32"
    assert parse_text("precision", "bf16", "--grid precision=") == "bf16"
    points = expand(FederateConfig(), {"precision": ["fp32", "bf16"]})
    assert [p.precision for p in points] == ["fp32", "bf16"]
    with pytest.raises(ConfigError, match="precision='fp16' unknown"):
        expand(FederateConfig(), {"precision": ["fp16"]}, {"precision": "--grid precision="})
    # the default leaves a point's id as it was before the option existed; bf16 is another point
    d = FederateConfig().to_dict()
    d.pop("precision")
    assert point_id(FederateConfig.from_dict(d)) == point_id(FederateConfig())
    assert point_id(points[1]) != point_id(points[0])
    # a sweep refuses bf16 before any work on a machine without it
    cache = write_synthetic_cache(tmp_path / "c", {"a": 20, "b": 20}, 2, dim=8)
    with pytest.raises(ConfigError, match="precision bf16: this CPU has no bf16 matmul"):
        preflight(cache, [points[1]])
    p = tmp_path / "p.toml"
    p.write_text('[federate]\nrounds = 3\nprecision = "bf16"\n')
    assert load(p)["federate"]["precision"] == "bf16"
    p.write_text('[federate]\nprecision = "half"\n')
    with pytest.raises(ConfigError, match="federate.precision"):
        load(p)
