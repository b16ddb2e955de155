"""Quest (Tang et al., "Query-Aware Sparsity for Efficient Long-Context LLM Inference", arXiv 2406.10774)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SageKVError
from .base import Layout, Policy, check_int


@dataclass(frozen=True)
class Quest(Policy):
    """Nothing is evicted; each decode step, per query head, attends to the ``budget // page``
    pages with the highest upper bound of q.k (from per-page, per-channel key min/max) plus
    the current page. The first ``dense_layers`` layers attend to everything.

    It saves attention reads, not memory: the full cache and the page metadata stay, and
    ``kept_kv_bytes`` reports both. Defaults: the Quest repository's.
    """

    budget: int
    page: int = 16
    dense_layers: int = 2
    name = "quest"

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        check_int("page", self.page, 1)
        check_int("dense_layers", self.dense_layers, 0)
        if self.budget < self.page:
            raise SageKVError(f"budget ({self.budget}) must be at least one page ({self.page})")

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, 0, 0, n)

    def decode_cache(self, ops, queries, keys, values, layer: int):
        if layer < self.dense_layers:
            return None
        return QuestKV(ops, self, keys, values)


class QuestKV:
    """The full cache in pages of ``page`` tokens with each page's per-channel key min and max."""

    growth = 256  # tokens added per reallocation

    def __init__(self, ops, policy: Quest, keys, values):
        self.ops, self.page, self.pages_per_step = ops, policy.page, policy.budget // policy.page
        self.length = keys.shape[2]
        self.keys, self.values = self._grown(keys, self.growth), self._grown(values, self.growth)
        pages = -(-self.length // self.page)
        bounds_min, bounds_max = [], []
        for p in range(pages):
            chunk = keys[:, :, p * self.page : (p + 1) * self.page]
            bounds_min.append(ops.reduce_min(chunk, axis=2)[:, :, None])
            bounds_max.append(ops.reduce_max(chunk, axis=2)[:, :, None])
        self.page_growth = -(-self.growth // self.page)
        self.page_min = self._grown(ops.concat(bounds_min, axis=2), self.page_growth)
        self.page_max = self._grown(ops.concat(bounds_max, axis=2), self.page_growth)

    def _grown(self, x, extra: int):
        """``x`` [1, Hkv, T, D] with ``extra`` zero rows of room appended along T."""
        spare = self.ops.full((*x.shape[:2], extra, x.shape[3]), 0.0, like=x)
        return self.ops.concat([x, spare], axis=2)

    def append(self, key, value):
        if key.shape[2] != 1:
            raise SageKVError("after prefill the Quest cache takes one token per step")
        t, ops = self.length, self.ops
        if t == self.keys.shape[2]:
            self.keys, self.values = self._grown(self.keys, self.growth), self._grown(self.values, self.growth)
        self.keys[:, :, t : t + 1] = key
        self.values[:, :, t : t + 1] = value
        p = t // self.page
        if p == self.page_min.shape[2]:
            self.page_min = self._grown(self.page_min, self.page_growth)
            self.page_max = self._grown(self.page_max, self.page_growth)
        if t % self.page == 0:
            self.page_min[:, :, p : p + 1], self.page_max[:, :, p : p + 1] = key, key
        else:
            self.page_min[:, :, p : p + 1] = ops.xp.minimum(self.page_min[:, :, p : p + 1], key)
            self.page_max[:, :, p : p + 1] = ops.xp.maximum(self.page_max[:, :, p : p + 1], key)
        self.length = t + 1

    def attend(self, queries, scale):
        ops, t = self.ops, self.length
        _, hq, _, d = queries.shape
        hkv = self.keys.shape[1]
        pages = -(-t // self.page)
        if pages - 1 <= self.pages_per_step:  # every page fits the budget
            return ops.attention(queries, self.keys[:, :, :t], self.values[:, :, :t], scale)
        q = ops.float32(queries.reshape(hkv, hq // hkv, 1, d))
        low, high = ops.float32(self.page_min[0, :, None, : pages - 1]), ops.float32(self.page_max[0, :, None, : pages - 1])
        bound = ops.xp.maximum(q * low, q * high).sum(axis=-1)  # [Hkv, G, pages-1]
        chosen = ops.topk_indices(bound, self.pages_per_step)
        current = ops.full((*chosen.shape[:2], 1), pages - 1, like=chosen)
        chosen = ops.concat([chosen, current], axis=-1)  # [Hkv, G, P]
        offsets = ops.arange(0, self.page, like=chosen)
        positions = (chosen[..., None] * self.page + offsets).reshape(hkv, hq // hkv, -1)
        beyond = ops.float32(positions >= t)[:, :, None]  # only the current page runs past the end
        positions = ops.xp.minimum(positions, ops.full(positions.shape, t - 1, like=positions))
        head = ops.arange(0, hkv, like=positions).reshape(hkv, 1, 1)
        k, v = self.keys[0][head, positions], self.values[0][head, positions]  # [Hkv, G, L, D]
        logits = ops.float32(ops.astype_like(q, k) @ k.swapaxes(-1, -2)) * scale - 1e30 * beyond
        probs = ops.astype_like(ops.softmax(logits), v)
        return ops.astype_like((probs @ v).reshape(1, hq, 1, d), queries)

    def kept(self):
        return None

    @property
    def arrays(self) -> list:
        return [self.keys, self.values, self.page_min, self.page_max]

    @property
    def nbytes(self) -> int:
        return sum(self.ops.nbytes(a) for a in self.arrays)
