"""Cheap reference points: TOVA, key norm, random. Each keeps ``budget`` tokens per KV head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Layout, Policy, attention_probs, check_int


@dataclass(frozen=True)
class TopScores(Policy):
    """Keeps the ``budget`` best-scored tokens per KV head (and the last one), no sink or window."""

    budget: int

    def __post_init__(self):
        check_int("budget", self.budget, 1)

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, 0, 0, self.budget)


@dataclass(frozen=True)
class TOVA(TopScores):
    """TOVA (Oren et al., arXiv 2401.06104), one-shot: last token's attention averaged over all heads."""

    name = "tova"

    def scores(self, ops, queries, keys, layout: Layout):
        probs = attention_probs(ops, queries[:, -1:], keys)  # [Hkv, G, 1, N]
        mean = probs.sum(axis=2).sum(axis=1).sum(axis=0) / layout.q_heads
        return ops.broadcast_rows(mean[layout.candidates], layout.kv_heads)


@dataclass(frozen=True)
class Knorm(TopScores):
    """Keep the keys with the smallest L2 norm (Devoto et al., arXiv 2406.11430).

    Norms are rounded to 3 decimals: a token repeated at several positions has one norm (RoPE
    is a rotation), and rounding makes those equal in every backend, so the earliest is kept.
    """

    name = "knorm"

    def scores(self, ops, queries, keys, layout: Layout):
        k = ops.float32(keys[:, layout.candidates])
        return -ops.round(ops.xp.sqrt((k * k).sum(axis=-1)), 3)


@dataclass(frozen=True)
class Random(TopScores):
    """Keep ``budget`` random tokens per KV head (the same draw in every layer for one seed)."""

    seed: int = 0
    name = "random"

    def __post_init__(self):
        super().__post_init__()
        check_int("seed", self.seed, 0)

    def scores(self, ops, queries, keys, layout: Layout):
        count = layout.candidates.stop - layout.candidates.start
        draw = np.random.default_rng(self.seed).random((layout.kv_heads, count), dtype=np.float32)
        return ops.asarray(draw, like=keys)
