"""Load a frozen open_clip model from any of the forms users have on disk or on the hub.

Accepted forms (all resolve to one :class:`LoadedModel`):

* ``--model ViT-B-32 --pretrained openai`` or ``--model ViT-B-32/openai`` (hub tag),
* ``--pretrained /path/to/checkpoint.bin`` (a local checkpoint file for a built-in architecture),
* ``--model-config my_arch.json`` (a custom architecture, registered in open_clip's config registry),
* ``--model local-dir:DIR`` (open_clip's folder form: ``open_clip_config.json`` + weights).

Tags whose pretrained config says ``quick_gelu`` (OpenAI's, LAION-400M's, MetaCLIP's ... weights) are built with
QuickGELU whatever the model name (open_clip 3.3 would build nn.GELU and only warn); ``ModelSpec.quick_gelu``
overrides, e.g. for OpenAI weights loaded from a checkpoint file, which cannot say which activation it needs.

Everything that determines the feature values, the activation actually built included, goes into
:meth:`LoadedModel.fingerprint`, so that a cache built with one model is never extended with another.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from ..errors import FedclipCacheError
from .store import file_sha256
from .config import ModelSpec  # noqa: F401  (re-exported: the public API names it here)
from .openclip_compat import local_dir_checkpoint


class ModelLoadError(FedclipCacheError, RuntimeError):
    """A model or its weights could not be obtained; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    spec: ModelSpec
    weights: dict = field(default_factory=dict)  # provenance of the weights
    preprocess_cfg: dict = field(default_factory=dict)
    activation: str = ""  # the MLP activation actually built (see built_activation)
    activation_source: str = ""  # why: tag config, model config, user override

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def logit_scale(self) -> float:
        ls = getattr(self.model, "logit_scale", None)
        return float(ls.exp()) if isinstance(ls, torch.Tensor) else 100.0

    def fingerprint(self) -> dict:
        """The fields that must match for two caches' rows to be comparable."""
        return {
            "model": self.spec.model,
            "weights": self.weights,
            "preprocess": self.preprocess_cfg,
            "activation": self.activation,
        }


def built_activation(model: torch.nn.Module) -> str:
    """The MLP activation of the open_clip transformer blocks actually built: ``quick_gelu`` or ``gelu``.

    Read from the modules, not the config: the image tower's first block when it is an open_clip transformer, else
    the text tower's (a ResNet or timm image tower has no such block; there ``quick_gelu`` changes only the text
    tower). Towers that disagree give ``visual=...,text=...``; a model with no open_clip transformer block gives
    ``n/a``.
    """
    from open_clip.transformer import QuickGELU

    def name(act) -> str:
        if isinstance(act, QuickGELU):
            return "quick_gelu"
        if isinstance(act, torch.nn.GELU):
            return "gelu" if act.approximate == "none" else f"gelu_{act.approximate}"
        return type(act).__name__.lower()

    def tower(mod) -> Optional[str]:
        blocks = getattr(getattr(mod, "transformer", None), "resblocks", None)
        if not blocks:
            return None
        mlp = getattr(blocks[0], "mlp", None)
        act = getattr(mlp, "gelu", None) if mlp is not None else None
        return name(act) if act is not None else None

    found = {k: v for k, v in (("visual", tower(getattr(model, "visual", None))),
                               ("text", tower(getattr(model, "text", model)))) if v is not None}
    if not found:
        return "n/a"
    if len(set(found.values())) == 1:
        return next(iter(found.values()))
    return ",".join(f"{k}={v}" for k, v in found.items())


def _unpickling_error(path: str, e: Exception) -> "ModelLoadError":
    """One line naming the file and saying why torch.load(weights_only=True) refused it: pickled Python objects
    (a global torch does not allow: code could run) are refused as such; anything else means the pickle data is
    damaged or is not a checkpoint (random bytes that happen to start like a pickle), and is said so."""
    import re

    text = " ".join(str(e).split())
    m = re.search(r"(?i)unsupported global:? GLOBAL [\w.]+|[^.]*TorchScript[^.]*", text)
    if m is None:
        detail = re.search(r"(?i)WeightsUnpickler error:\s*(.*?)(?:\s*Check the documentation|$)", text)
        why = (detail.group(1) if detail else text)[:200] or type(e).__name__
        return _damaged_error(path, why)
    why = m.group(0).strip()
    return ModelLoadError(
        f"{path}: refused to load: it holds pickled Python objects beyond tensors ({why}), and unpickling those can "
        f"run arbitrary code, so checkpoints are only read with torch.load(weights_only=True); if you trust the "
        f"file, re-save its state_dict (torch.save(model.state_dict(), PATH)) or convert it to .safetensors")


