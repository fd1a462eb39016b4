"""fedclip-cache: extract frozen CLIP features once, then train FedCLIP adapters and baselines on the cache."""
from .cache import FeatureCache, open_cache
from .extract import ExtractConfig, ExtractReport, extract
from .models import ModelSpec, load_model

__all__ = ["FeatureCache", "open_cache", "ExtractConfig", "ExtractReport", "extract", "ModelSpec", "load_model"]
__version__ = "0.1.0"
