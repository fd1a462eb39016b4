"""Fixtures every test package shares: a tiny open_clip model and image folder, the CLI run in-process as a user runs
it, the shape every refusal must have, the in-process Flower sites a deployment is compared with, and the comparison
of two run folders' scores and metrics tables.

Helpers that are functions (``one_line_error``, ``extract_ok``, ``run_sites``, ...) are served as fixtures that
return the function (pytest's "factory as fixture"): a test names what it uses in its signature, and no test module
imports another (test modules are not importable by name under every pytest import mode, and an import would run
the other module's collection-time code)."""
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: tests never touch the network

import pytest

from fedclip_cache.synthetic import write_image_folder, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """(config json, checkpoint) of a tiny random open_clip model, registered with open_clip."""
    return write_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def image_root(tmp_path):
    return write_image_folder(tmp_path / "data")


@pytest.fixture
def model_args(tiny_model):
    cfg, ckpt = tiny_model
    return ["--model-config", str(cfg), "--pretrained", str(ckpt)]


# ------------------------------------------------------------------------------------ the CLI, run in-process

def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the real entry point (with its error handling) in-process: (exit code, stdout, stderr)."""
    from fedclip_cache.cli import main

    monkeypatch.setattr(sys, "argv", ["fedclip-cache", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    """The refusal's message, after checking it is one line on stderr, exit 2, no traceback, holding ``fragments``."""
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    msg = err.strip()
    assert msg.startswith("error:") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _extract_ok(run, src, out, model_args, *extra) -> str:
    """``extract SRC OUT`` with the tiny model, no worker processes, quiet; checks it succeeded; its stdout."""
    code, o, e = run("extract", src, out, *model_args, "--workers", "0", "-q", *extra)
    assert code == 0, o + e
    return o


@pytest.fixture
def run(monkeypatch, capsys):
    """``run(*args) -> (exit code, stdout, stderr)``: ``fedclip-cache ARGS`` through its real entry point (with its
    error handling), in-process, with this test's monkeypatch and capsys."""
    return lambda *args: _cli(monkeypatch, capsys, *args)


def _wait_until(check, timeout: float = 90.0):
    """Poll ``check()`` every 0.1 s until it returns something truthy (returned), else fail after ``timeout`` s."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.fixture(scope="session")
def wait_until():
    """``wait_until(check, timeout=90) -> check's first truthy value``: for tests that watch other processes."""
    return _wait_until


@pytest.fixture(scope="session")
def one_line_error():
    """``one_line_error(code, out, err, *fragments) -> message``: asserts a refusal is one line on stderr, exit 2,
    no traceback, holding every fragment."""
    return _one_line_error


@pytest.fixture(scope="session")
def extract_ok():
    """``extract_ok(run, src, out, model_args, *extra) -> stdout``: a successful quiet extract."""
    return _extract_ok


# ------------------------------------------------------------- Flower sites driven in-process (flower/, launch/)

def _wire(rec, params):
    """A message as the other side reads it after Flower's transport (the apps' own encoding and decoding)."""
    from fedclip_cache.flower.client_app import content, read

    return read(content(rec, params))


def _run_sites(sites, cfg, recorder=None, min_results=1, drop=lambda rnd, site: False):
    """What the ServerApp does with the grid, with in-process sites: the set-up message, then R+1 round messages
    (``drop(rnd, site)``: that site does not answer that message)."""
    from fedclip_cache.flower.server_app import Coordinator

    co = Coordinator(cfg, recorder, min_results)
    co.setup([_wire(*s.handle(*_wire({"phase": "setup"}, {}))) for s in sites])
    for rnd in range(1, cfg.rounds + 2):
        rec, params = co.message(rnd)
        co.receive(rnd, [_wire(*s.handle(*_wire(rec, params))) for s in sites if not drop(rnd, s)])
    return co


def _extract_sites(tmp_path, model_args, monkeypatch, capsys, *more) -> dict:
    """Images of three domains extracted twice with the same model and --classes file: into one cache of all of
    them (``tmp_path/merged``) and into one cache per site holding only its own images; returns domain -> site
    cache."""
    import shutil

    root = write_image_folder(tmp_path / "all", per_class=6)
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\nfish\n")

    def extract(src, out):
        code, o, e = _cli(monkeypatch, capsys, "extract", src, out, *model_args, "--workers", "0", "-q",
                          "--classes", names, *more)
        assert code == 0, o + e

    extract(root, tmp_path / "merged")
    sites = {}
    for d in ("art", "photo", "sketch"):
        shutil.copytree(root / d, tmp_path / f"site-{d}" / d)
        extract(tmp_path / f"site-{d}", tmp_path / f"cache-{d}")
        sites[d] = str(tmp_path / f"cache-{d}")
    return sites


@pytest.fixture(scope="session")
def wire():
    """``wire(rec, params) -> (rec, params)``: a message after the apps' wire encoding and decoding."""
    return _wire


@pytest.fixture(scope="session")
def run_sites():
    """``run_sites(sites, cfg, recorder=None, min_results=1, drop=...) -> Coordinator`` after every round."""
    return _run_sites


@pytest.fixture(scope="session")
def extract_sites():
    """``extract_sites(tmp_path, model_args, monkeypatch, capsys, *more) -> {domain: site cache}``."""
    return _extract_sites


def _same_scores(a_exp: dict, b_exp: dict, heldout: bool = True) -> None:
    """Two summaries' experiments: the same best and last round, the same accuracies (to 1e-12)."""
    for which in ("best", "last"):
        a, b = a_exp[which], b_exp[which]
        assert a["round"] == b["round"]
        assert a["test"] == pytest.approx(b["test"], abs=1e-12)
        if heldout:
            assert a["heldout"] == pytest.approx(b["heldout"], abs=1e-12)
        assert a["val_mean"] == pytest.approx(b["val_mean"], abs=1e-12)


def _same_metrics(dir_a, dir_b, loss_rtol: float | None = None):
    """Two run folders' metrics.parquet: the same rows, the same accuracies (to 1e-12) and, with ``loss_rtol``, the
    same losses. Returns both tables."""
    import numpy as np
    import pyarrow.parquet as pq

    m_a = pq.read_table(dir_a / "metrics.parquet").to_pandas()
    m_b = pq.read_table(dir_b / "metrics.parquet").to_pandas()
    assert list(m_a[["round", "client", "split", "n"]].itertuples(index=False)) == \
        list(m_b[["round", "client", "split", "n"]].itertuples(index=False))
    np.testing.assert_allclose(m_a["accuracy"], m_b["accuracy"], atol=1e-12)
    if loss_rtol is not None:
        np.testing.assert_allclose(m_a["loss"], m_b["loss"], rtol=loss_rtol)
    return m_a, m_b


@pytest.fixture(scope="session")
def same_scores():
    """``same_scores(a_exp, b_exp, heldout=True)``: the best and last rounds of two experiments agree (round; test,
    held-out and mean validation accuracy to 1e-12; ``heldout=False`` skips the held-out one)."""
    return _same_scores


@pytest.fixture(scope="session")
def same_metrics():
    """``same_metrics(dir_a, dir_b, loss_rtol=None) -> (table a, table b)``: two run folders' metrics.parquet have
    the same rows and accuracies (to 1e-12) and, with ``loss_rtol``, losses."""
    return _same_metrics