CHECKPOINT_FIX = ("pass --pretrained a checkpoint saved with torch.save(model.state_dict(), PATH) or a .safetensors "
                  "file, or a known tag (open_clip.list_pretrained())")


def checkpoint_problem(path: str | Path) -> str:
    """What the file at ``path`` is when its first bytes show it cannot be a checkpoint open_clip reads, or "" when
    it may be one: a torch.save zip archive holding ``data.pkl`` (or a TorchScript archive: refused later, with its
    own message), a pickle (torch's legacy format), safetensors under a ``.safetensors`` name, numpy ``.npz/.npy``.
    Reads at most the first 4 KiB and a zip's directory, so a text file, an HTML error page saved by a failed
    download, a Git LFS pointer or random bytes are named as such instead of failing in torch's unpickler."""
    import zipfile

    path = str(path)
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    if path.lower().endswith((".npz", ".npy")):
        return ""  # open_clip's big_vision (SigLIP) numpy weights
    with open(path, "rb") as f:
        head = f.read(4096)
    n = int.from_bytes(head[:8], "little") if len(head) >= 9 else -1
    safetensors = head[8:9] == b"{" and 8 + n <= size
    if path.lower().endswith(".safetensors"):
        return "" if safetensors else f"not a safetensors file despite its name ({_looks_like(head, size)})"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"a damaged or truncated zip archive ({e}); copy or download it again"
        if any(x == "constants.pkl" or x.endswith("/constants.pkl") for x in names):
            return ""  # TorchScript: load_model refuses it with the conversion recipe
        if not any(x.endswith("/data.pkl") for x in names):
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "") if names else "nothing"
            return f"a zip archive without data.pkl (it holds {shown}), so not a torch.save checkpoint"
        return ""
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return ""  # a pickle: torch's legacy format
    if safetensors:
        return "a safetensors file, but open_clip reads safetensors only from a name ending in .safetensors: rename it"
    return _looks_like(head, size)


def _looks_like(head: bytes, size: int) -> str:
    """A short description of a file that is not a checkpoint, from its first bytes."""
    import codecs

    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        low = text.lstrip().lower()
        if low.startswith("version https://git-lfs"):
            return "a Git LFS pointer, not the weights (run `git lfs pull` in its repository)"
        if low.startswith(("<!doctype html", "<html")):
            return "an HTML page, not weights (a failed download saves the error page: download it again)"
        start = " ".join(text.split())[:40]
        return f"a text file (it starts with {start!r})"
    return ("unknown binary data, neither a torch.save zip archive, a pickle nor safetensors (it starts with bytes "
            f"{head[:8].hex(' ')})")


def _state_dict_error(e: Exception) -> str:
    """torch's multi-line "Error(s) in loading state_dict" as one clause with counts and first examples, or ""."""
    import re

    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return ""
    missing, unexpected, shapes = [], [], []
    for line in text.splitlines()[1:]:
        line = line.strip()
        if line.startswith("Missing key(s)"):
            missing += re.findall(r'"([^"]*)"', line)
        elif line.startswith("Unexpected key(s)"):
            unexpected += re.findall(r'"([^"]*)"', line)
        elif line.startswith("size mismatch for "):
            m = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                         r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", line)
            shapes.append(f"{m.group(1)}: checkpoint {m.group(2)}, model {m.group(3)}" if m else line[18:80])
    return _fit_clause(missing, unexpected, shapes)


def _fit_clause(missing: list, unexpected: list, shapes: list) -> str:
    parts = [f"{len(v)} {what} (first: {v[0]!r})" for what, v in
             (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("of another shape", shapes)) if v]
    return ", ".join(parts)


