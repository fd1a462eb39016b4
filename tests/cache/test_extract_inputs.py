"""What extract takes from the user never becomes a traceback or a path outside its place: names that end up in file
names (domain, client), prompt templates, checkpoint files, empty sources, and our own output folders found inside a
dataset. Every refusal is one line naming the file or option and the fix, exit 2, before anything is written."""
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedclip_cache import open_cache
from fedclip_cache.errors import FedclipCacheError
from fedclip_cache.cache.extract import ExtractConfig, extract
from fedclip_cache.cache.models import ModelLoadError, ModelSpec, load_model
from fedclip_cache.pipeline import load as load_pipeline
from fedclip_cache.synthetic import write_image_folder, write_synthetic_cache


REPO = Path(__file__).resolve().parents[2]


def write_manifest(path: Path, image_root: Path, domain=None, client=None, label=None, fmt="csv") -> Path:
    """A manifest of every image of ``image_root``; ``domain``/``client``/``label`` replace the value of row 3."""
    rows = sorted(str(p.relative_to(path.parent)) for p in image_root.rglob("*.png"))
    cols = {"path": rows, "label": [Path(r).parts[-2] for r in rows], "domain": [Path(r).parts[-3] for r in rows],
            "client": [Path(r).parts[-3] for r in rows]}
    for name, v in (("domain", domain), ("client", client), ("label", label)):
        if v is not None:
            cols[name][1] = v
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(cols), path)
    else:
        lines = [",".join(cols)] + [",".join(vals) for vals in zip(*cols.values())]
        path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------- names that become file names

BAD_NAMES = [
    ("..", "means the parent folder"),
    (".", "means this folder"),
    ("a/b", "path separator '/'"),
    ("a\\b", "path separator '\\\\'"),
    ("a\x00b", "control character '\\x00'"),
    ("a\nb", "control character '\\n'"),
    ("a\x7fb", "control character '\\x7f'"),
    (" art", "leading or trailing spaces"),
    ("é" * 101, "202 bytes long"),
]


