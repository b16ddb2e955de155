"""sagekv: KV-cache eviction for long-context inference on MLX and PyTorch.

The core imports neither mlx nor torch; backends load on first use.
"""

from .dropin import cache_for, prompt_cache_for
from .errors import SageKVError
from .generate import Result, SageModel, Stats, load
from .policies import TOVA, Full, Knorm, Quest, Random, SageKV, SnapKV, StreamingLLM, make_policy
from .rag import EPIC, CacheBlend, FullRecompute, Reuse, SamKV
from .sampling import Sampler
from .selection import select

__version__ = "0.1.0"

__all__ = [
    "EPIC",
    "CacheBlend",
    "FullRecompute",
    "Reuse",
    "SamKV",
    "TOVA",
    "Full",
    "Knorm",
    "Quest",
    "Random",
    "SnapKV",
    "make_policy",
    "cache_for",
    "prompt_cache_for",
    "Result",
    "SageKV",
    "SageKVError",
    "SageModel",
    "Sampler",
    "Stats",
    "StreamingLLM",
    "load",
    "select",
]
