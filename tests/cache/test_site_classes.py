"""`extract --classes FILE`: sites of one federation index labels and text prompts alike, even where a site lacks a
class; a class outside the list, or a malformed list, is refused in one line."""
import numpy as np
import pytest

from fedclip_cache import open_cache
from fedclip_cache.synthetic import write_image_folder


def test_sites_with_different_classes_share_labels_and_prompts(tmp_path, model_args, run, extract_ok):
    site_a = write_image_folder(tmp_path / "a", domains=("art",), classes=("cat", "dog"), per_class=2)
    site_b = write_image_folder(tmp_path / "b", domains=("photo",), classes=("dog", "fish"), per_class=2, seed=1)
    names = tmp_path / "classes.txt"
    names.write_text("fish\ncat\n\ndog\n")  # label order is the file's order; blank lines ignored
    extract_ok(run, str(site_a), str(tmp_path / "ca"), model_args, "--classes", str(names))
    extract_ok(run, str(site_b), str(tmp_path / "cb"), model_args, "--classes", str(names))
    ca, cb = open_cache(tmp_path / "ca"), open_cache(tmp_path / "cb")
    assert ca.classes == cb.classes == ["fish", "cat", "dog"]
    assert ca.text_embeddings.shape == cb.text_embeddings.shape == (1, 3, ca.dim)
    np.testing.assert_array_equal(ca.text_embeddings, cb.text_embeddings)  # same model, same prompts
    for c in (ca, cb):
        for name, label in zip(c.class_names, c.labels):
            assert c.classes[label] == name
    assert set(ca.labels) == {1, 2} and set(cb.labels) == {0, 2}  # dog is 2 at both sites
    # without --classes each site would have indexed its own two classes: dog = 1 at site a, 0 at site b
    extract_ok(run, str(site_b), str(tmp_path / "own"), model_args)
    assert open_cache(tmp_path / "own").classes == ["dog", "fish"]


@pytest.mark.parametrize("content,fragment", [
    ("cat\n", "class 'dog' (1 class(es) in all) is not in the --classes list"),
    ("cat\ndog\ncat\n", "class 'cat' is listed twice"),
    ("\n\n", "the class list must name at least one class"),
])
def test_bad_class_lists_are_one_line_errors(tmp_path, model_args, run, content, fragment):
    site = write_image_folder(tmp_path / "a", domains=("art",), classes=("cat", "dog"), per_class=1)
    names = tmp_path / "classes.txt"
    names.write_text(content)
    code, out, err = run("extract", str(site), str(tmp_path / "c"), *model_args, "--workers", "0", "-q",
                         "--classes", str(names))
    assert code == 2, out + err
    lines = [ln for ln in (out + err).splitlines() if fragment in ln]
    assert lines and "Traceback" not in out + err, out + err
    assert not (tmp_path / "c" / "shards").exists() or not any((tmp_path / "c" / "shards").iterdir())
