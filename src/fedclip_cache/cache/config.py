"""What a user asks ``extract`` for, before anything is loaded: the model and the run settings.

Torch-free on purpose: the CLI takes its ``extract`` defaults and the pipeline its ``[extract]`` keys from these
dataclasses, and neither ``--help`` nor ``info`` should pay for importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ConfigError

DEFAULT_TEMPLATES = ("a picture of a {}",)  # the official FedCLIP prompt: 'a picture of a' + ' ' + classname


def template_problem(template: str) -> str:
    """Why ``template`` is not a prompt template, or "". A template is Python format text with exactly one bare
    ``{}``, which ``template.format(class_name)`` replaces by the class name; ``{{`` and ``}}`` are literal braces.
    Refused: no ``{}``, two or more (``"{}{}"`` has one class name for two fields), and any other field (``{0}``,
    ``{name}``, ``{:>9}``, ``{!r}``), which would index, look up or reformat the name instead of inserting it."""
    import string

    if not isinstance(template, str):
        return "is not text"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:
        return "has an unmatched '{' or '}' (write {{ or }} for a literal brace)"
    odd = next((f for f in fields if f != ("", "", None)), None)
    if odd is not None:
        name, spec, conv = odd
        return (f"has the format field '{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}'; only a "
                f"bare {{}} is replaced by the class name (write {{{{ or }}}} for a literal brace)")
    if not fields:
        return "has no '{}' placeholder for the class name"
    if len(fields) > 1:
        return f"has {len(fields)} '{{}}' placeholders; exactly one is replaced by the class name"
    return ""


def check_templates(templates: Sequence[str], where: str = "--template") -> None:
    """The one check of prompt templates (CLI, pipeline ``[extract] templates``, :class:`ExtractConfig`): at least
    one, each valid (:func:`template_problem`), none twice. ``where`` names the option or key in the error."""
    if isinstance(templates, str):  # a bare string would be read as one template per character
        raise ConfigError(f"{where}: expected a list of templates, got the string {templates!r}; write "
                          f"[{templates!r}]")
    if not templates:
        raise ConfigError(f"{where}: no prompt templates given; pass --template 'a picture of a {{}}' or leave the "
                          f"default")
    for t in templates:
        why = template_problem(t)
        if why:
            raise ConfigError(f"{where}: template {t!r} {why}")
    if len(set(templates)) != len(templates):
        dup = next(t for i, t in enumerate(templates) if t in templates[:i])
        raise ConfigError(f"{where}: template {dup!r} is given twice; list each template once")


@dataclass
class ModelSpec:
    """What the user asked for, before anything is loaded."""

    model: str = "ViT-B-32"
    pretrained: Optional[str] = "openai"
    model_config: Optional[str] = None
    image_mean: Optional[Sequence[float]] = None
    image_std: Optional[Sequence[float]] = None
    seed: int = 0  # only matters for random-init models (no weights)
    # Activation of the transformer MLPs. None = auto: QuickGELU when the pretrained tag's config says so (OpenAI,
    # LAION-400M, MetaCLIP ... weights were trained with it), else what the model config says (``-quickgelu`` names,
    # ``quick_gelu`` in a custom or local-dir config). A checkpoint FILE cannot tell us its activation: pass True for
    # OpenAI-trained weights loaded from a file.
    quick_gelu: Optional[bool] = None

    def normalised(self) -> "ModelSpec":
        """Split ``name/tag`` and apply ``--model-config`` (its file stem is the model name)."""
        model, pretrained = self.model, self.pretrained
        if self.model_config:
            model = Path(self.model_config).stem
        elif "/" in model and not model.startswith(("local-dir:", "hf-hub:")):
            model, _, tag = model.partition("/")
            pretrained = tag or pretrained
        if model.startswith("local-dir:"):
            pretrained = None  # open_clip ignores it for local-dir
        if pretrained in ("", "none", "None", "random"):
            pretrained = None
        return ModelSpec(model, pretrained, self.model_config, self.image_mean, self.image_std, self.seed,
                         self.quick_gelu)



@dataclass
class ExtractConfig:
    source: str
    out: str
    model: ModelSpec = field(default_factory=ModelSpec)
    format: str = "parquet"
    device: str = "auto"
    precision: str = "auto"  # fp16 autocast on CUDA, fp32 on CPU
    dtype: str = "float32"
    batch_size: int = 64
    workers: Optional[int] = None
    shard_size: int = 4096
    templates: Sequence[str] = DEFAULT_TEMPLATES
    # The full class list in label order (``--classes FILE``). Default: the classes found in the data, sorted. Sites
    # of one federation pass the same list so that labels and text prompts agree where a site lacks a class.
    classes: Optional[Sequence[str]] = None
    strict: bool = False
    progress: bool = True
    dataset: Optional[str] = None  # known dataset to check the layout against (None: identify by domain names)
    exif_transpose: bool = False  # apply EXIF orientation (the official code does not)
    verify: bool = False  # re-hash every committed shard before resuming (default: size check only)
    # Cached augmented views (views.py): K views per image, view 0 the deterministic one. None = the cache's own
    # settings (1 view, the default recipe and seed 0 for a new cache).
    views: Optional[int] = None
    augment: Optional[str] = None
    augment_seed: Optional[int] = None
