"""Cache policies: one small validated dataclass per method.

Budgets count tokens per KV head, so policies compare at equal memory. Every evicting
policy keeps ``sink`` leading tokens, ``topk`` scored candidates per row and a ``recent``
window, plus the last prompt token; the recent window then rolls during decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import SageKVError


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SageKVError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SageKVError(f"{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class Layout:
    """Sizes of one layer's kept cache for a prompt of ``n`` tokens.

    ``rows`` is the number of independent selections (query heads, or KV heads when the
    selection is shared by a group); each row keeps ``sink + topk + recent + 1`` positions.
    ``groups_per_kv`` rows share one KV head (1 for shared selections).
    """

    n: int
    q_heads: int
    kv_heads: int
    sink: int
    topk: int
    recent: int
    groups_per_kv: int
    evicts: bool

    @property
    def rows(self) -> int:
        return self.kv_heads * self.groups_per_kv

    @property
    def kept_per_row(self) -> int:
        return self.sink + self.topk + self.recent + 1 if self.evicts else self.n

    @property
    def kept_per_kv_head(self) -> int:
        """Entries one KV head really stores: sink + recent + last shared, top-k per row."""
        if not self.evicts:
            return self.n
        return self.sink + self.groups_per_kv * self.topk + self.recent + 1


def _group_size(q_heads: int, kv_heads: int) -> int:
    if kv_heads < 1 or q_heads % kv_heads:
        raise SageKVError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    return q_heads // kv_heads


@dataclass(frozen=True)
class Full:
    """Full attention: nothing is evicted (the reference every policy is measured against)."""

    name = "full"

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        _group_size(q_heads, kv_heads)
        return Layout(n, q_heads, kv_heads, 0, 0, 0, 1, evicts=False)


@dataclass(frozen=True)
class StreamingLLM:
    """StreamingLLM (Xiao et al., arXiv 2309.17453): ``sink`` first tokens + the most recent.

    Absolute positions are kept (the paper's StreamLLM_Abs variant of SAGE-KV's baselines).
    """

    budget: int
    sink: int = 4
    name = "streaming"

    def __post_init__(self):
        _check_int("budget", self.budget, 1)
        _check_int("sink", self.sink, 0)
        if self.sink > self.budget:
            raise SageKVError(f"sink ({self.sink}) must not exceed the budget ({self.budget})")

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        _group_size(q_heads, kv_heads)
        recent = self.budget - self.sink
        return Layout(n, q_heads, kv_heads, self.sink, 0, recent, 1, evicts=n > self.budget + 1)


@dataclass(frozen=True)
class SageKV:
    """SAGE-KV (Wang et al., arXiv 2503.08879): one top-k selection after prefill.

    The last prompt token's post-RoPE query scores the candidate keys of each layer; the
    cache keeps sink + selected + recent window + last token and decodes on that fixed size.

    Defaults follow the paper's appendix A.2 for budget ``B`` and group size ``G``:
    ``sink = B // 4``, ``topk = B // (2G)`` per query head, ``recent = B - sink - G * topk``.

    ``group="query_head"`` (the paper): each query head keeps its own top-k by ``q.k/sqrt(d)``.
    ``group="kv_head"``: each KV head keeps ``G * topk`` candidates ranked by the sum over its
    query heads of the last token's softmax attention (over all keys), shared by the group.
    """

    budget: int
    sink: Optional[int] = None
    topk: Optional[int] = None
    recent: Optional[int] = None
    group: str = "query_head"
    name = "sagekv"

    def __post_init__(self):
        _check_int("budget", self.budget, 1)
        for field in ("sink", "topk", "recent"):
            if getattr(self, field) is not None:
                _check_int(field, getattr(self, field), 0)
        if self.group not in ("query_head", "kv_head"):
            raise SageKVError(f"group must be 'query_head' or 'kv_head', got {self.group!r}")

    def split(self, group_size: int) -> tuple[int, int, int]:
        """(sink, top-k per query head, recent) for a model with this GQA group size."""
        sink = self.budget // 4 if self.sink is None else self.sink
        topk = self.budget // (2 * group_size) if self.topk is None else self.topk
        recent = self.budget - sink - group_size * topk if self.recent is None else self.recent
        if recent < 0:
            raise SageKVError(
                f"budget {self.budget} is smaller than sink {sink} + {group_size} x topk {topk}"
            )
        return sink, topk, recent

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        g = _group_size(q_heads, kv_heads)
        sink, topk, recent = self.split(g)
        evicts = n > sink + g * topk + recent + 1
        if self.group == "query_head":
            return Layout(n, q_heads, kv_heads, sink, topk, recent, g, evicts)
        return Layout(n, q_heads, kv_heads, sink, g * topk, recent, 1, evicts)

    def scores(self, ops, query, keys, layout: Layout):
        """Candidate scores, shape [rows, candidates], for positions sink .. n-2-recent."""
        hkv, n, d = keys.shape
        g = layout.q_heads // hkv
        q = ops.float32(query).reshape(hkv, g, 1, d)
        k = ops.float32(keys)[:, None]  # [Hkv, 1, N, D]
        logits = (q @ k.swapaxes(-1, -2)).reshape(hkv, g, n) * (d**-0.5)
        first, stop = layout.sink, n - 1 - layout.recent
        if self.group == "query_head":
            return logits[:, :, first:stop].reshape(hkv * g, stop - first)
        return ops.softmax(logits).sum(axis=1)[:, first:stop]


POLICIES = {"full": Full, "sagekv": SageKV, "streaming": StreamingLLM}
