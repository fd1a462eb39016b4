"""The checks ``deploy`` and ``simulate`` make on their site caches, run folder and options before anything starts:
each failure is a one-line :class:`~fedclip_cache.errors.ConfigError` naming the command."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def check_sites(site_caches: list, cfg, command: str = "deploy") -> list[str]:
    """Each site's domain, or a one-line error (starting with ``command``) before anything starts. Shared with
    ``simulate``'s per-site caches."""
    from ..cache.reader import cache_overview

    if len(site_caches) < 2:
        raise ConfigError(f"{command}: {len(site_caches)} site cache(s); a federation needs at least 2")
    domains = []
    first_cache = first_shared = None  # the first site: what every site must share with it (the model's
    # fingerprint, the feature dimension, the class list)
    for c in site_caches:
        if not Path(c).is_dir():
            raise ConfigError(f"{command}: site cache {c} does not exist (extract each site's images into its own "
                              f"cache first)")
        ov = cache_overview(c)
        names = ov.domain_names
        shared = {"model (fingerprint)": ov.meta.get("fingerprint"), "feature dimension": ov.meta.get("embedding_dim"),
                  "class list": list(ov.classes)}
        if first_shared is None:
            first_cache, first_shared = c, shared
        for what, v in shared.items():
            if v != first_shared[what]:
                raise ConfigError(f"{command}: site caches {first_cache} and {c} differ in their {what}: extract every "
                                  f"site with the same model and the same --classes file")
        if len(names) != 1:
            raise ConfigError(f"{command}: {c}: a site cache holds one domain (this one: {', '.join(names)}); "
                              f"extract each site's own images into its own cache, or give ONE shared cache")
        from ..cache.sources import path_name_problem  # the rule extract applies; caches made before it was, checked here

        why = path_name_problem(names[0])
        if why:
            raise ConfigError(f"{command}: {c}: domain name {names[0]!r} {why}, so it cannot name a file (a site's "
                              f"files are named after it, e.g. deploy's logs/site-DOMAIN.log): re-extract this site "
                              f"with a plain domain name")
        domains.append(names[0])
    if len(set(domains)) != len(domains):
        raise ConfigError(f"{command}: two site caches hold the same domain ({', '.join(domains)})")
    if len(cfg.heldout) > 1:
        raise ConfigError(f"{command}: --heldout takes one site's domain (one federation per run)")
    if cfg.heldout and cfg.heldout[0] not in domains:
        raise ConfigError(f"{command}: --heldout {cfg.heldout[0]!r} is none of the sites' domains "
                          f"({', '.join(domains)})")
    if cfg.heldout and len(domains) < 3:
        raise ConfigError(f"{command}: with --heldout, at least 2 other sites must train (give 3 or more site "
                          f"caches)")
    return domains


def check_run_folder(out, command: str = "deploy") -> None:
    """A one-line error, before anything starts, when the run folder ``out`` (or a folder above it) is a file (the
    rule ``runfolder.claim`` applies again when it takes the folder)."""
    from ..federated.runfolder import check_not_a_file

    check_not_a_file(out, f"{command} -o")


def check_site_options(site_caches: list, cfg) -> None:
    """What each site checks against its own cache (views for --train-views, --template, the logit scale), here
    before anything starts: a one-line error instead of a run that fails at its set-up message."""
    from ..cache.reader import open_cache
    from ..federated.loop import resolve_logit_scale, resolve_train_views, text_head

    for c in site_caches:
        cache = open_cache(c)
        resolve_train_views(cfg, cache)
        resolve_logit_scale(cfg, cache)
        if cfg.head == "text":
            text_head(cache, cfg.template)
    check_text_towers(site_caches, cfg)


def check_text_towers(caches: list, cfg) -> None:
    """Prompt learning: each site's frozen text tower rebuilt from its own cache's provenance, as the site will
    (``promptsteps.prompt_learner``: the model files, the recorded fingerprint, the class prompts' fit), here
    before anything starts: a one-line error naming the cache instead of a run that fails at its set-up message.
    Caches with the same model record and classes are checked once (a model is loaded once, not once per site)."""
    import json

    from ..cache.reader import open_cache
    from ..federated.algorithms import make_algorithm

    if not make_algorithm(cfg).prompts:
        return
    from ..federated.promptsteps import prompt_learner, text_model

    checked = set()
    for c in caches:
        cache = open_cache(c)
        key = json.dumps([cache.meta.get(k) for k in ("model", "fingerprint", "preprocess")] + [list(cache.classes)],
                         sort_keys=True, default=str)
        if key in checked:
            continue
        try:
            prompt_learner(text_model(cache.meta, cfg), cache.classes, cfg)
        except ConfigError as e:
            raise ConfigError(f"site cache {c}: {e}") from None
        checked.add(key)