def _checkpoint_misfit(path: str, name: str, kwargs: dict) -> tuple[str, str]:
    """Why a checkpoint file is not weights of model ``name``: ``("damaged", why)`` when torch.load cannot read it,
    ``("content", why)`` when it is no state dict at all (a tensor, a list, an empty or non-tensor dict), ``("fit",
    why)`` when its keys or shapes differ from the model's, ``("", "")`` when none explains the failure. Only called after open_clip failed, so
    the second read and the second model cost nothing on the success path."""
    import open_clip

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (garbage that starts like a pickle fails in assorted ways)
        if "TorchScript" in str(e):
            return "", ""
        return "damaged", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        return "content", f"it holds a {type(sd).__name__}, not a state dict (a dict of tensors)"
    if not sd:
        return "content", "it holds an empty dict, no weights"
    odd = next(((k, v) for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        return "content", (f"it holds a dict with non-tensor values (first: {odd[0]!r}: {type(odd[1]).__name__}), "
                           f"not a state dict")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    try:
        act = {k: v for k, v in kwargs.items() if k in ("force_quick_gelu", "quick_gelu")}
        want = open_clip.create_model(name, pretrained=None, device="cpu", **act).state_dict()
    except Exception:  # noqa: BLE001
        return "", ""
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: checkpoint {list(sd[k].shape)}, model {list(v.shape)}" for k, v in want.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    why = _fit_clause(missing, unexpected, shapes)
    return ("fit", why) if why else ("", "")


def _damaged_error(path: str, why: str) -> "ModelLoadError":
    return ModelLoadError(f"{path}: not a readable checkpoint: its pickle data is damaged or is not a torch.save "
                          f"checkpoint ({why}); {CHECKPOINT_FIX}")


def register_model_config(path: str | Path) -> str:
    """Register a custom architecture JSON with open_clip; returns the model name (the file stem)."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: model config not found; pass an existing JSON file to --model-config")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e}); fix the file or drop --model-config") from e
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        # open_clip would silently skip this file and then say "model not found": say why instead.
        raise ModelLoadError(f"{path}: model config lacks {', '.join(missing)}; open_clip needs embed_dim, "
                             f"vision_cfg and text_cfg")
    open_clip.add_model_config(path)
    return path.stem


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_weights_obtainable(model: str, tag: str) -> dict:
    """Fail fast, before open_clip starts minutes of hub retries, when tagged weights cannot be had."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise ModelLoadError(
            f"--pretrained {tag!r} is neither a file nor a known tag for {model} (known tags: "
            f"{', '.join(tags) or 'none'}); pass a local checkpoint file with --pretrained PATH")
    hub = cfg.get("hf_hub", "")
    cached = None
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        for fname in ([filename] if filename else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str):
                cached = hit
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if cached is None and (offline or not _hub_reachable()):
        raise ModelLoadError(
            f"cannot download weights for {model}/{tag} (no network{' : HF_HUB_OFFLINE is set' if offline else ''}); "
            f"download them elsewhere and pass the file: --model {model} --pretrained /path/to/"
            f"open_clip_pytorch_model.bin (or --model local-dir:DIR)")
    return {"kind": "tag", "tag": tag, "hf_hub": hub, "url": cfg.get("url", "")}


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Create the model in eval mode with frozen parameters, plus its deterministic preprocessing."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import open_clip

    spec = spec.normalised()
    if spec.model_config:
        register_model_config(spec.model_config)
    name, weights = _resolve_weights(spec)
    pretrained = spec.pretrained
    kwargs, activation_source = _activation(spec, weights)
    if spec.image_mean is not None:
        kwargs["image_mean"] = tuple(float(x) for x in spec.image_mean)
    if spec.image_std is not None:
        kwargs["image_std"] = tuple(float(x) for x in spec.image_std)
    torch.manual_seed(spec.seed)  # random-init models are reproducible from the seed
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device="cpu", **kwargs)
    except ModelLoadError:
        raise
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused the file
        raise _unpickling_error(_checkpoint_path(name, pretrained), e) from None
    except Exception as e:  # noqa: BLE001 (a diagnosis, or the original error unchanged)
        raise _load_failure(spec, name, pretrained, kwargs, e) from None
    tokenizer = open_clip.get_tokenizer(name)
    model.eval().requires_grad_(False).to(device)

    pcfg = dict(getattr(model.visual, "preprocess_cfg", {}))
    for k in ("mean", "std"):
        if k in pcfg:
            pcfg[k] = [float(x) for x in pcfg[k]]
    if isinstance(pcfg.get("size"), tuple):
        pcfg["size"] = list(pcfg["size"])
    return LoadedModel(model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec,
                       weights=weights, preprocess_cfg=pcfg, activation=built_activation(model),
                       activation_source=activation_source)


def _resolve_weights(spec: ModelSpec) -> tuple[str, dict]:
    """(the model name open_clip is given, the weights record of the fingerprint); refuses a model or weights that
    cannot be had, before anything is built."""
    import open_clip

    name, pretrained = spec.model, spec.pretrained
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        cfg_file = folder / "open_clip_config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"{cfg_file}: missing; a local-dir model needs open_clip_config.json "
                                 f"(with model_cfg and preprocess_cfg) next to its weights")
        ckpts = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".safetensors"))
        found = local_dir_checkpoint(folder)  # the file open_clip will read
        if found:
            _refuse_non_checkpoint(found)
        weights = {"kind": "local-dir", "config_sha256": file_sha256(cfg_file),
                   "files": {p.name: file_sha256(p) for p in ckpts}}
        # open_clip resolves relative local-dir paths against the CWD; make it absolute and unambiguous.
        name = "local-dir:" + str(folder.resolve())
    elif open_clip.get_model_config(name) is None and not name.startswith("hf-hub:"):
        raise ModelLoadError(f"unknown model {name!r}; use one of open_clip.list_models() or pass "
                             f"--model-config FILE.json for a custom architecture")
    elif pretrained is None:
        weights = {"kind": "random-init", "seed": spec.seed}
    elif os.path.isfile(pretrained):
        _refuse_non_checkpoint(pretrained)
        weights = {"kind": "file", "file": os.path.basename(pretrained), "sha256": file_sha256(pretrained)}
    else:
        weights = _check_weights_obtainable(name, pretrained)
    if spec.model_config:
        weights["arch_config_sha256"] = file_sha256(spec.model_config)
    return name, weights