@pytest.mark.parametrize("column", ["domain", "client"])
@pytest.mark.parametrize("name,why", BAD_NAMES, ids=[repr(n[:6]) for n, _ in BAD_NAMES])
def test_manifest_name_unusable_as_a_file_name_is_refused(tmp_path, image_root, model_args, run, column, name, why,
                                                          one_line_error):
    # Parquet carries any string (NUL, newline) that a CSV cannot; the rule is the same for both
    fmt = "csv" if name.isprintable() and "," not in name and name.strip() == name else "parquet"
    man = write_manifest(tmp_path / f"m.{fmt}", image_root, **{column: name}, fmt=fmt)
    msg = one_line_error(*run("extract", man, tmp_path / "c", *model_args, "-q", "--workers", "0"),
                         f"m.{fmt}: row 3, column {column!r}: {column} name {name!r}", why, "rename it")
    assert "site-<domain>" in msg
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_domain_folder_names_are_checked_and_class_names_are_text(tmp_path, model_args, run, one_line_error):
    root = write_image_folder(tmp_path / "data", domains=("art", "photo"), per_class=1)
    os.rename(root / "photo", root / "pho\nto")  # a folder name may hold a newline
    one_line_error(*run("extract", root, tmp_path / "c", *model_args, "-q"), "pho\\nto (a domain folder)",
                   "domain name 'pho\\nto' holds the control character '\\n'")
    os.rename(root / "pho\nto", os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9"))  # not UTF-8
    one_line_error(*run("extract", root, tmp_path / "c", *model_args, "-q"), "caf\\xe9 (a domain folder)",
                   "is not valid UTF-8")
    os.rename(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9"), root / "photo")
    os.rename(root / "art" / "dog", root / "art" / "do\tg")
    one_line_error(*run("extract", root, tmp_path / "c", *model_args, "-q"), "do\\tg (a class folder)",
                   "class name 'do\\tg' holds the control character '\\t'")
    assert not (tmp_path / "c").exists()


def test_path_name_rule_accepts_real_names_and_class_names_may_hold_a_slash(tmp_path):
    from fedclip_cache.cache.sources import SourceError, check_label_text, check_path_name

    for ok in ("art_painting", "Real World", "b#10", "café", "清华", "-x", ".hidden", "a" * 200):
        check_path_name("domain", ok, "here")
    with pytest.raises(SourceError, match="here: client name ''"):
        check_path_name("client", "", "here")
    check_label_text("class", "T-shirt/top", "here")  # never a file name: prompt text only
    with pytest.raises(SourceError, match="here: class name 'cat\\\\x00' holds the control character"):
        check_label_text("class", "cat\x00", "here")
    # a manifest class with a slash is embedded (and prompted) as written
    with pytest.raises(FedclipCacheError, match="--classes: class name 'a\\\\x00b'"):
        extract(ExtractConfig(source=str(tmp_path), out=str(tmp_path / "c"), classes=["cat", "a\x00b"]))


def test_manifest_class_with_a_slash_is_kept_and_clients_like_b10_are_fine(tmp_path, image_root, model_args, run,
                                                                           extract_ok):
    man = write_manifest(tmp_path / "m.csv", image_root, label="T-shirt/top", client="b#10")
    extract_ok(run, man, tmp_path / "c", model_args)
    c = open_cache(tmp_path / "c")
    assert "T-shirt/top" in c.classes and "b#10" in set(c.clients.tolist())


# ------------------------------------------------------------------------------------------- prompt templates

BAD_TEMPLATES = [
    ("{}{}", "has 2 '{}' placeholders"),
    ("a {0}", "format field '{0}'"),
    ("a {name}", "format field '{name}'"),
    ("a {:>9}", "format field '{:>9}'"),
    ("a {!r}", "format field '{!r}'"),
    ("a {} }", "unmatched '{' or '}'"),
    ("a { {}", "unmatched '{' or '}'"),
    ("a {{}}", "no '{}' placeholder"),
]


@pytest.mark.parametrize("template,why", BAD_TEMPLATES, ids=[t for t, _ in BAD_TEMPLATES])
def test_bad_template_is_one_line_from_cli_pipeline_and_library(tmp_path, image_root, model_args, run, template,
                                                                 why, one_line_error):
    one_line_error(*run("extract", image_root, tmp_path / "c", *model_args, "-q", "--template", template),
                   f"--template: template {template!r}", why)
    with pytest.raises(FedclipCacheError, match="extract.templates") as e:
        load_pipeline(REPO / "pipelines" / "pacs.toml", [f"extract.templates={json.dumps([template])}"])
    assert why in str(e.value)
    with pytest.raises(FedclipCacheError) as e:
        extract(ExtractConfig(source=str(image_root), out=str(tmp_path / "c"), templates=[template]))
    assert why in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


def test_literal_braces_are_allowed_and_rendered(tmp_path, image_root, model_args):
    from fedclip_cache.cache.config import template_problem

    assert template_problem("a {{photo}} of a {}") == ""
    from fedclip_cache.cache.extract import encode_text

    lm = load_model(ModelSpec(model_config=model_args[1], pretrained=model_args[3]))
    seen = []
    tok = lm.tokenizer
    lm.tokenizer = lambda texts: seen.extend(texts) or tok(texts)
    encode_text(lm, ["a {{photo}} of a {}"], ["cat"], torch.device("cpu"), "fp32")
    assert seen == ["a {photo} of a cat"]


# ------------------------------------------------------------------------------------- --pretrained not weights

def _files(tmp_path: Path, ckpt: Path) -> dict:
    """name -> (path, expected fragment)"""
    sd = torch.load(ckpt)
    d = tmp_path / "ck"
    d.mkdir()
    out = {}

    def put(name, fragment, data=None, obj=None):
        p = d / name
        if data is not None:
            p.write_bytes(data)
        else:
            torch.save(obj, p)
        out[name] = (p, fragment)

    put("text.pt", "not a model checkpoint: it is a text file (it starts with 'hello world')", b"hello world\n")
    put("random.pt", "unknown binary data, neither a torch.save zip archive, a pickle nor safetensors",
        bytes(range(7, 256)) * 8)
    put("pickle-like.pt", "not a readable checkpoint: its pickle data is damaged", b"\x80\x02" + bytes(range(256)) * 4)
    put("empty.pt", "an empty file (0 bytes)", b"")
    put("page.bin", "an HTML page", b"<!DOCTYPE html><html>404</html>")
    put("lfs.bin", "a Git LFS pointer", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    put("truncated.pt", "a damaged or truncated zip archive", ckpt.read_bytes()[:len(ckpt.read_bytes()) // 2])
    with zipfile.ZipFile(d / "other.zip", "w") as z:
        z.writestr("notes.txt", "hi")
    out["other.zip"] = (d / "other.zip", "a zip archive without data.pkl (it holds notes.txt)")
    put("tensor.pt", "not a model checkpoint: it holds a Tensor, not a state dict", obj=torch.zeros(3))
    put("emptydict.pt", "it holds an empty dict", obj={})
    wrong = dict(sd)
    wrong.pop("positional_embedding")
    wrong.pop("text_projection")
    wrong["extra.weight"] = torch.zeros(1)
    put("keys.pt", "does not fit model tiny-clip: 2 missing key(s) (first: 'positional_embedding'), "
                   "1 unexpected key(s) (first: 'extra.weight')", obj=wrong)
    wrong = dict(sd)
    wrong["token_embedding.weight"] = torch.zeros(7)
    put("shape.pt", "1 of another shape (first: 'token_embedding.weight: checkpoint [7], model [49408, 64]')",
        obj=wrong)
    wrong = dict(sd)
    wrong["positional_embedding"] = torch.zeros(7)  # open_clip's resize step fails first (an IndexError)
    put("shape0.pt", "1 of another shape (first: 'positional_embedding: checkpoint [7]", obj=wrong)
    return out


def test_pretrained_file_that_is_not_a_checkpoint_is_named_for_what_it_is(tmp_path, tiny_model, image_root, run,
                                                                          one_line_error):
    cfg, ckpt = tiny_model
    for name, (path, fragment) in _files(tmp_path, ckpt).items():
        with pytest.raises(ModelLoadError) as e:
            load_model(ModelSpec(model_config=str(cfg), pretrained=str(path)))
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and fragment in msg and "\n" not in msg, (name, msg)
        assert "pickled Python objects" not in msg, (name, msg)  # that is said only of real pickled objects
    # through the CLI: one line, exit 2, nothing written
    text = tmp_path / "ck" / "text.pt"
    one_line_error(*run("extract", image_root, tmp_path / "c", "--model-config", cfg, "--pretrained", text, "-q"),
                   f"{text}: not a model checkpoint: it is a text file", "--pretrained")
    assert not (tmp_path / "c" / "cache.json").exists()


def test_safetensors_under_another_name_is_named_and_still_loads_when_renamed(tmp_path, tiny_model):
    from safetensors.torch import save_file

    cfg, ckpt = tiny_model
    sd = {k: v.contiguous() for k, v in torch.load(ckpt).items()}
    save_file(sd, tmp_path / "w.bin")
    with pytest.raises(ModelLoadError, match="w.bin: not a model checkpoint: it is a safetensors file, but open_clip "
                                             "reads safetensors only from a name ending in .safetensors"):
        load_model(ModelSpec(model_config=str(cfg), pretrained=str(tmp_path / "w.bin")))
    os.rename(tmp_path / "w.bin", tmp_path / "w.safetensors")
    lm = load_model(ModelSpec(model_config=str(cfg), pretrained=str(tmp_path / "w.safetensors")))
    assert torch.equal(lm.model.state_dict()["text_projection"], sd["text_projection"])


# ------------------------------------------------------------------------------------------ nothing to extract

def test_empty_sources_are_one_line_errors(tmp_path, model_args, run, one_line_error):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "header.csv").write_text("path,label,domain\n")
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "label": pa.array([], pa.string()),
                             "domain": pa.array([], pa.string())}), tmp_path / "header.parquet")
    (tmp_path / "gone.csv").write_text("path,label,domain\nnope.png,cat,art\nnotes.txt,cat,art\n")
    links = tmp_path / "links" / "art" / "cat"
    links.mkdir(parents=True)
    os.symlink(tmp_path / "missing.png", links / "a.png")
    for src, fragments in (("header.csv", ("header.csv: the manifest has no rows",)),
                           ("header.parquet", ("header.parquet: the manifest has no rows",)),
                           ("gone.csv", ("gone.csv: the manifest lists no image that can be embedded",
                                         "2 ignored, first: nope.png: listed in manifest but missing on disk")),
                           ("links", ("links: no images found that can be embedded", "1 unreadable",
                                      "broken symbolic link", "fix or replace the unreadable files"))):
        one_line_error(*run("extract", tmp_path / src, tmp_path / "c", *model_args, "-q"), *fragments)
        assert not (tmp_path / "c").exists()


def test_all_images_skipped_is_an_error_and_an_emptied_source_never_empties_the_cache(tmp_path, model_args, run,
                                                                                      extract_ok, one_line_error):
    bad = tmp_path / "bad" / "art" / "cat"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"not a png")
    one_line_error(*run("extract", tmp_path / "bad", tmp_path / "cb", *model_args, "-q", "--workers", "0"),
                   "no image could be embedded (1 skipped, first: art/cat/a.png: not an image")
    # an existing cache whose source now lists nothing (a manifest cut short, an unmounted disk) is left as it was
    root = write_image_folder(tmp_path / "data", domains=("art", "photo"), per_class=1)
    man = write_manifest(tmp_path / "m.csv", root)
    extract_ok(run, man, tmp_path / "c", model_args)
    before = open_cache(tmp_path / "c")
    (tmp_path / "m.csv").write_text("path,label,domain\n")
    one_line_error(*run("extract", man, tmp_path / "c", *model_args, "-q"), "the manifest has no rows",
                   "an existing cache is left as it was")
    after = open_cache(tmp_path / "c")
    assert len(after) == len(before) == 6 and np.array_equal(after.features, before.features)


