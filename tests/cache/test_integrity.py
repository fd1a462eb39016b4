"""One writer per cache and no half-written cache ever used: a second extract is refused while readers say the
cache is incomplete, a killed extract is refused by federate and sweep (unless --allow-incomplete) and finished by
the next run, and every kind of damage (truncated, missing or foreign shards, flipped bytes, damaged cache.json or
text embeddings, an older format) is a one-line error that the same extract command repairs."""
import json
import shutil

import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.store import CacheError


def test_concurrent_extract_is_refused_and_readers_wait(tmp_path, image_root, model_args, run, one_line_error,
                                                        shard_rows, slow_extract, wait_for_shards):
    out = tmp_path / "c"
    proc, cmd = slow_extract(image_root, out, model_args)
    wait_for_shards(out, 1)
    try:
        msg = one_line_error(*run("extract", image_root, out, *model_args, "--workers", "0", "-q"),
                             "another extract is writing this cache", f"pid {proc.pid}")
        assert "wait for it to finish" in msg
        one_line_error(*run("info", out), "incomplete cache", "still writing it", f"pid {proc.pid}")
        one_line_error(*run("federate", out, "--rounds", "1"), "incomplete cache", "--allow-incomplete")
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    c = open_cache(out)
    assert len(c) == 36 and len(set(c.ids.tolist())) == 36 and shard_rows(out)["n"] == 36


