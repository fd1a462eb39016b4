"""open_clip's private names behind ``cache/openclip_compat.py``: these fail loudly when an open_clip release
removes one or changes its answer (then update the adapter, not its callers)."""

from fedclip_cache.cache import openclip_compat


def test_open_clip_still_has_the_private_checkpoint_finder():
    import open_clip.factory

    assert callable(getattr(open_clip.factory, "_find_checkpoint_in_dir", None)), (
        f"open_clip {open_clip.__version__} removed factory._find_checkpoint_in_dir (checked with "
        f"{openclip_compat.CHECKED_WITH}): update fedclip_cache/cache/openclip_compat.py")


def test_local_dir_checkpoint_is_the_file_open_clip_prefers(tmp_path):
    for name in ("a.bin", "model.pth", "open_clip_pytorch_model.bin", "z.safetensors", "open_clip_model.safetensors",
                 "open_clip_config.json"):
        (tmp_path / name).write_bytes(b"x")
    assert openclip_compat.local_dir_checkpoint(tmp_path) == str(tmp_path / "open_clip_model.safetensors")
    (tmp_path / "open_clip_model.safetensors").unlink()
    assert openclip_compat.local_dir_checkpoint(str(tmp_path)) == str(tmp_path / "open_clip_pytorch_model.bin")


def test_local_dir_checkpoint_is_none_for_a_folder_without_weights(tmp_path):
    (tmp_path / "open_clip_config.json").write_text("{}")
    assert openclip_compat.local_dir_checkpoint(tmp_path) is None
