"""What a deployment's messages carry, packed the same way by the ClientApp and the ServerApp.

Each message's content is ONE config record (``"fc"``): the settings or metrics and, when tensors travel, their
packed float32 bytes and layout (:func:`content` / :func:`read`). The prototype head rides along the adapter under
:data:`HEAD`.
"""
from __future__ import annotations

import json
from typing import NamedTuple, Optional

import numpy as np
import torch

try:
    from flwr.app import ConfigRecord, RecordDict
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fedclip_cache.flower needs Flower: pip install 'fedclip-cache[flower]'") from e

HEAD = "__head__"  # the prototype head's entry in a packed array
RECORD = "fc"  # the one config record of a message's content


class Payload(NamedTuple):
    """What a message carries, unpacked: its config record (settings or metrics) and its named tensors."""

    config: dict
    params: dict


class LocalUpdate(NamedTuple):
    """A site's trained adapter (unstacked) and its training-set size (the server weighs it by ``--weighting``
    with ``train.client_weights``, as the loop does)."""

    params: dict
    weight: float


def pack(params: dict) -> tuple[np.ndarray, str]:
    """Named tensors -> one flat float32 array and its layout (JSON: [[name, shape], ...]): one Array (one object
    per hop) whatever the adapter's parameter count."""
    arrays = [np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v, np.float32) for v in params.values()]
    layout = json.dumps([[n, list(a.shape)] for n, a in zip(params, arrays)])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, np.float32)
    return flat, layout


def unpack(flat: np.ndarray, layout: str) -> dict[str, torch.Tensor]:
    """The named tensors :func:`pack` flattened (each a copy: the message's bytes are read-only)."""
    out, at = {}, 0
    for name, shape in json.loads(layout):
        n = int(np.prod(shape)) if shape else 1
        out[name] = torch.from_numpy(np.array(flat[at:at + n], np.float32).reshape(shape))
        at += n
    return out


def tensor_bytes(params: dict) -> int:
    """Bytes of tensors a message carries: :func:`pack` sends every element as float32 (the count a deployment's
    run folder records per round, beside ``federate``'s formula)."""
    return 4 * sum(int(v.numel()) if torch.is_tensor(v) else int(np.asarray(v).size) for v in params.values())


def content(config: dict, params: Optional[dict] = None) -> RecordDict:
    """A message's content: ONE config record holding the settings or metrics and, when there are tensors, their
    packed float32 bytes and layout -- three objects per message on each hop (message, record dict, record), where
    an ArrayRecord per tensor would add an ArrayRecord, an Array and an ArrayChunk per parameter."""
    rec = dict(config)
    if params:
        flat, rec["layout"] = pack(params)
        rec["packed"] = flat.tobytes()
    return RecordDict({RECORD: ConfigRecord(rec)})


def read(msg_content: RecordDict) -> Payload:
    """The config record (as a dict) and the unpacked tensors of a message's content."""
    rec = dict(msg_content[RECORD])
    packed = rec.pop("packed", None)
    params = unpack(np.frombuffer(packed, np.float32), rec.pop("layout")) if packed is not None else {}
    return Payload(rec, params)
