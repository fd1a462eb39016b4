"""Mapper, first half: decode one image file robustly into an RGB PIL image (runs in DataLoader workers)."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# OS errors that say nothing about the file's content: the next extract retries the file even if it is unchanged.
TRANSIENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.ETIMEDOUT,
                    errno.ESTALE, errno.EINTR, errno.ENFILE, errno.EMFILE, errno.ENOENT}


class BadImage(Exception):
    """The file cannot become an image; the message is the reason recorded in the cache. ``transient`` failures
    (permission denied, I/O error) are retried by the next run; permanent ones only when the file changes."""

    def __init__(self, reason: str, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


def read_regular_file(path: str) -> bytes:
    """The file's bytes. Opened non-blocking and checked with fstat, so a FIFO or device never hangs a worker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise BadImage(f"cannot open: {e.strerror or e}", transient=e.errno in TRANSIENT_ERRNOS) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"read error: {e.strerror or e}", transient=e.errno in TRANSIENT_ERRNOS) from None
    finally:
        os.close(fd)
    if not data:
        raise BadImage("empty file (0 bytes)")
    return data


def content_hash(data: bytes) -> str:
    """The hash of a file's bytes recorded with its embedding: decides whether a file whose stat changed (a
    rename, a swap, a copy) still holds the picture that was embedded."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: str) -> str:
    """``content_hash`` of a file on disk, or "" when it cannot be read."""
    try:
        return content_hash(read_regular_file(path))
    except BadImage:
        return ""


def open_rgb(path: str, exif_transpose: bool = False, data: bytes | None = None) -> Image.Image:
    """Open and fully decode ``path`` as 8-bit RGB; raise :class:`BadImage` with a short reason otherwise.

    CMYK, palette, grey, alpha and 16-bit images are converted (16-bit by scaling, since PIL's own
    conversion clips everything above 255 to white). Truncated files are *not* patched up: a half-decoded
    image would silently poison the cache. EXIF orientation is ignored unless ``exif_transpose`` (the official
    FedCLIP code, like torchvision's ImageFolder, ignores it).
    """
    data = read_regular_file(path) if data is None else data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except OSError as e:
        raise BadImage(f"unreadable: {e}") from None
    except Exception as e:  # decoders raise assorted errors on corrupt data
        raise BadImage(f"corrupt image: {type(e).__name__}: {e}") from None
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit modes always span 0..65535 (a dark 16-bit image must stay dark); PIL's 32-bit "I" says nothing
        # about its range: 8-bit data stored as int32 stays 0..255, anything larger is taken as 16-bit.
        peak = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        img = Image.fromarray(np.rint(arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class FileBytes:
    """The bytes of image files by index (:func:`read_regular_file`); a source whose images are bytes inside
    container files has its own reader with the same ``read`` (:class:`.bytesources.BlobRows`)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        return read_regular_file(self.paths[i])


class ImageFiles(Dataset):
    """Decode + preprocess by index; a bad file yields a zero tensor and its reason instead of an exception,
    so one broken JPEG never stops a million-image run. ``paths``: the image files, or a reader of image bytes by
    index (an object with ``read(i)``, e.g. rows inside Parquet files or tar shards)."""

    def __init__(self, paths, preprocess, input_size: tuple[int, int], exif_transpose: bool = False):
        self.paths = paths if hasattr(paths, "read") else FileBytes(list(paths))
        self.preprocess = preprocess
        self.input_size = input_size
        self.exif_transpose = exif_transpose

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        """(image tensor, index, ok flag, transient flag, reason, content hash): the flags collate into tensors, so
        the main loop checks a whole batch at once and only looks at reasons when something failed."""
        try:
            data = self.paths.read(i)
            x = self.preprocess(open_rgb("", self.exif_transpose, data))
            return x, i, True, False, "", content_hash(data)
        except BadImage as e:
            return torch.zeros(3, *self.input_size), i, False, e.transient, str(e), ""
        except Exception as e:  # preprocessing of an odd image (e.g. 1x0 pixels)
            return torch.zeros(3, *self.input_size), i, False, False, \
                f"preprocessing failed: {type(e).__name__}: {e}", ""