# ------------------------------------------------------------------------- our own outputs inside the dataset

def test_run_sweep_and_cache_folders_inside_the_dataset_are_not_embedded(tmp_path, model_args, run, extract_ok):
    root = write_image_folder(tmp_path / "data", domains=("art", "photo"), per_class=1)
    cache = write_synthetic_cache(tmp_path / "syn", {"a": 12, "b": 12}, 2, dim=8)
    for args in (("federate", cache, "-o", root / "runs" / "x"),  # DATA/runs/x/plots/*.png
                 ("sweep", cache, "-o", root / "sw", "--grid", "hidden=4", "--seeds", "0")):
        code, o, e = run(*args, "--rounds", "1", "--batch-size", "4", "-q")
        assert code == 0, o + e
    assert list((root / "runs" / "x" / "plots").glob("*.png")) and list((root / "sw").rglob("*.png"))
    out = extract_ok(run, root, root / "cache", model_args)  # the cache itself inside the dataset, too
    assert "runs/x/: a fedclip-cache run folder (config.json) inside the dataset: not data, skipped" in out
    # a cache made elsewhere and copied in (cache.json + shards/) is recognised at any depth
    import shutil

    shutil.copytree(cache, root / "art" / "cat" / "old-cache")
    shutil.copy(next((root / "art" / "cat").glob("*.png")), root / "art" / "cat" / "old-cache" / "x.png")
    out = extract_ok(run, root, root / "cache", model_args)
    assert "+0 embedded" in out and "sw/: a fedclip-cache sweep (sweep.json)" in out
    assert "cache/: the cache folder of this extract" in out
    assert "art/cat/old-cache/: a fedclip-cache cache (cache.json + shards/)" in out
    c = open_cache(root / "cache")
    assert set(c.domain_names) == {"art", "photo"} and len(c) == 6
    ignored = dict(map(tuple, c.meta["ignored"]))
    assert {"runs/x/", "sw/", "cache/", "art/cat/old-cache/"} <= set(ignored)


