"""``sim_guard.marked`` lists the processes a cleanup will kill: an empty or relative folder, the root, or an empty
token would widen that to every process on the machine, so they are refused."""
import os
import subprocess
import sys
import time

import pytest

from fedclip_cache.launch.sim_guard import MARK, marked


@pytest.mark.parametrize("token,folder", [("", "/tmp/x"), ("t", ""), ("t", "relative/dir"), ("t", "/")])
def test_arguments_that_would_match_everything_are_refused(token, folder):
    with pytest.raises(ValueError, match="needs a token and an absolute run folder"):
        marked(token, folder, os.getpid())


def test_finds_a_process_by_its_mark_or_an_open_file_and_nothing_else(tmp_path):
    held = tmp_path / "log"
    held.write_text("")
    by_mark = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                               env={**os.environ, MARK: "tok"})
    by_file = subprocess.Popen([sys.executable, "-c", f"f = open({str(held)!r}); import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(100):  # until the second child has opened its file
            found = set(marked("tok", str(tmp_path), os.getpid()))
            if by_file.pid in found:
                break
            time.sleep(0.05)
        assert by_mark.pid in found and by_file.pid in found and other.pid not in found
    finally:
        for p in (by_mark, by_file, other):
            p.kill()
            p.wait()
