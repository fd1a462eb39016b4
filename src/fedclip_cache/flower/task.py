"""Flower's run config <-> :class:`~fedclip_cache.federated.config.FederateConfig`: the one codec of a deployment.

``deploy`` and ``simulate`` encode the run with :func:`run_config`; the ClientApp and the ServerApp decode it with
:func:`federate_config` (and ``deploy``/``simulate`` call it too, before anything starts, so an option the apps
cannot honour is refused in one line up front). Flower's run config holds scalars only: ``split`` travels as
``"0.6,0.2,0.2"``, ``heldout`` as one domain name ("" for the personal protocol). Besides the federate options a
deployment's run config holds ``cache`` (one shared cache; "" or absent: per-site caches) and
:data:`DEPLOYMENT_KEYS`. Imports neither flwr nor torch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from ..federated.algorithms import Algorithm, make_algorithm
from ..federated.config import ConfigError, FederateConfig, option_flag

# Run-config keys of a deployment besides the federate options (read by the ServerApp, see server_app.py).
DEPLOYMENT_KEYS = ("sites", "out", "round_timeout", "min_results", "startup_timeout", "poll_interval")
# Their defaults when the run config leaves them out, and the longest poll interval; `deploy`, `site` and the CLI
# use the same constants.
DEFAULT_ROUND_TIMEOUT = 600.0
DEFAULT_MIN_RESULTS = 1
DEFAULT_STARTUP_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 0.2  # the longest wait between two "replies yet?" requests (flwr 1.42's own: 3 s fixed)
MAX_POLL_INTERVAL = 60.0
# `simulate`'s poll interval: the in-memory SuperLink answers at once, so a short poll keeps a round close to the
# clients' work
SIMULATION_POLL_INTERVAL = 0.05

# Prompt-learning algorithms the apps run (flower/client_app.py: each site rebuilds the frozen text tower from its
# own cache and trains with federated/promptsteps.py). What travels is what the server holds (the algorithm's
# init_state's server state: promptfl's context; nothing for promptlocal); a personal algorithm's site keeps its own
# parameters in Flower's context.state, the global part replaced by each message's. A prompt method whose rounds fit
# that rule (FedPGP: sigma averaged, U V kept) is enabled by adding its name.
PROMPT_ALGORITHMS = ("promptfl", "promptlocal", "fedpgp")

# Federate options the Flower apps do not honour, each with what to do instead (a silently ignored option would
# give a run folder that looks like federate's but is not). Checked against the defaults.
UNSUPPORTED = {
    "device": "the sites train on their CPU; leave --device at cpu",
    "base_to_novel": "the sites score no novel-class test rows yet; use `fedclip-cache federate`",
}


class SiteTask(NamedTuple):
    """What a run config asks of the apps: the shared cache ("" for per-site caches) and the run's options."""

    cache: str
    cfg: FederateConfig


def run_config(cfg: FederateConfig, n_sites: int, out: Path) -> dict:
    """The Flower run config of a deployment: the federate options that differ from the defaults (Flower's run
    config holds scalars only), ``sites``, ``heldout`` and ``out``."""
    if cfg.protocol == "lodo" and not cfg.heldout:
        raise ConfigError("deploy: --protocol lodo needs --heldout SITE_DOMAIN (one federation per deployment; "
                          "`federate` holds each domain out in turn), or use --protocol personal")
    default = FederateConfig().to_dict()
    rc = {k: v for k, v in cfg.to_dict().items()
          if k not in ("heldout", "protocol") and v is not None and v != default[k]}
    if "split" in rc:  # Flower's run config holds scalars
        rc["split"] = ",".join(repr(float(x)) for x in cfg.split)
    rc.update(sites=n_sites, heldout=cfg.heldout[0] if cfg.heldout else "", out=str(out))
    return rc


