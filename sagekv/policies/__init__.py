"""Cache policies: one small validated dataclass per method, one file per paper."""

from __future__ import annotations

from ..errors import SageKVError
from .base import Layout, Policy
from .quest import Quest
from .sagekv import SageKV
from .simple import TOVA, Knorm, Random
from .snapkv import SnapKV
from .streaming import Full, StreamingLLM

# Named settings for the command line and evaluation; each takes the budget.
NAMED = {
    "full": lambda budget: Full(),
    "sagekv": SageKV,  # the paper's setting
    "sagekv_kv": lambda budget: SageKV(budget, group="kv_head"),
    "sagekv_pool": lambda budget: SageKV(budget, pool=9),
    "sagekv_follow": lambda budget: SageKV(budget, follow=32, decay=0.8),
    "sagekv_kv_follow": lambda budget: SageKV(budget, group="kv_head", follow=32, decay=0.8),
    "streaming": StreamingLLM,
    "snapkv": SnapKV,
    "quest": Quest,
    "tova": TOVA,
    "knorm": Knorm,
    "random": Random,
}

# What `sagekv run` and `sagekv eval` use unless told: the SAGE-KV variant that scores best on the
# results page (results/README.md). The paper's setting stays available as "sagekv".
DEFAULT_POLICY = "sagekv_kv_follow"


def make_policy(name: str, budget=None) -> Policy:
    """The named policy at ``budget`` KV entries per KV head (none for ``full``)."""
    if name not in NAMED:
        raise SageKVError(f"unknown policy {name!r} (choose from: {', '.join(NAMED)})")
    if name == "full":
        return Full()
    if budget is None:
        raise SageKVError(f"--budget is required with --policy {name}")
    return NAMED[name](budget)


__all__ = ["DEFAULT_POLICY", "NAMED", "Full", "Knorm", "Layout", "Policy", "Quest", "Random", "SageKV", "SnapKV", "StreamingLLM", "TOVA", "make_policy"]
