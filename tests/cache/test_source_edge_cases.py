"""Edge cases of the container sources (Parquet, WebDataset) an adversarial probe found: whole-number labels
without ClassLabel names keep their numeric order (label 2 is class '2', not the 5th of '0','1','10','11','2');
mixed label kinds, values that are not text or whole numbers, a file/sample without a domain among ones with one,
duplicate tar keys and dotted keys are one-line refusals naming file and row/key; './' member names; non-regular
files matched by a glob are refused by stat (a FIFO never hangs); the pattern refusal names what it found."""
import io
import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedclip_cache import open_cache
from fedclip_cache.cache.bytesources import Columns, container_kind, scan_containers
from fedclip_cache.cache.sources import SourceError
from fedclip_cache.cache.wds_source import split_key
from fedclip_cache.synthetic import folder_images, write_image_folder


@pytest.fixture
def pngs(tmp_path) -> list[bytes]:
    """12 small distinct PNG images' bytes."""
    root = write_image_folder(tmp_path / "imgs", domains=("a", "b"), classes=("x", "y", "z"), per_class=2, size=16)
    return [p.read_bytes() for p, _, _ in folder_images(root)]


def tar(path, members) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def js(**kw) -> bytes:
    return json.dumps(kw).encode()


def parquet(path, images, labels, domains=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = {"image": pa.array(images, pa.binary()), "label": pa.array(labels)}
    if domains is not None:
        cols["domain"] = pa.array(domains)
    pq.write_table(pa.table(cols), path)
    return str(path)


def refused(source, *fragments) -> str:
    with pytest.raises(SourceError) as e:
        scan_containers(source, Columns())
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    return msg


# ------------------------------------------------------------------------------- 1. whole-number labels

def test_integer_parquet_labels_keep_numeric_order(tmp_path, pngs, model_args, run, extract_ok):
    labels = [0, 1, 2, 10, 11, 2, 0, 1, 10, 11, 2, 2]
    src = parquet(tmp_path / "p" / "d.parquet", pngs, labels)
    extract_ok(run, src, tmp_path / "c", model_args)
    cache = open_cache(tmp_path / "c")
    assert cache.classes == ["0", "1", "2", "10", "11"]
    got = {cache.paths[i]: cache.classes[int(cache.labels[i])] for i in range(len(cache))}
    assert got == {f"d.parquet#{r}": str(y) for r, y in enumerate(labels)}  # label 2 is class '2', not id 4


def test_cls_whole_numbers_numeric_order_and_text_labels_unchanged(tmp_path, pngs):
    src = tar(tmp_path / "w" / "0.tar", [(f"k{i:02d}.png", pngs[i]) if j == 0 else (f"k{i:02d}.cls", str(y).encode())
                                        for i, y in enumerate([10, 2, 1, 0]) for j in (0, 1)])
    table = scan_containers(src, Columns())
    assert table.classes == ["0", "1", "2", "10"]
    assert dict(zip(table.relpath.tolist(), table.class_name.tolist())) == {
        "0.tar#k00": "10", "0.tar#k01": "2", "0.tar#k02": "1", "0.tar#k03": "0"}
    # text labels (a .json string "10" is text, as a folder name would be) keep the text order
    src = tar(tmp_path / "t" / "0.tar", [m for i, y in enumerate(["10", "2", "b"])
                                        for m in ((f"k{i}.png", pngs[i]), (f"k{i}.json", js(label=y)))])
    assert scan_containers(src, Columns()).classes == ["10", "2", "b"]


def test_mixed_label_kinds_refused(tmp_path, pngs):
    parquet(tmp_path / "p" / "a.parquet", pngs[:2], [0, 1])
    parquet(tmp_path / "p" / "b.parquet", pngs[2:4], ["cat", "dog"])
    refused(str(tmp_path / "p"), "whole numbers in some rows", "a.parquet: row 0", "b.parquet: row 0", "one kind")
    src = tar(tmp_path / "w" / "0.tar", [("a.png", pngs[0]), ("a.cls", b"1"), ("b.png", pngs[1]), ("b.cls", b"cat")])
    refused(src, "whole numbers in some rows", "sample 'a'", "sample 'b'")


# ------------------------------------------------------------------------------- 2, 6, 7. tar keys

def test_duplicate_tar_key_refused(tmp_path, pngs):
    src = tar(tmp_path / "w" / "0.tar", [("a.png", pngs[0]), ("a.cls", b"cat"), ("b.png", pngs[1]),
                                         ("b.cls", b"dog"), ("a.png", pngs[2]), ("a.cls", b"dog")])
    refused(src, "0.tar: key 'a' twice", "came earlier", "tar --sort=name")
    # `tar cf s.tar .` in directory order: a sample's members apart (webdataset would read two half samples)
    src = tar(tmp_path / "w3" / "0.tar", [("./a.json", js(label="cat")), ("./b.png", pngs[1]),
                                          ("./b.json", js(label="dog")), ("./a.png", pngs[0])])
    refused(src, "0.tar: key 'a' twice", "member './a.png'", "next to each other")
    src = tar(tmp_path / "w2" / "0.tar", [("a.png", pngs[0]), ("a.png", pngs[1]), ("a.cls", b"cat")])
    refused(src, "0.tar: key 'a' twice", "a second member of one sample with this extension")


def test_dot_slash_members_and_dotted_keys(tmp_path, pngs):
    assert split_key("./k.png") == ("k", "png") and split_key("././d/k.seg.png") == ("d/k", "seg.png")
    src = tar(tmp_path / "w" / "0.tar", [("./k.png", pngs[0]), ("./k.json", js(label="cat", domain="art"))])
    table = scan_containers(src, Columns())
    assert table.relpath.tolist() == ["0.tar#k"] and table.class_name.tolist() == ["cat"]
    src = tar(tmp_path / "w2" / "0.tar", [("x.1.png", pngs[0]), ("x.1.json", js(label="cat")),
                                          ("x.2.png", pngs[1]), ("x.2.json", js(label="dog"))])
    refused(src, "sample 'x'", "'x.1.png'", "up to the first '.'", "several images", "x_1.png")
    src = tar(tmp_path / "w3" / "0.tar", [("x.1.png", pngs[0]), ("x.1.json", js(label="cat"))])
    refused(src, "sample 'x'", "'x.1.json'", "up to the first '.'")
    src = tar(tmp_path / "w4" / "0.tar", [("a.png", pngs[0]), ("a.json", b"[1, 2]")])
    refused(src, "sample 'a': its .json is list, not an object")


# ------------------------------------------------------------------------------- 3, 4. domains and values

def test_missing_domain_refused(tmp_path, pngs):
    parquet(tmp_path / "p" / "a.parquet", pngs[:2], ["cat", "dog"], ["art", "art"])
    parquet(tmp_path / "p" / "b.parquet", pngs[2:4], ["cat", "dog"])
    refused(str(tmp_path / "p"), "b.parquet: no domain", "while", "a.parquet has one")
    src = tar(tmp_path / "w" / "0.tar", [("a.png", pngs[0]), ("a.json", js(label="cat", domain="art")),
                                         ("b.png", pngs[1]), ("b.json", js(label="dog", domain=None))])
    refused(src, "sample 'b'", "'domain'", "empty")
    src = tar(tmp_path / "w2" / "0.tar", [("a.png", pngs[0]), ("a.json", js(label="cat", domain="art")),
                                          ("b.png", pngs[1]), ("b.json", js(label="dog"))])
    refused(src, "sample 'b': no domain", "sample 'a' has one")


@pytest.mark.parametrize("value", [float("nan"), True, 1.5, ["dog"], {"n": 1}])
def test_label_and_domain_values_not_text_refused(tmp_path, pngs, value):
    raw = json.dumps({"label": value, "domain": "art"}).encode()  # NaN: JSON's NaN, as Python writes it
    src = tar(tmp_path / "w" / "0.tar", [("a.png", pngs[0]), ("a.json", js(label="cat", domain="art")),
                                         ("b.png", pngs[1]), ("b.json", raw)])
    refused(src, "0.tar: sample 'b'", "label", type(value).__name__, "text or whole numbers")
    src = tar(tmp_path / "w2" / "0.tar", [("a.png", pngs[0]), ("a.json", js(label="cat", domain=value))])
    refused(src, "sample 'a'", "domain", "text or whole numbers")


@pytest.mark.parametrize("values", [[1.0, 2.5], [True, False], [[1], [2]]])
def test_parquet_values_not_text_refused(tmp_path, pngs, values):
    src = parquet(tmp_path / "p" / "d.parquet", pngs[:2], values, ["art", "art"])
    refused(src, "d.parquet: row 0", "label in 'label'", "text or whole numbers")
    src = parquet(tmp_path / "q" / "d.parquet", pngs[:2], ["cat", "dog"], values)
    refused(src, "d.parquet: row 0", "domain in 'domain'", "text or whole numbers")


# ------------------------------------------------------------------------------- 5, 8. what a pattern names

def test_glob_matching_fifo_loop_or_folder_refused(tmp_path, pngs):
    d = tmp_path / "w"
    tar(d / "0.tar", [("a.png", pngs[0]), ("a.cls", b"cat")])
    os.mkfifo(d / "1.tar")
    refused(str(d / "*.tar"), "1.tar: not a regular file (a FIFO)")  # stat only: would hang if opened
    refused(str(d / "{0..1}.tar"), "1.tar: not a regular file (a FIFO)")
    refused(f"{d / '0.tar'}::{d / '1.tar'}", "1.tar: not a regular file (a FIFO)")
    os.unlink(d / "1.tar")
    os.symlink(d / "2.tar", d / "2.tar")
    refused(str(d / "*.tar"), "2.tar: symbolic link loop")
    os.unlink(d / "2.tar")
    (d / "3.tar").mkdir()
    refused(str(d / "*.tar"), "3.tar: not a regular file (a folder)")


def test_pattern_refusal_names_what_it_found(tmp_path):
    with pytest.raises(SourceError, match=r"found no extension in '.*mixed/\*'\)"):
        container_kind(str(tmp_path / "mixed" / "*"))
    with pytest.raises(SourceError, match="an empty name in the '::' list"):
        container_kind(str(tmp_path / "00000.tar") + "::")


def test_refusal_through_cli_is_one_line(tmp_path, pngs, model_args, run, one_line_error):
    src = tar(tmp_path / "w" / "0.tar", [("a.png", pngs[0]), ("a.cls", b"1"), ("b.png", pngs[1]), ("b.cls", b"x")])
    one_line_error(*run("extract", src, tmp_path / "c", *model_args, "--workers", "0"), "whole numbers in some rows")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
