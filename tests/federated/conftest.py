"""Fixtures of the stage-2 tests: a real cache of a tiny image folder."""
import pytest


@pytest.fixture(scope="module")
def cache_dir(tiny_model, tmp_path_factory):
    """A real cache of a tiny image folder (3 images per class), extracted on the CPU with the tiny model: once per
    test module that uses it."""
    from fedclip_cache.cache.config import ModelSpec
    from fedclip_cache.cache.extract import ExtractConfig, extract
    from fedclip_cache.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("cache")
    src = write_image_folder(root / "data", per_class=3)
    cfg, ckpt = tiny_model
    extract(ExtractConfig(str(src), str(root / "cache"), ModelSpec(model_config=str(cfg), pretrained=str(ckpt)),
                          workers=0, progress=False, device="cpu"))
    return root / "cache"
