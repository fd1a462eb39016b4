"""Reading the image files a scan finds: every odd file we know (FIFOs, broken or looping links, folder loops,
undecodable names, empty, truncated or mis-named files, alpha, 1-bit, 16-bit, GIF) is embedded, skipped or ignored
as expected without hanging or aborting the run; EXIF orientation is opt-in and part of the fingerprint; 16-bit
images always scale by 65535."""
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fedclip_cache import open_cache
from fedclip_cache.synthetic import write_image_folder


def _odd_dataset(root: Path) -> dict[str, str]:
    """Every kind of odd file we know, with the expected outcome: embedded | skipped:<why> | ignored:<why>."""
    write_image_folder(root, per_class=2)
    good = root / "art/cat/art_cat_0000.png"
    d = root / "art/cat"
    expect = {str(p.relative_to(root)): "embedded" for p in root.rglob("*.png")}
    os.mkfifo(d / "fifo.jpg")
    os.symlink(d / "gone.png", d / "dangling.png")
    os.symlink("self.png", d / "self.png")
    os.symlink(good, d / "alias.png")
    (d / "folder.jpg").mkdir()
    shutil.copy(good, d / "folder.jpg" / "inside.png")
    os.symlink("..", d / "up")  # a folder loop: art/cat/up -> art/
    non_utf8 = os.fsdecode(b"caf\xe9.png")
    shutil.copy(good, os.path.join(d, non_utf8))
    shutil.copy(good, d / "UPPER.PNG")
    shutil.copy(good, d / "space name.png")
    shutil.copy(good, d / "ünïcödé.png")
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.png").write_text("not a png")
    data = good.read_bytes()
    (d / "half.png").write_bytes(data[: len(data) // 2])
    Image.open(good).convert("RGBA").save(d / "alpha.png")
    Image.open(good).convert("LA").save(d / "greyalpha.png")
    Image.open(good).convert("1").save(d / "onebit.png")
    Image.open(good).convert("RGB").save(d / "tiny.gif")
    Image.new("RGB", (1, 1)).save(d / "onepixel.png")
    Image.open(good).convert("RGB").save(d / "jpeg-named.png", format="JPEG")
    (d / "notes.txt").write_text("hello")
    (d / ".hidden.png").write_bytes(data)
    expect.update({
        "art/cat/fifo.jpg": "skipped:not a regular file (a FIFO)",
        "art/cat/dangling.png": "skipped:broken symbolic link",
        "art/cat/self.png": "skipped:symbolic link loop",
        "art/cat/alias.png": "embedded",
        "art/cat/folder.jpg/inside.png": "embedded",
        "art/cat/up": "ignored:linked folder inside a class folder, not followed",
        os.path.join("art/cat", non_utf8): "embedded",
        "art/cat/UPPER.PNG": "embedded",
        "art/cat/space name.png": "embedded",
        "art/cat/ünïcödé.png": "embedded",
        "art/cat/zero.jpg": "skipped:empty file",
        "art/cat/text.png": "skipped:not an image",
        "art/cat/half.png": "skipped:",
        "art/cat/alpha.png": "embedded",
        "art/cat/greyalpha.png": "embedded",
        "art/cat/onebit.png": "embedded",
        "art/cat/tiny.gif": "embedded",
        "art/cat/onepixel.png": "embedded",
        "art/cat/jpeg-named.png": "embedded",
        "art/cat/notes.txt": "ignored:not an image file extension",
    })
    return expect


def test_odd_files_table(tmp_path, model_args, run, extract_ok):
    """Each odd file gets its expected outcome, the run neither hangs nor aborts, and nothing else is lost."""
    root = tmp_path / "data"
    expect = _odd_dataset(root)
    t0 = time.time()
    code, o, e = run("extract", root, tmp_path / "c", *model_args, "--workers", "0", "-q")
    assert code == 0 and "Traceback" not in o + e and time.time() - t0 < 120, o + e
    c = open_cache(tmp_path / "c")
    skipped = {s["path"]: s["reason"] for s in c.skipped}
    ignored = {p: r for p, r in c.meta["ignored"]}
    embedded = set(c.paths.tolist())
    for path, outcome in expect.items():
        kind, _, why = outcome.partition(":")
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        if kind == "embedded":
            assert path in embedded, path
        elif kind == "skipped":
            assert why in skipped.get(shown, "<not skipped>"), (path, skipped.get(shown))
        else:
            assert any(p.startswith(path) and why in r for p, r in ignored.items()), (path, ignored)
    assert embedded == {p for p, k in expect.items() if k == "embedded"}  # nothing else embedded, nothing lost
    assert len(skipped) == sum(k.startswith("skipped") for k in expect.values())
    # undecodable names are stored losslessly: the path maps back to the very bytes on disk
    raw = [p for p in c.paths if b"\xe9" in os.fsencode(p)]
    assert len(raw) == 1 and os.path.isfile(root / raw[0])
    code, o, e = run("info", tmp_path / "c")
    assert code == 0, o + e  # rendering never crashes on such names
    assert "Traceback" not in o + e
    # a second run re-checks the odd files and changes nothing
    o2 = extract_ok(run, root, tmp_path / "c", model_args)
    assert "+0 embedded" in o2 and (open_cache(tmp_path / "c").paths == c.paths).all()


def test_exif_orientation_is_opt_in_and_part_of_the_fingerprint(tmp_path, model_args, run, extract_ok, one_line_error):
    root = write_image_folder(tmp_path / "data", per_class=1)
    img = Image.open(root / "art/cat/art_cat_0000.png").convert("RGB")
    arr = np.asarray(img).copy()
    arr[:, :20] = 255  # make it asymmetric so the rotation matters
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    Image.fromarray(arr).save(root / "art/cat/rotated.jpg", exif=exif.tobytes())
    extract_ok(run, root, tmp_path / "plain", model_args)
    extract_ok(run, root, tmp_path / "exif", model_args, "--exif-transpose")
    a, b = open_cache(tmp_path / "plain"), open_cache(tmp_path / "exif")
    i = list(a.paths).index("art/cat/rotated.jpg")
    assert not np.allclose(a.features[i], b.features[i])
    others = [k for k, p in enumerate(a.paths) if p != "art/cat/rotated.jpg"]
    np.testing.assert_allclose(a.features[others], b.features[others], rtol=1e-5, atol=1e-6)
    one_line_error(*run("extract", root, tmp_path / "plain", *model_args, "--exif-transpose", "-q"),
                   "exif_transpose", "new output folder")


def test_sixteen_bit_images_always_scale_by_65535(tmp_path):
    from fedclip_cache.cache.imageio import open_rgb

    for value, grey in ((65535, 255), (32768, 128), (300, 1), (200, 1), (100, 0)):
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(tmp_path / "x.png")
        assert Image.open(tmp_path / "x.png").mode == "I;16"
        assert np.asarray(open_rgb(str(tmp_path / "x.png")))[0, 0, 0] == grey, value
