"""sagekv: KV-cache eviction for long-context inference on MLX and PyTorch.

The core imports neither mlx nor torch; backends load on first use.
"""

from .errors import SageKVError
from .generate import Result, SageModel, Stats, load
from .policies import Full, SageKV, StreamingLLM
from .selection import select

__version__ = "0.1.0"

__all__ = [
    "Full",
    "Result",
    "SageKV",
    "SageKVError",
    "SageModel",
    "Stats",
    "StreamingLLM",
    "load",
    "select",
]