def federate_config(run_config: dict) -> SiteTask:
    """The shared cache path ("" for per-site caches) and the run's FederateConfig from Flower's run config, or a
    one-line ConfigError naming an option the apps cannot honour."""
    rc = dict(run_config)
    cache = rc.pop("cache", "")
    for key in DEPLOYMENT_KEYS:  # the deployment's own settings, not federate options
        rc.pop(key, None)
    heldout = rc.pop("heldout", "")
    if isinstance(rc.get("split"), str):  # Flower's run config holds scalars: "0.6,0.2,0.2"
        try:
            rc["split"] = tuple(float(x) for x in rc["split"].split(","))
        except ValueError:
            raise ConfigError(f"--split {rc['split']!r}: expected three fractions, e.g. 0.6,0.2,0.2") from None
    cfg = FederateConfig.from_dict({**rc, "heldout": [heldout] if heldout else [],
                                    "protocol": "lodo" if heldout else "personal"}).validate()
    check_supported(cfg, per_site_caches=not cache)
    return SiteTask(cache, cfg)


def check_supported(cfg: FederateConfig, per_site_caches: bool) -> None:
    """A one-line ConfigError for options, algorithms and data layouts the Flower apps cannot honour."""
    default = FederateConfig()
    for name, why in UNSUPPORTED.items():
        if getattr(cfg, name) != getattr(default, name):
            raise ConfigError(f"{option_flag(name)} {getattr(cfg, name)}: not supported by the Flower apps: {why}")
    algo = make_algorithm(cfg)
    if algo.prompts:  # the sites keep what is personal (SiteClient.handle's state); see PROMPT_ALGORITHMS
        check_prompt_algorithm(cfg, algo)
    elif not algo.communicates:
        raise ConfigError(f"--algo {cfg.algo}: nothing to federate (it trains without a server); use "
                          f"`fedclip-cache federate`")
    elif algo.client_state or type(algo).run_round is not Algorithm.run_round:  # e.g. SCAFFOLD's c_i
        raise ConfigError(f"--algo {cfg.algo} is not supported by the Flower apps yet (its clients keep state "
                          f"between rounds); use `fedclip-cache federate`")
    if per_site_caches and (cfg.partition != "none" or cfg.split_source != "random" or cfg.client_key != "domain"):
        bad = next(n for n in ("partition", "split_source", "client_key") if getattr(cfg, n) != getattr(default, n))
        raise ConfigError(f"{option_flag(bad)} {getattr(cfg, bad)}: per-site caches: a site is one client (use the "
                          f"default --partition none, --split-source random, --client-key domain)")


def check_prompt_algorithm(cfg: FederateConfig, algo: Algorithm) -> None:
    """A one-line ConfigError for a prompt-learning algorithm the apps cannot run as asked: one not in
    :data:`PROMPT_ALGORITHMS`, or a personal one (each site keeps its own context) with a held-out site, which
    would have to receive every site's context to score it."""
    if cfg.algo not in PROMPT_ALGORITHMS:
        raise ConfigError(f"--algo {cfg.algo} (prompt learning) is not supported by the Flower apps yet (they run "
                          f"{', '.join(PROMPT_ALGORITHMS)}); use `fedclip-cache federate`")
    if algo.personal and cfg.heldout:
        raise ConfigError(f"--algo {cfg.algo} --heldout {cfg.heldout[0]}: each site keeps its own context, which "
                          f"never leaves it, so no held-out site can score it; use --protocol personal (no "
                          f"--heldout), or `fedclip-cache federate`")


def check_deployment_keys(rc: dict) -> None:
    """A one-line ConfigError for a run config's ``sites``, ``min_results``, ``round_timeout`` or ``poll_interval``
    that the ServerApp cannot honour: checked by the ServerApp and, before anything starts, by ``deploy`` and
    ``simulate`` (a NaN round timeout never expired; a negative one failed every round as "no site answered")."""
    n_sites = int(rc.get("sites", 0))
    if n_sites < 1:
        raise ConfigError("set the run config's `sites` to the number of SuperNodes")
    min_results = int(rc.get("min_results", DEFAULT_MIN_RESULTS))
    if not 1 <= min_results <= n_sites:
        raise ConfigError(f"min_results {min_results}: must be between 1 and the number of nodes ({n_sites})")
    for key, hi in (("round_timeout", None), ("startup_timeout", None), ("poll_interval", MAX_POLL_INTERVAL)):
        if key in rc:
            v = float(rc[key])
            if not (math.isfinite(v) and v > 0 and (hi is None or v <= hi)):
                raise ConfigError(f"{key} {v}: must be a positive number of seconds"
                                  + (f", at most {hi:g}" if hi else ""))
