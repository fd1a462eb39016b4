"""A sweep re-uses a finished point only for the same cache and the same commit of it: a new commit of the cache
trains the points again, and another cache is refused in a folder that holds a sweep."""
import json
import shutil

from fedclip_cache.synthetic import write_image_folder


def test_sweep_never_reuses_points_of_another_cache_or_commit(tmp_path, model_args, run, extract_ok, one_line_error):
    root = write_image_folder(tmp_path / "data", per_class=4)
    extract_ok(run, root, tmp_path / "c", model_args)
    args = ["--grid", "hidden=4,8", "--seeds", "0", "--rounds", "1", "--head", "prototype", "-q"]
    assert run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)[0] == 0
    code, o, e = run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)
    assert code == 0 and "0 grid point(s) trained now" in o  # same cache, same commit: re-used
    shutil.rmtree(root / "sketch" / "fish")
    extract_ok(run, root, tmp_path / "c", model_args)  # a new commit: 4 images retired
    code, o, e = run("sweep", tmp_path / "c", "-o", tmp_path / "s", *args)
    assert code == 0 and "2 grid point(s) trained now (2 of them again because the cache changed" in o
    for summary in (tmp_path / "s" / "points").glob("*/summary.json"):
        assert json.loads(summary.read_text())["cache"]["images"] == 32
    other = write_image_folder(tmp_path / "other", per_class=2)
    extract_ok(run, other, tmp_path / "c2", model_args)
    # another cache, same folder: refused (its rows would mix with the first cache's); a new folder
    one_line_error(*run("sweep", tmp_path / "c2", "-o", tmp_path / "s", *args), "holds another sweep", "new folder")
    code, o, e = run("sweep", tmp_path / "c2", "-o", tmp_path / "s2", *args)
    assert code == 0 and "2 grid point(s) trained now" in o
    assert {json.loads(p.read_text())["cache"]["images"] for p in (tmp_path / "s2" / "points").glob("*/summary.json")} \
        == {18}
