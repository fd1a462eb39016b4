"""The one place that uses open_clip's private names; each is checked against the open_clip version below, and
tests/cache/test_openclip_compat.py fails loudly when one disappears or changes its answer."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

CHECKED_WITH = "3.3.0"  # the open_clip version these names were read in


def local_dir_checkpoint(folder: str | Path) -> Optional[str]:
    """The weights file open_clip loads for ``--model local-dir:FOLDER`` (None when the folder holds none): its
    private ``open_clip.factory._find_checkpoint_in_dir``, so that the file we fingerprint and check is the one it
    reads (its preference order among *.safetensors, *.bin and *.pth files is not ours to copy)."""
    try:
        from open_clip.factory import _find_checkpoint_in_dir
    except ImportError:
        import open_clip

        raise RuntimeError(f"open_clip {open_clip.__version__} has no factory._find_checkpoint_in_dir (checked with "
                           f"{CHECKED_WITH}); update fedclip_cache/cache/openclip_compat.py") from None
    return _find_checkpoint_in_dir(Path(folder))
