"""What a user asks ``extract`` for, before anything is loaded: the model and the run settings, every option
declared once (:func:`~fedclip_cache.options.option`: default, help, flag, allowed values, bounds, its own rule).

The ``extract`` command (cli.py) builds its arguments and options from these declarations, a pipeline's
``[extract]`` table takes the same names, and :func:`check_option` is the one check of a value however it arrives
(flag, TOML key, Python). Torch-free on purpose: neither ``--help`` nor ``info`` should pay for importing torch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from ..errors import ConfigError
from ..options import field_kinds, flag_of, named, option, said
from .datasets import DATASETS, canonical
from .views import MAX_VIEWS, AugmentError, parse_augment

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


# ------------------------------------------------------------------------------- rules of single options
# Each takes a value already of the declared type and the label the user wrote (see check_option).

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def _device(value: str, label: str) -> None:
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise ConfigError(f"{said(label, value)} unknown; choose one of auto, cpu, cuda, cuda:N")


def _three_numbers(value: Sequence[float], label: str) -> None:
    """Normalisation mean or std: one finite number per RGB channel."""
    if len(value) != 3 or not all(math.isfinite(x) for x in value):
        raise ConfigError(f"{named(label)} takes three finite numbers, e.g. 0.5,0.5,0.5 (got "
                          f"{[float(x) for x in value]})")


def _three_positive(value: Sequence[float], label: str) -> None:
    _three_numbers(value, label)
    if min(value) <= 0:
        raise ConfigError(f"{named(label)} values must be > 0 (got {[float(x) for x in value]})")


def _templates(value: Sequence[str], label: str) -> None:
    check_templates(list(value), named(label))


def _classes(value: Sequence[str], label: str) -> None:
    """The full class list in label order: at least one class, each a usable prompt text, none twice."""
    from .sources import check_label_text  # here: sources needs numpy, --help does not

    if not value:
        raise ConfigError(f"{named(label)}: the class list must name at least one class, one per line, in label "
                          f"order")
    for c in value:
        check_label_text("class", c, named(label))  # the rule extract applies to class names from the data
    dup = next((c for i, c in enumerate(value) if c in value[:i]), None)
    if dup is not None:
        raise ConfigError(f"{named(label)}: class {dup!r} is listed twice; each class once, in label order")


def _augment(value: str, label: str) -> None:
    try:
        parse_augment(value)
    except AugmentError as e:  # its message starts "--augment '<recipe>': "; say it as the user wrote it
        raise ConfigError(f"{said(label, value)}: {str(e).split(': ', 1)[-1]}") from None


def _dataset(value: str, label: str) -> None:
    if canonical(value) is None:
        raise ConfigError(f"{said(label, value)} unknown; choose one of {', '.join(DATASETS)} or leave it out")


def _column(value: str, label: str) -> None:
    if not value.strip():
        raise ConfigError(f"{said(label, value)}: a column or key name cannot be empty; leave the option out for its "
                          f"default")


def _domain_name(value: str, label: str) -> None:
    from .sources import path_name_problem  # here: sources needs numpy, --help does not

    why = path_name_problem(value)
    if why:
        raise ConfigError(f"{said(label, value)} {why}; a domain name becomes a file name, so it must be one plain "
                          f"name")


class FromFile(NamedTuple):
    """A list option whose items the ``extract`` command also reads from a file, one per line: that file's flag,
    its help, and why an empty one is refused (it would silently stand for the default)."""

    flag: str
    help: str
    empty: str


# Metadata beyond option()'s own, read by the CLI and the pipeline:
#   path=True          the command line takes a path (PATH); for a list option, a file with one item per line
#   argument=True      a positional argument of the command, not an option
#   from_file          a FromFile: the items may also come from a file
#   cli=False          not on the command line; pipeline=False: not an [extract] key (the pipeline provides it)
#   parser_bounds=True the command-line parser enforces the bounds and shows them in --help (INTEGER RANGE)
#   rule               the option's own check beyond type, choices and bounds: rule(value, label)
#   high_why           why the upper bound is what it is, said when a value is above it


@dataclass
class ModelSpec:
    """What the user asked for, before anything is loaded."""

    model: str = option("ViT-B-32", "open_clip model name, NAME/TAG (e.g. ViT-B-32/openai), or local-dir:DIR.")
    pretrained: Optional[str] = option("openai", "Pretrained tag, a local checkpoint file, or 'none' for random "
                                                 "init.")
    model_config: Optional[str] = option(None, "Custom architecture JSON (registered with open_clip; its file stem "
                                               "becomes the model name).", path=True)
    image_mean: Optional[Sequence[float]] = option(None, "Override normalisation mean, e.g. 0.5,0.5,0.5.",
                                                   rule=_three_numbers)
    image_std: Optional[Sequence[float]] = option(None, "Override normalisation std, e.g. 0.5,0.5,0.5.",
                                                  rule=_three_positive)
    # Only matters for random-init models (no weights); torch.manual_seed takes 0 .. 2**64 - 1
    seed: int = option(0, "Seed for random-init models (--pretrained none).", bounds=(0, 2**64 - 1),
                       high_why=" (torch's generator takes 64-bit seeds)")
    # Activation of the transformer MLPs. None = auto: QuickGELU when the pretrained tag's config says so (OpenAI,
    # LAION-400M, MetaCLIP ... weights were trained with it), else what the model config says (``-quickgelu`` names,
    # ``quick_gelu`` in a custom or local-dir config). A checkpoint FILE cannot tell us its activation: pass True for
    # OpenAI-trained weights loaded from a file.
    quick_gelu: Optional[bool] = option(
        None, "Transformer MLP activation. Default (auto): QuickGELU when the pretrained tag's config says so "
              "(openai, laion400m, metaclip, ...; OpenAI trained with it), else what the model config says "
              "(-quickgelu names, quick_gelu in a JSON/local-dir config). A checkpoint FILE cannot tell us the "
              "activation its weights were trained with: pass --quick-gelu for OpenAI-trained weights loaded from a "
              "file. The activation built is recorded in the cache.")

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
        return dataclasses.replace(self, model=model, pretrained=pretrained)


@dataclass
class ExtractConfig:
    """Every option of an ``extract`` run; the model's options are its ``model`` (:class:`ModelSpec`)."""

    source: str = option(help="DomainBed folder ROOT/<domain>/<class>/<image>; a manifest .csv/.parquet (path, "
                              "label, domain[, client][, split]); hf:NAME[:SPLIT] (a dataset in the local Hugging "
                              "Face cache); a Parquet file, folder or glob with image bytes; or WebDataset shards "
                              "'DIR/{00000..00099}.tar' (brace pattern, glob or '::' list).", path=True,
                         argument=True, pipeline=False)
    out: str = option(help="Cache folder to create or extend (resumable).", path=True, argument=True, pipeline=False)
    model: ModelSpec = field(default_factory=ModelSpec)
    format: str = option("parquet", "parquet or hdf5.", choices=("parquet", "hdf5"))
    device: str = option("auto", "auto, cpu or cuda.", rule=_device)
    precision: str = option("auto", "auto (fp16 autocast on CUDA, fp32 on CPU), fp32, fp16 or bf16.",
                            choices=("auto", "fp32", "fp16", "bf16"))
    dtype: str = option("float32", "Stored embedding dtype: float32 or float16.", choices=("float32", "float16"))
    batch_size: int = option(64, bounds=(1, None), parser_bounds=True)
    workers: Optional[int] = option(None, "DataLoader worker processes (default: all CPUs up to 32 on CUDA, min(4, "
                                          "CPUs) on CPU).", bounds=(0, None), parser_bounds=True)
    shard_size: int = option(4096, "Images per committed shard (the most a crash can lose).", bounds=(1, None),
                             parser_bounds=True)
    templates: Sequence[str] = option(
        DEFAULT_TEMPLATES, "Prompt template with {} for the class; repeatable. Default: the official 'a picture of "
                           "a {}'.", flag="--template", rule=_templates,
        from_file=FromFile("--templates-file", "File with one template per line.",
                           "no templates in the file (one per line, with {})"))
    # The full class list in label order (``--classes FILE``). Default: the classes found in the data, sorted. Sites
    # of one federation pass the same list so that labels and text prompts agree where a site lacks a class.
    classes: Optional[Sequence[str]] = option(
        None, "File with the full class list, one per line, in label order (default: the classes found, sorted). "
              "Every site of a federation passes the same file, so labels and text prompts agree even where a site "
              "lacks a class.", path=True, rule=_classes)
    strict: bool = option(False, "Fail on the first unreadable image instead of skipping it.")
    progress: bool = option(True, cli=False, pipeline=False)  # the CLI's --quiet; a pipeline always shows it
    # Known dataset to check the layout against (None: identify by domain names); a pipeline's [pipeline] dataset
    dataset: Optional[str] = option(None, "Known dataset (PACS, VLCS, OfficeHome, DomainNet) to check counts "
                                          "against; default: recognised only by its exact set of domain names.",
                                    rule=_dataset, pipeline=False)
    # apply EXIF orientation (the official code does not)
    exif_transpose: bool = option(False, "Rotate images by their EXIF orientation tag before preprocessing (the "
                                         "official code, like ImageFolder, does not).")
    # re-hash every committed shard before resuming (default: size check only)
    verify: bool = option(False, "Re-hash every committed shard before resuming (default: size check); damaged "
                                 "shards are removed and their images re-embedded.")
    # Cached augmented views (views.py): K views per image, view 0 the deterministic one. None = the cache's own
    # settings (1 view, the default recipe and seed 0 for a new cache).
    views: Optional[int] = option(
        None, "Views per image, K >= 1 (default: the cache's own, 1 for a new cache). View 0 is the deterministic "
              "evaluation view (exactly the feature a plain extract stores); views 1..K-1 are seeded augmented views "
              "(--augment) for training with `federate --train-views`. Costs K x the extraction time and K x the "
              "storage; raising K on an existing cache computes only the new views.", bounds=(1, MAX_VIEWS),
        high_why=" views per image (one image's views are decoded and held together; CLAP caches 20, Tip-Adapter "
                 "averages 10)")
    augment: Optional[str] = option(
        None, "Recipe of the augmented views (only with --views >= 2): comma-separated rrc=LO-HI (RandomResizedCrop "
              "to the model's input size and interpolation, area scale), ratio=LO-HI (crop aspect ratio, default "
              "3/4-4/3), flip[=P] (horizontal flip, P=0.5), jitter=S (brightness/contrast/saturation). Default "
              "'rrc=0.5-1,flip' (PromptFL/CoOp training augmentation). Fixed for a cache once it holds views.",
        rule=_augment)
    augment_seed: Optional[int] = option(
        None, "Seed of the augmented views (default 0): view k of an image depends only on this seed, the image's "
              "path in the dataset and k. Fixed for a cache once it holds views.", bounds=(0, 2**63 - 1))

    # Sources whose images are bytes in container files (hf:, Parquet with image bytes, WebDataset shards;
    # cache/bytesources.py): where a row's image, label, domain, client and split are. Parquet column names, or the
    # keys of a WebDataset sample's .json. Refused for a folder or manifest, which name their own.
    image_column: str = option("image", "Parquet/hf: column holding the image bytes (HF struct<bytes, path> or "
                                        "binary).", rule=_column)
    label_column: str = option("label", "Parquet/hf: column, or WebDataset .json key, of the label (a ClassLabel "
                                        "index, or the class name; WebDataset also reads a .cls member).",
                               rule=_column)
    domain_column: str = option("domain", "Parquet/hf: column, or WebDataset .json key, of the domain (none: the "
                                          "whole source is one domain, named by --domain or after the dataset).",
                                rule=_column)
    client_column: Optional[str] = option(None, "Parquet/hf: column, or WebDataset .json key, of the client "
                                                "(default: the domain).", rule=_column)
    split_column: Optional[str] = option(None, "Parquet/hf: column, or WebDataset .json key, of the split "
                                               "(default: none).", rule=_column)
    domain: Optional[str] = option(None, "Parquet/hf:/WebDataset: the name of the one domain of a source without a "
                                         "domain column; with one, extract only the rows of this domain (a site's "
                                         "own cache).", rule=_domain_name)

    def source_columns(self):
        """The :class:`~.bytesources.Columns` of a container source, from the options above."""
        from .bytesources import Columns

        return Columns(self.image_column, self.label_column, self.domain_column, self.client_column,
                       self.split_column, self.domain)

    def option_values(self) -> dict[str, Any]:
        """Every option's value by name (:data:`OPTIONS`), the model's side by side with the run's."""
        return {name: getattr(self.model if name in MODEL_OPTIONS else self, name) for name in OPTIONS}

    @classmethod
    def from_options(cls, values: Mapping[str, Any]) -> "ExtractConfig":
        """An ExtractConfig from option values by name, the model's side by side with the run's (as the command
        line and a pipeline's ``[extract]`` table take them); options left out keep their defaults."""
        model = {k: v for k, v in values.items() if k in MODEL_OPTIONS}
        return cls(model=ModelSpec(**model), **{k: v for k, v in values.items() if k not in MODEL_OPTIONS})

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "ExtractConfig":
        """Check every option (:func:`check_option`); ``names`` maps an option to how the user wrote it (a TOML
        key), else it reads as its flag (``--batch-size``). Raises :class:`ConfigError`."""
        names = dict(names or {})
        for name, value in self.option_values().items():
            check_option(name, value, names.get(name) or option_flag(name))
        return self


