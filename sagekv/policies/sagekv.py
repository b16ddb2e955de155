"""SAGE-KV (Wang et al., "LLMs Know What to Drop", arXiv 2503.08879)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import SageKVError
from .base import Layout, Policy, attention_probs, carry_forward, check_fraction, check_int, group_size, key_logits, pool


@dataclass(frozen=True)
class SageKV(Policy):
    """One top-k selection after prefill, guided by the last prompt token's query.

    The last token's post-RoPE query scores each layer's candidate keys; the cache keeps
    sink + selected + recent window + last token and decodes on that fixed size.

    Defaults follow the paper's appendix A.2 for budget ``B`` and group size ``G``:
    ``sink = B // 4``, ``topk = B // (2G)`` per query head, ``recent = B - sink - G * topk``.

    ``group="query_head"`` (the paper): each query head keeps its own top-k by ``q.k/sqrt(d)``.
    ``group="kv_head"``: each KV head keeps ``G * topk`` candidates ranked by the sum over its
    query heads of the last token's softmax attention (over all keys), shared by the group.
    ``pool=K`` (not in the paper): rank by the softmax attention max-pooled over K neighbouring
    positions, so tokens around a selected one are kept with it.
    ``follow=K, decay=d`` (not in the paper): rank each position by the highest softmax attention
    among itself and the K - 1 positions before it, discounted by ``d`` per position of distance,
    so the tokens that follow a selected one are kept with it, nearest first: the continuation of
    an answer the model copies from the prompt, which one selection by the last prompt token
    otherwise drops. With ``d < 1`` several attended places share the budget instead of the
    strongest one taking K places.
    """

    budget: int
    sink: Optional[int] = None
    topk: Optional[int] = None
    recent: Optional[int] = None
    group: str = "query_head"
    pool: int = 1
    follow: int = 1
    decay: float = 1.0
    name = "sagekv"

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        for field in ("sink", "topk", "recent"):
            if getattr(self, field) is not None:
                check_int(field, getattr(self, field), 0)
        if self.group not in ("query_head", "kv_head"):
            raise SageKVError(f"group must be 'query_head' or 'kv_head', got {self.group!r}")
        check_int("pool", self.pool, 1)
        if self.pool % 2 == 0:
            raise SageKVError(f"pool must be odd (a window centred on each position), got {self.pool}")
        check_int("follow", self.follow, 1)
        check_fraction("decay", self.decay)

    def split(self, group_size: int) -> tuple[int, int, int]:
        """(sink, top-k per query head, recent) for a model with this GQA group size."""
        sink = self.budget // 4 if self.sink is None else self.sink
        topk = self.budget // (2 * group_size) if self.topk is None else self.topk
        recent = self.budget - sink - group_size * topk if self.recent is None else self.recent
        if recent < 0:
            raise SageKVError(f"budget {self.budget} is smaller than sink {sink} + {group_size} x topk {topk}")
        return sink, topk, recent

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        g = group_size(q_heads, kv_heads)
        sink, topk, recent = self.split(g)
        evicts = n > sink + g * topk + recent + 1
        if self.group == "query_head":
            return Layout(n, q_heads, kv_heads, sink, topk, recent, g, evicts)
        return Layout(n, q_heads, kv_heads, sink, g * topk, recent, 1, evicts)

    def scores(self, ops, queries, keys, layout: Layout):
        hkv, n, d = keys.shape
        last = queries[:, -1:]
        if self.group == "query_head" and self.pool == self.follow == 1:
            scores = key_logits(ops, last, keys).reshape(layout.q_heads, n) * (d**-0.5)
        else:
            probs = attention_probs(ops, last, keys).reshape(hkv, -1, n)  # [Hkv, G, N]
            scores = probs.reshape(layout.q_heads, n) if self.group == "query_head" else probs.sum(axis=1)
            scores = carry_forward(ops, pool(ops, scores, self.pool, "max"), self.follow - 1, self.decay)
        return scores[:, layout.candidates]
