"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SageKVError
from .base import Layout, Policy, attention_probs, check_int, pool


@dataclass(frozen=True)
class SnapKV(Policy):
    """Attention of the last ``window`` prompt queries, summed and pooled, picks tokens per KV head.

    The observation window itself is kept (its last token counts as the last prompt token),
    so ``budget - window + 1`` tokens are selected. Defaults: SnapKV's LongBench settings.
    """

    budget: int
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    name = "snapkv"

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        check_int("window", self.window, 1)
        check_int("kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise SageKVError(f"kernel must be odd, got {self.kernel}")
        if self.pooling not in ("max", "avg"):
            raise SageKVError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.budget < self.window:
            raise SageKVError(f"budget ({self.budget}) must be at least the window ({self.window})")

    @property
    def observed_queries(self) -> int:
        return self.window

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, 0, self.window - 1, self.budget)

    def scores(self, ops, queries, keys, layout: Layout):
        probs = attention_probs(ops, queries[:, -self.window :], keys)  # [Hkv, G, W, N]
        votes = probs.sum(axis=2).sum(axis=1)  # [Hkv, N]
        return pool(ops, votes[:, layout.candidates], self.kernel, self.pooling)
