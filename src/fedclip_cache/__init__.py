"""fedclip-cache: extract frozen CLIP features once, then train FedCLIP adapters and baselines on the cache.

The public names are imported lazily (PEP 562), so ``fedclip-cache info`` and other metadata-only uses never pay
for importing torch.
"""
import sys
import types
from importlib import import_module

_PUBLIC = {
    "FeatureCache": ".cache.reader", "open_cache": ".cache.reader", "cache_overview": ".cache.reader",
    "ExtractConfig": ".cache.config", "ExtractReport": ".cache.extract", "extract": ".progress",
    "ModelSpec": ".cache.config", "load_model": ".cache.models",
    "federate": ".federated.results", "FederateConfig": ".federated.config",
    "sweep": ".sweep",
    "list_algorithms": ".federated.algorithms", "register_algorithm": ".federated.algorithms",
    "Algorithm": ".federated.algorithms", "list_adapters": ".federated.adapters",
    "CacheError": ".cache.store", "FedclipCacheError": ".errors", "ConfigError": ".errors",
}
__all__ = list(_PUBLIC)
__version__ = "0.1.0"


class _Package(types.ModuleType):
    def __getattr__(self, name: str):
        if name in _PUBLIC:
            value = getattr(import_module(_PUBLIC[name], __name__), name)
            setattr(self, name, value)
            return value
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule ``fedclip_cache.cache.extract`` binds it as the package attribute ``extract``; keep the
        # public function of that name there instead (as an eager ``from .extract import extract`` would).
        if isinstance(value, types.ModuleType) and _PUBLIC.get(name) == "." + name:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
