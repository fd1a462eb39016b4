"""The resolved configuration of a federated run; defaults are the official FedCLIP settings.

Official code: microsoft/PersonalizedFL, ``fedclip/`` (Adam lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight decay 0.2
re-created every round, batch 32, 1 local epoch, 200 rounds as in its README, uniform averaging, 60/20/20 splits,
leave-one-domain-out, selection by best mean validation accuracy).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Mapping, NamedTuple, Optional

from ..errors import ConfigError
from ..options import flag_of, option, said as as_written, show  # noqa: F401  (as_written: the one formatter of refused values)
from .adapters import ADAPTERS, adapters_help, list_adapters
from .algorithms import ALGORITHMS, algorithms_help, get_algorithm
from .flwr_partition import CLASS_ASSIGNMENTS, FLWR_PARTITIONS
from .tracking import parse_log
from .precision import PRECISIONS


LOSSES = ("contrastive", "ce")
HEADS = ("text", "prototype")
PROTOCOLS = ("lodo", "personal")
PARTITIONS = ("none", "iid", "dirichlet", "pathological") + FLWR_PARTITIONS
WEIGHTINGS = ("uniform", "samples")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda", "auto")  # and cuda:N
# Options of the adapter's local training, which prompt learning (promptfl, promptlocal) does not read; with every
# registered adapter's own ``options`` (see :func:`adapter_training_options`)
ADAPTER_OPTIONS = ("adapter", "hidden", "head", "template", "loss", "local_optimizer", "lr", "beta1", "beta2", "eps",
                   "weight_decay")


# The flwr-datasets partitioner options each --partition reads (the others are reported as set but ignored)
PARTITION_OPTIONS = {"flwr-iid": ("flwr_shuffle",),
                     "flwr-dirichlet": ("min_partition_size", "self_balancing", "flwr_shuffle"),
                     "flwr-pathological": ("class_assignment", "flwr_shuffle")}


def adapter_training_options() -> set[str]:
    """The fields only adapter training reads: :data:`ADAPTER_OPTIONS` and every registered adapter's options
    (``--residual-alpha``)."""
    return set(ADAPTER_OPTIONS) | {n for kind in ADAPTERS.values() for n in kind.options}


# The largest seed every consumer takes: torch's and numpy's generators take up to 2**64 - 1, but metrics.parquet
# stores the seed in an int32 column (a larger seed trained, then failed writing it: OverflowError, no results).
SEED_MAX = 2**31 - 1


def check_bounds(name: str, value: Any, label: str) -> None:
    """Refuse a value of field ``name`` outside its declared ``bounds``, naming it as the user wrote it
    (``label``: a flag, a grid or TOML key, ``--seeds: seed``)."""
    low, high = FIELDS[name].metadata.get("bounds") or (None, None)
    if low is not None and value < low:
        raise ConfigError(f"{as_written(label, value)}: must be at least {low}")
    if high is not None and value > high:
        why = " (seeds are stored as 32-bit integers)" if name == "seed" else ""
        raise ConfigError(f"{as_written(label, value)}: must be at most {high}{why}")


class FieldKind(NamedTuple):
    """The type of a FederateConfig field, from its annotation."""

    kind: type  # int | float | str | bool | tuple | list
    optional: bool  # None is allowed (the option's default is worked out at run time)


def field_kind(name: str) -> FieldKind:
    """The :class:`FieldKind` of a FederateConfig field."""
    return _KINDS[name]


def _kinds() -> dict[str, FieldKind]:
    hints = typing.get_type_hints(FederateConfig)
    out = {}
    for f in dataclasses.fields(FederateConfig):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = type(None) in typing.get_args(t)
        base = args[0] if optional else (typing.get_origin(t) or t)
        out[f.name] = FieldKind(base, optional)
    return out


def _check_field(cfg: "FederateConfig", name: str, flag: str) -> None:
    """Type check (and light normalisation) of one field; ranges are checked by ``validate``."""
    v = getattr(cfg, name)
    kind, optional = field_kind(name)
    if optional and v is None:
        return
    if kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{as_written(flag, v)}: expected true or false")
    elif kind is int:
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ConfigError(f"{as_written(flag, v)}: expected a whole number")
        setattr(cfg, name, int(v))
    elif kind is float:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ConfigError(f"{as_written(flag, v)}: expected a number")
        if not math.isfinite(v):
            raise ConfigError(f"{as_written(flag, v)}: must be a finite number (nan and inf would train a NaN adapter)")
        setattr(cfg, name, float(v))
    elif name == "split":
        if (not isinstance(v, (tuple, list)) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, Real) for x in v)):
            raise ConfigError(f"{as_written(flag, v)}: expected three fractions, e.g. 0.6,0.2,0.2")
        if not all(math.isfinite(x) for x in v):
            raise ConfigError(f"{as_written(flag, v)}: fractions must be finite numbers")
        setattr(cfg, name, tuple(float(x) for x in v))
    elif name == "heldout":
        if not isinstance(v, (list, tuple)) or not all(isinstance(h, str) and h for h in v):
            raise ConfigError(f"{as_written(flag, v)}: expected domain names, e.g. [\"photo\", \"sketch\"] or "
                              f"\"photo,sketch\"")
        setattr(cfg, name, list(v))
    elif name in ("template", "train_views") and isinstance(v, Integral) and not isinstance(v, bool):
        setattr(cfg, name, str(v))  # TOML `template = 1`, `train_views = 4`
    elif kind is str and not isinstance(v, str):
        raise ConfigError(f"{as_written(flag, v)}: expected a string")


NONE_WORDS = ("none", "default", "cache")  # how a grid or --set value asks for an optional field's default


def parse_text(name: str, raw: str, label: str, list_sep: str = ",") -> Any:
    """One option value written as text (a CLI flag, a ``--grid`` value), typed like the field it sets; ranges are
    checked by :meth:`FederateConfig.validate`. ``list_sep`` separates the parts of ``split``/``heldout`` (``,`` on
    the command line; ``/`` and ``+`` inside a grid, where ``,`` separates values)."""
    kind, optional = field_kind(name)
    raw = raw.strip()
    if name == "heldout":
        parts = [h.strip() for h in raw.split(list_sep)] if raw else []
        if not all(parts):
            raise ConfigError(f"{label}{raw!r}: expected domain names separated by {list_sep!r}, e.g. "
                              f"photo{list_sep}sketch")
        return parts
    if optional and raw.lower() in NONE_WORDS:
        return None
    try:
        if name == "split":
            vals = tuple(float(x) for x in raw.split(list_sep))
            if len(vals) != 3:
                raise ValueError
            return vals
        if kind is bool:
            if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError
            return raw.lower() in ("1", "true", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        if name == "split":
            raise ConfigError(f"{label}{raw!r}: expected three fractions separated by {list_sep!r}, e.g. "
                              f"{list_sep.join(['0.6', '0.2', '0.2'])}") from None
        raise ConfigError(f"{label}{raw!r}: not a valid {'true/false' if kind is bool else kind.__name__}") from None
    return raw


@dataclass
class FederateConfig:
    """Every option of a federated run, each declared once (default, help, flag; see :func:`option`)."""

    algo: str = option("fedclip", lambda: "Federated algorithm: " + algorithms_help() + ".")
    adapter: str = option("fedclip", adapters_help)
    hidden: Optional[int] = option(None, "Adapter width h (fedclip default h = D, the official setting).")
    residual_alpha: float = option(0.2, "Mixing weight of the residual adapter.")
    head: str = option("text", "text (class prompts from the cache) | prototype (class means).", choices=HEADS)
    template: str = option("0", "Index of the cache's prompt template, or 'mean' for an ensemble.")
    loss: str = option("contrastive", "contrastive (official in-batch CLIP loss) | ce.", choices=LOSSES)
    # Temperature of the cosine logits. None = the model's own logit_scale.exp() recorded in the cache (100 for
    # OpenAI's CLIP, the constant of the official code); 100 with a recorded note when the cache has none.
    logit_scale: Optional[float] = option(None, "Logit scale (temperature) of the cosine logits; default: the "
                                                "model's own logit_scale.exp() from the cache (100 for OpenAI "
                                                "CLIP, the official value).")
    local_optimizer: str = option("adam", "Local optimiser: adam (official; coupled L2 weight decay, as "
                                          "torch.optim.Adam) | sgd (plain SGD with the same coupled decay; "
                                          "--lr is its step size).", choices=OPTIMIZERS)
    lr: float = option(5e-5, "Local learning rate (official Adam 5e-5).")
    beta1: float = option(0.9, "Adam beta1 (official 0.9).")
    beta2: float = option(0.98, "Adam beta2 (official 0.98).")
    eps: float = option(1e-6, "Adam eps (official 1e-6).")
    weight_decay: float = option(0.2, "Local L2 weight decay, coupled (official 0.2).")
    batch_size: int = option(32, "Local batch size (official 32).")
    local_epochs: int = option(1, "Local epochs per round (official 1).", grid="epochs")
    rounds: int = option(200, "Communication rounds (official README: 200).")
    mu: float = option(0.0, "FedProx proximal weight.")
    server_lr: Optional[float] = option(None, "Server learning rate of fedavgm/fedadam/fedyogi/fedadagrad/scaffold; "
                                              "default: the algorithm's own (see docs/federate.md).")
    server_momentum: float = option(0.9, "Server momentum of fedavgm.")
    server_beta1: float = option(0.9, "First-moment decay of fedadam/fedyogi (Flower's beta_1).")
    server_beta2: float = option(0.99, "Second-moment decay of fedadam/fedyogi (Flower's beta_2).")
    tau: Optional[float] = option(None, "Adaptivity of fedadam/fedyogi/fedadagrad (added to the root of the "
                                        "second moment); default: the algorithm's own, as Flower.")
    weighting: str = option("uniform", "uniform (official) | samples (FedAvg by sample count).", choices=WEIGHTINGS)
    fraction_fit: float = option(1.0, "Fraction of each experiment's clients sampled to train per round (seeded; "
                                      "Flower's fraction_fit). 1 = every client, the official setting.")
    min_fit_clients: int = option(1, "At least this many clients train per round (Flower's min_fit_clients).")
    finetune_steps: int = option(0, "Personalised evaluation: fine-tune the selected global adapter (or prompt) "
                                    "for K local steps on each client's train split before scoring its test split, "
                                    "reported beside the global-model numbers (0 = off).")
    n_ctx: int = option(16, "Prompt learning (promptfl, promptlocal): number of learned context vectors (CoOp and "
                            "PromptFL: 16); ignored with --ctx-init, whose token count sets it.")
    ctx_init: Optional[str] = option(None, "Prompt learning: start the context from this phrase's token embeddings "
                                           "(e.g. 'a photo of a'); default: random N(0, 0.02^2), as CoOp.")
    prompt_lr: float = option(0.001, "Prompt learning: SGD learning rate of the context vectors (PromptFL: 0.001).")
    prompt_momentum: float = option(0.9, "Prompt learning: SGD momentum of the context vectors (PromptFL/Dassl: "
                                         "0.9); a fresh buffer per client and round.")
    prompt_weight_decay: float = option(5e-4, "Prompt learning: SGD weight decay (L2, coupled as torch.optim.SGD) of "
                                              "the context vectors (PromptFL/Dassl: 5e-4).")
    prompt_csc: bool = option(False, "Prompt learning: class-specific context (CoOp's CSC): one set of --n-ctx "
                                     "vectors per class (C x n_ctx x width parameters) instead of one shared set.")
    prompt_schedule: str = option("constant", "Prompt learning: step size over rounds: constant | cosine "
                                              "(round r of R uses lr * (1 + cos(pi (r-1) / R)) / 2, a cosine "
                                              "schedule stepped once per round).", choices=("constant", "cosine"))
    text_model_config: Optional[str] = option(None, "Prompt learning: architecture JSON of the cache's model when "
                                                    "it was extracted with --model-config (the cache records only "
                                                    "its hash).")
    text_pretrained: Optional[str] = option(None, "Prompt learning: weights of the cache's model (a tag or a file) "
                                                  "when the recorded one is not where the cache says; the "
                                                  "fingerprint must still match the cache's.")
    prompt_full_context: bool = option(False, "Prompt learning: run the text transformer over the full context "
                                              "(77 tokens) instead of truncating after the longest prompt (same "
                                              "results; slower; for timing).")
    # FedPGP (--algo fedpgp; Cui et al., ICML 2024; defaults from the official code, cited in docs/federate.md)
    pgp_rank: int = option(8, "FedPGP: rank of each client's personal low-rank prompt U V (U: n_ctx x rank, V: "
                              "rank x width; official: 8).", bounds=(1, None))
    pgp_mu: float = option(0.5, "FedPGP: weight of the CLIP-guided contrastive term in the local loss (official "
                                "script: 0.5).", bounds=(0, None))
    pgp_temp: float = option(0.5, "FedPGP: temperature of the contrastive term (official: 0.5).")
    train_views: str = option("1", "Views of each training image to train on (a cache extracted with --views K): "
                                   "1 (official: the deterministic view only) | N <= K | all. Each local epoch "
                                   "every training sample uses one of its first N views, drawn with a seeded RNG "
                                   "(seed, round, client, epoch); validation, test and held-out always use view 0.")
    protocol: str = option("lodo", "lodo (leave-one-domain-out, official) | personal.", choices=PROTOCOLS)
    heldout: list[str] = option(help="Held-out domain(s), comma-separated; default: each in turn.", factory=list)
    partition: str = option("none", "none (clients = domains) | iid | dirichlet | pathological | flwr-iid | "
                                    "flwr-dirichlet | flwr-pathological (flwr-datasets' own partitioners; extra "
                                    "[flwr-datasets]).", choices=PARTITIONS)
    alpha: float = option(0.5, "Dirichlet concentration (smaller = more label skew).")
    num_clients: int = option(4, "Clients per partition scope.", flag="--clients", grid="clients")
    classes_per_client: int = option(2, "Classes per client for --partition pathological.")
    partition_scope: str = option("domain", "domain (split each domain) | pooled.", choices=("domain", "pooled"))
    # flwr-datasets partitioners (--partition flwr-*, federated/flwr_partition.py): their options, flwr's defaults
    min_partition_size: int = option(10, "--partition flwr-dirichlet: DirichletPartitioner's min_partition_size "
                                         "(re-draw until every client has this many samples).", bounds=(0, None))
    self_balancing: bool = option(False, "--partition flwr-dirichlet: DirichletPartitioner's self_balancing.")
    class_assignment: str = option("random", "--partition flwr-pathological: PathologicalPartitioner's "
                                             "class_assignment_mode.", choices=CLASS_ASSIGNMENTS)
    flwr_shuffle: bool = option(True, "--partition flwr-*: shuffle the rows with --seed before partitioning, as "
                                      "FederatedDataset(shuffle=True) does.")
    split: tuple[float, float, float] = option((0.6, 0.2, 0.2), "Train/val/test fractions of each training client.")
    split_source: str = option("random", "random (seeded) | cache (the manifest's split column).",
                               choices=("random", "cache"))
    # Official boundaries: train = first int(.6n) of the shuffle, val = next int(.2n), test = next int(.2n); the 0-2
    # samples left over are dropped ("drop", counted in the summary) or given to test ("test": covers every sample).
    split_tail: str = option("drop", "drop (official: train/val/test = int(.6n)/int(.2n)/int(.2n), the 0-2 left "
                                     "over dropped and counted) | test (they go to test).", choices=("drop", "test"))
    client_key: str = option("domain", "domain | client: which cache column defines clients.",
                             choices=("domain", "client"))
    # Protocols (issue 23): few-shot training splits and base-to-novel generalisation (federated/protocols.py)
    shots: Optional[int] = option(None, "Few-shot: keep K training images per class in each client's training "
                                        "split (seeded per class: the same images for every algorithm, and those "
                                        "of K a subset of those of K' > K); validation and test unchanged. "
                                        "Default: every training image.", bounds=(1, None))
    base_to_novel: bool = option(False, "Base-to-novel (FedTPG, CoCoOp): train and validate on the base classes "
                                        "(the first ceil(C/2) of the class list); test on base and on novel "
                                        "classes, each among its own classes, and their harmonic mean.")
    seed: int = option(0, f"Seed (data split, shuffles, adapter init), 0 to {SEED_MAX}.", bounds=(0, SEED_MAX))
    eval_every: int = option(1, "Evaluate every N rounds (official: every round).")
    curves: bool = option(False, "Score test and held-out sets every evaluated round (full curves for plots). "
                                 "Default: validation every round, test/held-out only when the best validation "
                                 "improves and at the last round -- the selected and last numbers are the same.")
    device: str = option("cpu", "cpu | cuda | auto (cuda: features stay on the GPU when they fit, else are "
                                "streamed per batch from host memory).")
    # Denormal floats are flushed to zero on every computing thread while training (see federated/fpenv.py):
    # saturating softmaxes otherwise make the step cost grow ~7x within a long round. True opts out.
    keep_denormals: bool = option(False, "Do not flush denormal floats to zero (by default they are flushed on "
                                         "every CPU thread while training: saturated softmax gradients otherwise "
                                         "slow steps down many times).")
    # Experiment tracking (issue 22, federated/tracking.py): where a run's numbers are also sent, never what the run
    # is: left out of sweep point ids (sweep.point_id) and of the hyper-parameters the trackers receive
    log: str = option("", "Also send the run folder's numbers to trackers: any of tensorboard,mlflow,wandb "
                          "(comma-separated; files inside the run folder: RUN/tb, RUN/mlflow.db, RUN/wandb). Needs -o.")
    mlflow_uri: Optional[str] = option(None, "--log mlflow: the MLflow tracking URI (a server, http://HOST:5000); "
                                             "default: sqlite:///RUN/mlflow.db inside the run folder.")
    # --precision (issue 23, bf16 training; federated/precision.py): fp32 is the default and the reference
    precision: str = option("fp32", "Local training's forward passes: fp32 (default, the reference) | bf16 "
                                    "(bfloat16 autocast around the adapter and the frozen text tower, as extract "
                                    "--precision bf16 around the encoder; parameters, optimiser state, loss, "
                                    "aggregation and evaluation stay fp32). bf16 needs native bf16 matmul: a CPU "
                                    "with AVX512-BF16/AMX or a CUDA GPU with bf16.", choices=PRECISIONS)

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "FederateConfig":
        """Check every field's type and range; raise :class:`ConfigError` naming the option as the user wrote it.

        ``names`` maps a field to that spelling (a CLI flag such as ``--clients``, a TOML key such as
        ``federate.rounds``, a grid key); fields it does not name read as ``--field-name``. Non-finite numbers
        (nan, inf) are always rejected: they would train an all-NaN adapter. The checks run in a fixed order
        (types, choices, formats, counts, ranges, combinations): the first that fails is the one reported.
        """
        checks = _Checks(self, names)
        for step in (checks.types, checks.choices, checks.formats, checks.counts, checks.ranges,
                     checks.combinations):
            step()
        return self

    def ignored_options(self) -> list[str]:
        """Options set away from their default that this algorithm does not read (e.g. --mu for fedclip)."""
        algo = get_algorithm(self.algo)
        used = set(algo.uses)
        owned = {n for a in ALGORITHMS.values() for n in a.uses}
        if algo.prompts:  # prompt learning trains no adapter, with its own loss and optimiser
            owned |= adapter_training_options()
        default = FederateConfig()
        return [n for n in sorted(owned - used) if getattr(self, n) != getattr(default, n)]

    def ignored_partition_options(self) -> list[str]:
        """flwr-datasets partitioner options set away from their default that this --partition does not read."""
        used = PARTITION_OPTIONS.get(self.partition, ())
        default = FederateConfig()
        owned = sorted({n for names in PARTITION_OPTIONS.values() for n in names})
        return [n for n in owned if n not in used and getattr(self, n) != getattr(default, n)]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["split"] = list(self.split)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FederateConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown federate option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if isinstance(d.get("split"), list):
            d["split"] = tuple(d["split"])
        if isinstance(d.get("heldout"), str):
            d["heldout"] = [h for h in d["heldout"].split(",") if h]
        return cls(**d)


class _Checks:
    """The named steps of :meth:`FederateConfig.validate` on one configuration; every refusal names the option as
    the user wrote it (``names``: field -> spelling, else ``--field-name``)."""

    COUNTS = ("batch_size", "local_epochs", "eval_every", "num_clients", "classes_per_client", "min_fit_clients",
              "n_ctx")  # whole numbers >= 1
    # > 0; None (where allowed) is the model's or the algorithm's own value
    POSITIVE = ("lr", "eps", "alpha", "prompt_lr", "logit_scale", "pgp_temp")
    NON_NEGATIVE = ("weight_decay", "mu", "finetune_steps", "prompt_weight_decay")
    SERVER_POSITIVE = ("server_lr", "tau")
    MOMENTA = ("server_momentum", "prompt_momentum")  # in [0, 1)
    BETAS = ("beta1", "beta2", "server_beta1", "server_beta2")  # in [0, 1)

    def __init__(self, cfg: FederateConfig, names: Optional[Mapping[str, str]]) -> None:
        self.cfg, self.names = cfg, dict(names or {})

    def flag(self, name: str) -> str:
        return self.names.get(name) or option_flag(name)

    def bad(self, name: str, why: str) -> ConfigError:
        return ConfigError(f"{as_written(self.flag(name), getattr(self.cfg, name))}: {why}")

    def one_of(self, name: str, options: tuple[str, ...]) -> None:
        if getattr(self.cfg, name) not in options:
            raise ConfigError(f"{as_written(self.flag(name), getattr(self.cfg, name))} unknown; "
                              f"choose one of {', '.join(options)}")

    def at_least(self, name: str, low: float) -> None:
        if getattr(self.cfg, name) < low:
            raise self.bad(name, f"must be at least {low}")

    def positive(self, name: str) -> None:
        value = getattr(self.cfg, name)
        if value is not None and value <= 0:
            raise self.bad(name, "must be > 0")

    def below_one(self, name: str) -> None:
        if not 0 <= getattr(self.cfg, name) < 1:
            raise self.bad(name, "must be in [0, 1)")

    def types(self) -> None:
        """Each field's type, with light normalisation (``_check_field``)."""
        for f in dataclasses.fields(self.cfg):
            _check_field(self.cfg, f.name, self.flag(f.name))

    def choices(self) -> None:
        """Registered names (``--algo``, ``--adapter``) and declared ``choices``: `federate.algo = 'x'` and
        `--grid algo='x'` are refused like every other choice."""
        self.one_of("algo", tuple(ALGORITHMS))
        self.one_of("adapter", tuple(list_adapters()))
        for f in dataclasses.fields(self.cfg):
            if f.metadata.get("choices"):
                self.one_of(f.name, f.metadata["choices"])

    def formats(self) -> None:
        """Text options with a shape: ``--device``, ``--template``, ``--train-views``."""
        cfg = self.cfg
        if not (cfg.device in DEVICES or re.fullmatch(r"cuda:\d+", cfg.device)):
            raise self.bad("device", f"unknown device; choose one of {'|'.join(DEVICES)}")
        if cfg.template != "mean" and not re.fullmatch(r"\d+", cfg.template):
            raise self.bad("template", "give a template index (0, 1, ...) or 'mean'")
        parse_log(cfg.log, self.flag("log"))  # tracker names (their packages: tracking.check_available)
        if cfg.train_views != "all" and not (re.fullmatch(r"\d+", cfg.train_views) and int(cfg.train_views) >= 1):
            raise self.bad("train_views", "give a number of views >= 1 or 'all' (views of a cache extracted with "
                                          "--views)")

    def counts(self) -> None:
        """Whole-number options: at least 1, declared ``bounds``, ``--hidden``, ``--rounds`` and ``--eval-every``."""
        cfg = self.cfg
        for name in self.COUNTS:
            self.at_least(name, 1)
        for f in dataclasses.fields(cfg):
            if f.metadata.get("bounds") and getattr(cfg, f.name) is not None:
                check_bounds(f.name, getattr(cfg, f.name), self.flag(f.name))
        if cfg.hidden is not None:
            self.at_least("hidden", 1)
        self.at_least("rounds", 0)  # 0: nothing is trained, the starting adapter is scored once (round 0)
        if cfg.algo != "zeroshot" and cfg.rounds > 0:  # zeroshot trains nothing: rounds are not used
            if cfg.eval_every > cfg.rounds:
                raise self.bad("eval_every", f"must not exceed {as_written(self.flag('rounds'), cfg.rounds)} (only "
                                             f"the last round would be evaluated)")

    def ranges(self) -> None:
        """Real-valued options: rates, weights, fractions and decays in their intervals, then ``--split``."""
        cfg = self.cfg
        for name in self.POSITIVE:
            self.positive(name)
        for name in self.NON_NEGATIVE:
            self.at_least(name, 0)
        for name in self.SERVER_POSITIVE:
            self.positive(name)
        if not 0 < cfg.fraction_fit <= 1:
            raise self.bad("fraction_fit", "must be in (0, 1]")
        for name in self.MOMENTA:
            self.below_one(name)
        if not 0 <= cfg.residual_alpha <= 1:
            raise self.bad("residual_alpha", "must be between 0 and 1")
        for name in self.BETAS:
            self.below_one(name)
        if min(cfg.split) < 0 or max(cfg.split) > 1 or abs(sum(cfg.split) - 1) > 1e-6:
            raise ConfigError(f"{self.flag('split').rstrip('= ')} must be three fractions in [0, 1] summing to 1, "
                              f"e.g. 0.6,0.2,0.2 (got {show(cfg.split)})")
        if cfg.split[0] == 0 and cfg.split_source == "random":
            raise self.bad("split", "the train fraction must be > 0")

    def combinations(self) -> None:
        """Options that are valid alone but not together: the contrastive loss's batch size, held-out domains."""
        cfg = self.cfg
        if cfg.prompt_csc and "prompt_csc" not in get_algorithm(cfg.algo).uses and get_algorithm(cfg.algo).prompts:
            raise self.bad("prompt_csc", f"{cfg.algo} learns one context shared by every class (FedPGP's "
                                         f"sigma + U V); class-specific contexts are for promptfl and promptlocal")
        if cfg.algo == "fedpgp" and cfg.pgp_rank > cfg.n_ctx:  # U V of rank above n_ctx: not low-rank, only cost
            raise self.bad("pgp_rank", f"above {as_written(self.flag('n_ctx'), cfg.n_ctx)}: the personal prompt U V "
                                       f"(n_ctx x width) has rank at most n_ctx; give a rank <= {cfg.n_ctx}")
        if cfg.batch_size < 2 and cfg.loss == "contrastive":
            raise self.bad("batch_size", "must be >= 2 for the contrastive loss (batches of one are skipped)")
        if cfg.heldout:
            if cfg.protocol != "lodo":
                raise self.bad("heldout", f"only the lodo protocol holds domains out "
                                          f"({as_written(self.flag('protocol'), cfg.protocol)} does not)")
            if len(set(cfg.heldout)) != len(cfg.heldout):
                dup = next(h for h in cfg.heldout if cfg.heldout.count(h) > 1)
                raise self.bad("heldout", f"domain {dup!r} is given twice")
        if cfg.base_to_novel:
            self.base_to_novel()

    def base_to_novel(self) -> None:
        """``--base-to-novel`` with what has nothing to say about classes never trained on."""
        cfg = self.cfg
        prompts = get_algorithm(cfg.algo).prompts
        if cfg.head == "prototype" and not prompts:
            raise self.bad("head", f"a prototype head has no novel-class prototypes without novel-class data; "
                                   f"{self.flag('base_to_novel')} needs the text head ({self.flag('head')} text)")
        if cfg.prompt_csc and prompts:
            raise self.bad("prompt_csc", f"class-specific contexts of novel classes are never trained; "
                                         f"{self.flag('base_to_novel')} needs one shared context")
        if cfg.finetune_steps:
            raise self.bad("finetune_steps", f"not supported with {self.flag('base_to_novel')} (its test split mixes "
                                             f"base and novel classes); use --finetune-steps 0")


_KINDS = _kinds()


def option_help(name: str) -> str:
    """The help text of an option (``--algo``'s and ``--adapter``'s list what is registered)."""
    text = FIELDS[name].metadata["help"]
    return text() if callable(text) else text


def option_flag(name: str) -> str:
    """The flag a user types for a field (``num_clients`` -> ``--clients``)."""
    return flag_of(FIELDS[name])


FIELDS = {f.name: f for f in dataclasses.fields(FederateConfig)}
GRID_ALIASES = {f.metadata["grid"]: f.name for f in FIELDS.values() if f.metadata.get("grid")}
