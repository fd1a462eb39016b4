"""Bad extract options and sources are one-line errors (exit 2, naming the option or file) and write nothing."""
import os

import pytest

from fedclip_cache.synthetic import write_image_folder


BAD_EXTRACT_OPTIONS = [
    (["--device", "gpu"], "--device 'gpu' unknown"),
    (["--format", "csv"], "--format 'csv' unknown"),
    (["--dtype", "int8"], "--dtype 'int8' unknown"),
    (["--precision", "fp8"], "--precision 'fp8' unknown"),
    (["--template", "no placeholder"], "no '{}' placeholder"),
    (["--template", "a {}", "--template", "a {}"], "twice"),
    (["--image-mean", "0.5,nan,0.5"], "--image-mean takes three finite numbers"),
    (["--image-std", "0.5,0,0.5"], "--image-std values must be > 0"),
    (["--model", "no-such-model", "--pretrained", "none"], "unknown model 'no-such-model'"),
    (["--dataset", "Pacs2"], "--dataset 'Pacs2' unknown"),
]


@pytest.mark.parametrize("extra,fragment", BAD_EXTRACT_OPTIONS, ids=[" ".join(a) for a, _ in BAD_EXTRACT_OPTIONS])
def test_bad_extract_options_are_one_line_errors(tmp_path, image_root, model_args, run, extra, fragment,
                                                 one_line_error):
    args = list(model_args) if not any(a == "--model" for a in extra) else []
    one_line_error(*run("extract", image_root, tmp_path / "c", *args, "-q", "--workers", "0", *extra), fragment)
    assert not (tmp_path / "c" / "cache.json").exists()  # nothing written


def test_bad_sources_are_one_line_errors(tmp_path, model_args, run, one_line_error):
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "latin1.csv").write_bytes(b"path,label,domain\ncaf\xe9.png,cat,art\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file-as-out").write_text("x")
    root = write_image_folder(tmp_path / "data", per_class=1)
    one_line_error(*run("extract", tmp_path / "latin1.csv", tmp_path / "c", *model_args, "-q"), "latin1.csv",
                   "UTF-8")
    one_line_error(*run("extract", tmp_path / "empty", tmp_path / "c", *model_args, "-q"), "no images found")
    one_line_error(*run("extract", tmp_path / "missing", tmp_path / "c", *model_args, "-q"), "not a folder")
    one_line_error(*run("extract", root, tmp_path / "file-as-out", *model_args, "-q"), "not a folder")
    one_line_error(*run("info", tmp_path / "empty"), "not a fedclip-cache cache")
    one_line_error(*run("extract", tmp_path / "fifo.csv", tmp_path / "c", *model_args, "-q"), "fifo.csv",
                   "not a folder")