@pytest.mark.parametrize("classes", [("Cat", "cat"), ("caf\u00e9", "cafe\u0301"), ("a " * 90 + "x", "a " * 90 + "y")])
def test_classes_the_tokenizer_cannot_tell_apart_are_refused(tmp_path, model_args, run, classes, extract_ok,
                                                             one_line_error):
    """Class folders 'Cat' and 'cat' (or one name in two Unicode spellings, or two names that differ only past the
    77-token cut) were two classes with the same text embedding: zero-shot and FedCLIP could not separate them."""
    root = write_image_folder(tmp_path / "data", domains=("art",), classes=classes + ("dog",), per_class=1)
    out = tmp_path / "c"
    one_line_error(*run("extract", root, out, *model_args, "-q", "--workers", "0"), "classes {} and {} give the same "
                   "prompt".format(*map(ascii, sorted(classes))), "rename or merge one")
    assert not (out / "cache.json").exists() and not list(out.glob("shards/*"))
    ok = write_image_folder(tmp_path / "ok", domains=("art",), classes=(classes[0], "dog"), per_class=1)
    extract_ok(run, ok, tmp_path / "c2", model_args)


def test_huge_list_files_and_names_are_refused_in_a_short_line(tmp_path, image_root, model_args, run, one_line_error):
    """A 1 GB file of zeros passed as --classes took 24 GB of memory and was killed after 5 minutes; a 15 MB one was
    a 63 MB 'one-line' error (the whole name quoted)."""
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(17 << 20)  # sparse: costs no disk (1 GB, as measured, would exhaust memory on unfixed code)
    for option in ("--classes", "--templates-file"):
        code, o, e = run("extract", image_root, tmp_path / "c", *model_args, "-q", option, huge)
        text = " ".join((o + e).replace("│", " ").split())  # typer's usage box wraps the line
        assert code == 2 and f"Invalid value for {option}" in text and "17,825,792 bytes, far more than a list" \
            in text and "(at most 16 MiB)" in text
    long = tmp_path / "long.txt"
    long.write_bytes(b"\0" * (1 << 20))
    msg = one_line_error(*run("extract", image_root, tmp_path / "c", *model_args, "-q", "--classes", long),
                         "--classes: class name", "(1,048,576 characters) holds the control character")
    assert len(msg) < 400 and not (tmp_path / "c").exists()


def test_a_template_that_fills_the_context_is_refused(tmp_path, image_root, model_args, run, one_line_error):
    """80 words before {}: the tokenizer cut every prompt before the class name, so every class had the same text
    embedding (exit 0)."""
    template = "a " * 80 + "{}"
    msg = one_line_error(*run("extract", image_root, tmp_path / "c", *model_args, "-q", "--workers", "0",
                              "--template", template), "--template 'a a a", "is too long", "before the class name",
                         "classes 'cat' and 'dog' would get the same text embedding; shorten the template")
    assert len(msg) < 400
