"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SageKVError
from .base import Layout, Policy, check_int


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """``sink`` first tokens + the most recent ones; absolute positions are kept (StreamLLM_Abs)."""

    budget: int
    sink: int = 4
    name = "streaming"

    def __post_init__(self):
        check_int("budget", self.budget, 1)
        check_int("sink", self.sink, 0)
        if self.sink > self.budget:
            raise SageKVError(f"sink ({self.sink}) must not exceed the budget ({self.budget})")

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, self.sink, self.budget - self.sink, self.budget)


@dataclass(frozen=True)
class Full(Policy):
    """Full attention: nothing is evicted (the reference every policy is measured against)."""

    name = "full"
    evicts = False

    def layout(self, n: int, q_heads: int, kv_heads: int) -> Layout:
        return self.shared_layout(n, q_heads, kv_heads, 0, 0, n)
