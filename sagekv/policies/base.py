"""What every policy shares: validated fields, the kept-cache layout and score helpers.

Budgets count KV entries per KV head, so policies compare at equal memory: an evicting
policy with budget B keeps ``sink + topk + recent`` = B entries per KV head plus the last
prompt token; the recent window then rolls during decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import SageKVError


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SageKVError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SageKVError(f"{name} must be >= {minimum}, got {value}")


def check_fraction(name: str, value) -> None:
    """A number in (0, 1] (a decay, a probability mass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SageKVError(f"{name} must be a number in (0, 1], got {value!r}")


def group_size(q_heads: int, kv_heads: int) -> int:
    if kv_heads < 1 or q_heads % kv_heads:
        raise SageKVError(f"query heads ({q_heads}) must be a multiple of KV heads ({kv_heads})")
    return q_heads // kv_heads


@dataclass(frozen=True)
class Layout:
    """Sizes of one layer's kept cache for a prompt of ``n`` tokens.

    ``rows`` independent selections (query heads, or KV heads when a selection is shared by
    a group) each keep ``sink + topk + recent + 1`` positions; ``groups_per_kv`` rows share
    one KV head.
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
        """Entries one KV head stores: sink, recent and last shared; top-k once per row."""
        if not self.evicts:
            return self.n
        return self.sink + self.groups_per_kv * self.topk + self.recent + 1

    @property
    def candidates(self) -> slice:
        """Positions that compete for the top-k: after the sink, before the recent window."""
        return slice(self.sink, self.n - 1 - self.recent)


class Policy:
    """An evicting policy: sink + top-k scored candidates per row + recent window + last token.

    Subclasses give ``layout`` and, when they select, ``scores``; ``observed_queries`` is how
    many of the prompt's last queries scoring reads.
    """

    name: ClassVar[str]
    observed_queries: ClassVar[int] = 1
    evicts: ClassVar[bool] = True
    """Whether decoding drops prompt entries (then generation prefills layer-wise, freeing them as it goes)."""
    batches: ClassVar[bool] = True
    """Whether its decode caches stack into a batch (:class:`sagekv.cache.BatchKV`): a fixed set of entries."""

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        raise NotImplementedError

    def scores(self, ops, queries, keys, layout: Layout):
        """[rows, candidates] scores; ``queries`` [Hq, W, D], ``keys`` [Hkv, N, D]."""
        raise NotImplementedError

    def decode_cache(self, ops, queries, keys, values, layer: int):
        """The cache this layer decodes on after prefill, or None to keep the full cache."""
        from ..cache import CompactKV  # the cache module imports this one

        return CompactKV.from_prefill(self, ops, queries, keys, values)

    def shared_layout(self, n: int, q_heads: int, kv_heads: int, sink: int, recent: int, budget: int) -> Layout:
        """A layout whose top-k is shared by each KV head's query heads."""
        group_size(q_heads, kv_heads)
        return Layout(n, q_heads, kv_heads, sink, budget - sink - recent, recent, 1, n > budget + 1)


def key_logits(ops, queries, keys):
    """q.k of every query [Hq, W, D] with its KV head's keys [Hkv, N, D], float32: [Hkv, G * W, N].

    One matrix product per KV head: broadcasting the keys over the group instead makes torch
    copy them G times (most of the selection's time at long prompts).
    """
    hkv, _, d = keys.shape
    return ops.dot_keys(queries.reshape(hkv, -1, d), keys)


def attention_probs(ops, queries, keys):
    """Softmax attention of the observed queries over all keys, float32: [Hkv, G, W, N].

    Query w of W is the prompt's position N-W+w, so it is causally masked beyond that.
    """
    hkv, n, d = keys.shape
    hq, w, _ = queries.shape
    logits = key_logits(ops, queries, keys).reshape(hkv, hq // hkv, w, n) * (d**-0.5)
    if w > 1:
        future = ops.arange(0, n, like=keys)[None, :] > ops.arange(n - w, n, like=keys)[:, None]
        logits = logits - 1e30 * ops.float32(future)
    return ops.softmax(logits)


def pool(ops, scores, kernel: int, mode: str):
    """Max or average over a window of ``kernel`` neighbours along the last axis (same length)."""
    if kernel <= 1:
        return scores
    half = kernel // 2
    shape = (*scores.shape[:-1], half)
    filler = ops.full(shape, float("-inf") if mode == "max" else 0.0, like=scores)
    padded = ops.concat([filler, scores, filler], axis=-1)
    length = scores.shape[-1]
    out = padded[..., :length]
    for shift in range(1, 2 * half + 1):
        window = padded[..., shift : shift + length]
        out = ops.xp.maximum(out, window) if mode == "max" else out + window
    return out if mode == "max" else out / (2 * half + 1)


def carry_forward(ops, scores, steps: int, decay: float):
    """Each position's score becomes the highest of its own and those of the ``steps`` positions
    before it, discounted by ``decay`` per position of distance. Scores must be >= 0.

    In doubling strides: once each position holds the best of ``width`` distances, one shifted
    maximum by ``shift <= width`` makes it ``width + shift`` (max lets the ranges overlap), so 31
    steps take 5 passes over the row, not 31."""
    out, width, length = scores, 1, scores.shape[-1]
    while width <= steps and width < length:  # past the row's length there is nothing before
        shift = min(width, steps + 1 - width)
        before = ops.concat([ops.full((*scores.shape[:-1], shift), 0.0, like=scores), out[..., : length - shift]], axis=-1)
        out = ops.xp.maximum(out, before * decay**shift)
        width += shift
    return out