def _options() -> dict[str, dataclasses.Field]:
    out = {}
    for f in dataclasses.fields(ExtractConfig):
        if f.name == "model":  # the model's options come where the model does
            out.update((m.name, m) for m in dataclasses.fields(ModelSpec))
        else:
            out[f.name] = f
    return out


# Every extract option by name, in the order the command line lists them: the declared field (default, metadata)
OPTIONS: dict[str, dataclasses.Field] = _options()
MODEL_OPTIONS = frozenset(f.name for f in dataclasses.fields(ModelSpec))
_ALL_KINDS = {**field_kinds(ExtractConfig), **field_kinds(ModelSpec)}  # ModelSpec's `model` is the name (a str)
KINDS = {name: _ALL_KINDS[name] for name in OPTIONS}
# The keys of a pipeline's [extract] table
PIPELINE_OPTIONS = tuple(n for n, f in OPTIONS.items() if f.metadata.get("pipeline", True))


def option_flag(name: str) -> str:
    """The flag a user types for an extract option (``templates`` -> ``--template``)."""
    return flag_of(OPTIONS[name])


def option_default(name: str) -> Any:
    """The declared default of an extract option (``dataclasses.MISSING`` for a required argument)."""
    f = OPTIONS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_option(name: str, value: Any, label: str) -> None:
    """Refuse a bad value of extract option ``name`` in one line naming it as the user wrote it (``label``: a flag
    such as ``--batch-size``, or a pipeline key such as ``p.toml: extract.batch_size = ``): its type, allowed
    values, bounds, then its own rule (templates, class names, augment recipe, dataset, device). The one check of
    every way a value arrives: the ``extract`` command, a pipeline's ``[extract]`` table, ``ExtractConfig`` in
    Python (:meth:`ExtractConfig.validate`)."""
    f, kind = OPTIONS[name], KINDS[name]
    if value is None and kind.optional:
        return
    _check_kind(f, kind, value, label)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{said(label, value)} unknown; choose one of {', '.join(choices)}")
    low, high = f.metadata.get("bounds") or (None, None)
    if low is not None and value < low:
        raise ConfigError(f"{said(label, value)}: expected {_whole(f)}")
    if high is not None and value > high:
        raise ConfigError(f"{said(label, value)}: must be at most {high}{f.metadata.get('high_why', '')}")
    rule = f.metadata.get("rule")
    if rule is not None:
        rule(value, label)


def _whole(f: dataclasses.Field) -> str:
    low = (f.metadata.get("bounds") or (None, None))[0]
    return "a whole number" + (f" >= {low}" if low is not None else "")


def _check_kind(f: dataclasses.Field, kind, value: Any, label: str) -> None:
    """The value is of the declared type (a path may be a ``pathlib.Path``; a list, a tuple)."""
    if kind.base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{said(label, value)}: expected true or false")
    elif kind.base is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise ConfigError(f"{said(label, value)}: expected {_whole(f)}")
    elif kind.base is float:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(f"{said(label, value)}: expected a finite number")
    elif kind.base is str:
        if not isinstance(value, str) and not (f.metadata.get("path") and isinstance(value, os.PathLike)):
            raise ConfigError(f"{said(label, value)}: expected a string")
    elif isinstance(value, (str, bytes)):
        raise ConfigError(f"{said(label, value)}: expected a list, got a string; write [{value!r}]")
    elif kind.item is str:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{said(label, value)}: expected a list of strings")
    elif kind.item is float:
        if not hasattr(value, "__len__") or not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{said(label, value)}: expected a list of numbers")
