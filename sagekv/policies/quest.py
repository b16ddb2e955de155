"""Quest (Tang et al., "Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv 2406.10774)."""

from __future__ import annotations

from dataclasses import dataclass

from ..cache import QuestKV
from ..errors import SageKVError
from .base import Layout, Policy, check_int


@dataclass(frozen=True)
class Quest(Policy):
    """Nothing is evicted; each decode step, per query head, attends to ``budget // page`` pages:
    the current one and those with the highest upper bound of q.k (from per-page, per-channel key
    min/max), or to everything while it fits the budget. The first ``dense_layers`` layers attend
    to everything.

    It saves attention reads, not memory: the full cache and the page metadata stay, and
    ``kept_kv_bytes`` reports both. Defaults: the Quest repository's.
    """

    budget: int
    page: int = 16
    dense_layers: int = 2
    name = "quest"
    # every entry stays: a layer-wise prefill would save no memory, and run each layer over the whole prompt's activations
    evicts = False
    batches = False  # its pages are chosen per step and its cache grows (sagekv.cache.QuestKV)

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        check_int("page", self.page, 1)
        check_int("dense_layers", self.dense_layers, 0)
        if self.budget < 2 * self.page:  # the current page and one chosen
            raise SageKVError(f"budget ({self.budget}) must be at least two pages ({2 * self.page})")

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, 0, 0, n)

    def decode_cache(self, ops, queries, keys, values, layer: int):
        if layer < self.dense_layers:
            return None
        return QuestKV(ops, self, keys, values)

