"""``sweep --log``: trackers receive the points trained by this command; re-used points are said not to be sent."""
from fedclip_cache.synthetic import write_synthetic_cache


def test_rerun_with_log_says_reused_points_were_not_sent(tmp_path, run):
    cache = write_synthetic_cache(tmp_path / "c", {"a": 30, "b": 30}, 3, dim=8, seed=0)
    args = ["sweep", str(cache), "-o", str(tmp_path / "sw"), "--grid", "hidden=4,8", "--seeds", "0", "--rounds", "1",
            "--protocol", "personal", "-q"]
    code, out, err = run(*args)
    assert code == 0 and "re-used point(s) were not sent" not in out
    code, out, err = run(*args, "--log", "tensorboard")
    assert code == 0 and "0 grid point(s) trained now, 2 re-used" in out
    assert "--log tensorboard: the 2 re-used point(s) were not sent" in out
    assert not (tmp_path / "sw" / "tb").exists()
