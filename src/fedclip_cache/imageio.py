"""Mapper, first half: decode one image file robustly into an RGB PIL image (runs in DataLoader workers)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImage(Exception):
    """The file cannot become an image; the message is the reason recorded in the cache."""


def open_rgb(path: str) -> Image.Image:
    """Open and fully decode ``path`` as 8-bit RGB; raise :class:`BadImage` with a short reason otherwise.

    CMYK, palette, grey, alpha and 16-bit images are converted (16-bit by scaling, since PIL's own
    conversion clips everything above 255 to white). Truncated files are *not* patched up: a half-decoded
    image would silently poison the cache.
    """
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                raise BadImage("empty file (0 bytes)")
        img = Image.open(path)
        img.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e}") from None
    except Exception as e:  # decoders raise assorted errors on corrupt data
        raise BadImage(f"corrupt image: {type(e).__name__}: {e}") from None
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class ImageFiles(Dataset):
    """Decode + preprocess by index; a bad file yields a zero tensor and its reason instead of an exception,
    so one broken JPEG never stops a million-image run."""

    def __init__(self, paths: list[str], preprocess, input_size: tuple[int, int]):
        self.paths = paths
        self.preprocess = preprocess
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(image tensor, index, ok flag, reason): the flag collates into a tensor, so the main loop checks a whole
        batch at once and only looks at reasons when something failed."""
        try:
            x = self.preprocess(open_rgb(self.paths[i]))
            return x, i, True, ""
        except BadImage as e:
            return torch.zeros(3, *self.input_size), i, False, str(e)
        except Exception as e:  # preprocessing of an odd image (e.g. 1x0 pixels)
            return torch.zeros(3, *self.input_size), i, False, f"preprocessing failed: {type(e).__name__}: {e}"