def test_killed_extract_is_refused_by_federate_then_finished(tmp_path, image_root, model_args, run, extract_ok,
                                                             one_line_error, slow_extract, wait_for_shards):
    import signal

    out = tmp_path / "c"
    proc, cmd = slow_extract(image_root, out, model_args, delay="0.3")
    wait_for_shards(out, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    one_line_error(*run("federate", out, "--rounds", "1"), "incomplete cache", "stopped before finishing",
                   "Re-run the same `fedclip-cache extract`")
    one_line_error(*run("sweep", out, "-o", tmp_path / "s", "--grid", "hidden=8", "--rounds", "1"),
                   "incomplete cache")
    code, o, e = run("federate", out, "--rounds", "1", "--allow-incomplete", "--json", "--protocol", "personal")
    assert code == 0, o + e
    summary = json.loads(o)
    assert summary["cache"]["complete"] is False and summary["cache"]["allow_incomplete"] is True
    (out / ".fedclip-tmp.cache.json.x1y2z3w4.tmp").write_text("{half")  # a kill during the metadata write
    extract_ok(run, image_root, out, model_args)
    assert not list(out.glob(".*.tmp")) and len(open_cache(out)) == 36


@pytest.mark.parametrize("fmt", ["parquet", "hdf5"])
def test_truncated_shard_is_a_clear_error_and_extract_repairs_it(tmp_path, image_root, model_args, run, fmt,
                                                                 extract_ok, one_line_error, one_shard):
    out, ref, shards = one_shard(tmp_path, image_root, model_args, run, fmt)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    one_line_error(*run("info", out), shards[1].name, "damaged shard", "re-run the same")
    with pytest.raises(CacheError, match="damaged shard"):
        open_cache(out)
    o = extract_ok(run, image_root, out, model_args, "--format", fmt)
    assert "+12 embedded" in o and "repaired" in o
    fixed = open_cache(out)
    assert (fixed.paths == ref.paths).all()
    np.testing.assert_allclose(fixed.features, ref.features, rtol=1e-5, atol=1e-6)


def test_deleted_or_foreign_width_shard_and_bit_rot(tmp_path, image_root, model_args, run, extract_ok, one_line_error,
                                                    one_shard):
    out, ref, shards = one_shard(tmp_path, image_root, model_args, run)
    shards[0].unlink()
    one_line_error(*run("info", out), shards[0].name, "missing", "re-run the same")
    extract_ok(run, image_root, out, model_args)
    # a shard of another embedding width (from another cache) put in place of a committed one
    from fedclip_cache.synthetic import write_synthetic_cache

    other = write_synthetic_cache(tmp_path / "w", {"art": 5}, 3, dim=8)
    victim = sorted((out / "shards").glob("part-*"))[0]
    shutil.copy(next((other / "shards").glob("part-*")), victim)
    one_line_error(*run("info", out), victim.name, "damaged shard")
    extract_ok(run, image_root, out, model_args)
    # same size, flipped bytes: only a checksum sees it
    victim = sorted((out / "shards").glob("part-*"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    one_line_error(*run("info", out, "--verify"), victim.name, "checksum")
    o = extract_ok(run, image_root, out, model_args, "--verify")
    assert "repaired" in o
    fixed = open_cache(out, verify=True)
    np.testing.assert_allclose(fixed.features, ref.features, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b"{}", b"[1, 2]", b'{"format": "parquet"}'])
def test_damaged_metadata_is_a_clear_error_and_extract_rebuilds_it(tmp_path, image_root, model_args, run, content,
                                                                   extract_ok, one_line_error, one_shard):
    out, ref, _ = one_shard(tmp_path, image_root, model_args, run)
    (out / "cache.json").write_bytes(content)
    one_line_error(*run("info", out), "cache.json", "re-run the same `fedclip-cache extract`")
    o = extract_ok(run, image_root, out, model_args)
    assert "+0 embedded" in o and "rebuilt" in o  # the shards were kept: nothing re-embedded
    np.testing.assert_allclose(open_cache(out).features, ref.features, rtol=1e-5, atol=1e-6)


def test_damaged_metadata_over_another_models_shards_is_refused(tmp_path, image_root, model_args, run, one_line_error,
                                                                one_shard):
    from fedclip_cache.synthetic import write_tiny_model

    out, _, _ = one_shard(tmp_path, image_root, model_args, run)
    (out / "cache.json").write_text("{}")
    cfg2, ckpt2 = write_tiny_model(tmp_path / "other", seed=1)
    one_line_error(*run("extract", image_root, out, "--model-config", model_args[1], "--pretrained", ckpt2, "-q",
                        "--workers", "0"), "another model", "new output folder")
    assert len(list((out / "shards").glob("part-*"))) == 3  # nothing deleted


def test_old_format_cache_is_refused(tmp_path, image_root, model_args, run, one_line_error, one_shard):
    out, _, _ = one_shard(tmp_path, image_root, model_args, run)
    meta = json.loads((out / "cache.json").read_text())
    meta["format_version"] = 1
    (out / "cache.json").write_text(json.dumps(meta))
    one_line_error(*run("info", out), "another fedclip-cache version", "re-extract")
    one_line_error(*run("extract", image_root, out, *model_args, "-q"), "another fedclip-cache version",
                   "new output folder")


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_missing_or_damaged_text_embeddings_are_refused_and_rebuilt(tmp_path, image_root, model_args, run, damage,
                                                                    extract_ok, one_line_error, one_shard):
    out, ref, _ = one_shard(tmp_path, image_root, model_args, run)
    text = out / "text.parquet"
    text.unlink() if damage == "delete" else text.write_bytes(b"PAR1 not really")
    one_line_error(*run("federate", out, "--rounds", "1"), "text", "re-run the same extract command")
    one_line_error(*run("info", out), "text", "re-run the same extract command")
    extract_ok(run, image_root, out, model_args)
    np.testing.assert_array_equal(open_cache(out).text_embeddings, ref.text_embeddings)


def test_deleting_the_lock_file_does_not_let_a_second_writer_in(tmp_path):
    from fedclip_cache.cache.integrity import CacheBusy, WriterLock

    with WriterLock(tmp_path / "c"):
        (tmp_path / "c" / ".lock").unlink()
        with pytest.raises(CacheBusy, match="another extract is writing"):
            WriterLock(tmp_path / "c").__enter__()
    with WriterLock(tmp_path / "c"):  # released on exit
        pass