def _activation(spec: ModelSpec, weights: dict) -> tuple[dict, str]:
    """(open_clip keyword arguments that choose the activation, where that choice came from)."""
    import open_clip

    kwargs = {}
    # The activation: OpenAI's (and LAION-400M's, MetaCLIP's, ...) weights were trained with QuickGELU, but
    # open_clip 3.3 builds a plain name like ViT-B-32 with nn.GELU and only warns. Follow the tag's config.
    if spec.quick_gelu is not None:
        activation_source = "--quick-gelu" if spec.quick_gelu else "--no-quick-gelu"
        if spec.quick_gelu:
            kwargs["force_quick_gelu"] = True
        else:
            kwargs["quick_gelu"] = False  # a model kwarg overrides the config's quick_gelu
    elif weights["kind"] == "tag" and open_clip.get_pretrained_cfg(spec.model, spec.pretrained).get("quick_gelu",
                                                                                                     False):
        kwargs["force_quick_gelu"] = True
        activation_source = f"pretrained tag {spec.pretrained!r} (quick_gelu)"
    elif weights["kind"] == "file":
        activation_source = "model config (a checkpoint file does not record its activation)"
    else:
        activation_source = "model config"
    return kwargs, activation_source


def _refuse_non_checkpoint(path: str) -> None:
    try:
        why = checkpoint_problem(path)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the checkpoint ({e.strerror or e}); check its permissions, or "
                             f"{CHECKPOINT_FIX}") from None
    if why:
        raise ModelLoadError(f"{path}: not a model checkpoint: it is {why}; {CHECKPOINT_FIX}")


def _load_failure(spec: ModelSpec, name: str, pretrained: Optional[str], kwargs: dict, e: Exception) -> Exception:
    """The one-line error for open_clip failing to build or load a model, or ``e`` itself when it is not about the
    user's input (a bug keeps its traceback)."""
    path = _checkpoint_path(name, pretrained)
    if isinstance(e, RuntimeError) and "TorchScript" in str(e):  # e.g. OpenAI's original ViT-B-32.pt
        return ModelLoadError(
            f"{path}: refused to load: it is a TorchScript archive (like OpenAI's original release), and loading "
            f"one runs its code, so checkpoints are only read with torch.load(weights_only=True); if you trust "
            f"the file, convert it once: torch.save(torch.jit.load(PATH, map_location='cpu').state_dict(), "
            f"'weights.bin'), then pass --pretrained weights.bin (with --quick-gelu for OpenAI weights)")
    why = _state_dict_error(e)
    kind = "fit" if why else ""
    if not kind and os.path.isfile(path):  # a readable file that open_clip choked on (IndexError, KeyError ...)
        kind, why = _checkpoint_misfit(path, name, kwargs)
    if kind == "damaged":
        return _damaged_error(path, why)
    if kind == "content":
        return ModelLoadError(f"{path}: not a model checkpoint: {why}; {CHECKPOINT_FIX}")
    if kind == "fit":
        return ModelLoadError(f"{path}: this checkpoint does not fit model {spec.model}: {why}; pass the --model (or "
                              f"--model-config) it was saved from, or a checkpoint of {spec.model}")
    if isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e):
        return ModelLoadError(f"{path}: a damaged or truncated checkpoint ({str(e).splitlines()[0][:160]}); copy or "
                              f"download it again")
    if isinstance(e, (RuntimeError, FileNotFoundError, ValueError)):
        first = " ".join(str(e).split())[:300]
        return ModelLoadError(f"could not load model {spec.model!r} (pretrained={spec.pretrained!r}): {first}")
    return e


def _checkpoint_path(name: str, pretrained: Optional[str]) -> str:
    """The file open_clip was reading, for error messages."""
    if name.startswith("local-dir:"):
        return local_dir_checkpoint(name[len("local-dir:"):]) or name
    if pretrained and os.path.isfile(pretrained):
        return pretrained
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        hub = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "").rstrip("/")
        for fname in ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
            hit = try_to_load_from_cache(hub, fname)
            if isinstance(hit, str):
                return hit
    except Exception:  # only for the message
        pass
    return f"weights of {name}/{pretrained}"
