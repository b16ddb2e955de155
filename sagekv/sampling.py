"""How decoding chooses each token: greedy (the default), or drawn at a temperature after top-k and top-p
(nucleus) filtering, as transformers and mlx-lm apply them. The filtering is written once here through
a backend's :class:`sagekv.ops.Ops`; the backends draw on the device (``Runner.next_token``)."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass, replace
from typing import Optional

from .errors import SageKVError

SEEDS = 2**63  # torch's and MLX's generators both take a 64-bit seed; Python ints may not fit


@dataclass(frozen=True)
class Sampler:
    """``temperature`` 0 is greedy: the highest logit, whatever the other settings. Otherwise the logits
    are divided by ``temperature``; ``top_k`` (0: off) keeps the k highest (and ties with the k-th);
    ``top_p`` (1: off) keeps the fewest most probable tokens whose probabilities add up to at least
    top_p; the token is drawn from what is left, renormalised. ``seed``: the same seed gives the same
    text on one backend; None draws a fresh seed for each generation."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None

    def __post_init__(self):
        if not is_number(self.temperature) or not (0 <= self.temperature < math.inf):
            raise SageKVError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise SageKVError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_integer(self.top_k) or self.top_k < 0:
            raise SageKVError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not is_integer(self.seed) or not 0 <= self.seed < SEEDS):
            raise SageKVError(f"seed must be an integer in 0..2**63-1 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def seeded(self) -> "Sampler":
        """This sampler with a seed: its own, else a fresh random one."""
        return self if self.seed is not None else replace(self, seed=secrets.randbelow(SEEDS))

    def record(self) -> dict:
        """The settings as a JSON object; empty for greedy decoding, which uses none of them."""
        return {} if self.greedy else asdict(self)

    def describe(self) -> str:
        """The settings in a few words, leaving out filters that are off."""
        if self.greedy:
            return "greedy"
        words = [f"temperature {self.temperature:g}"]
        words += [f"top-p {self.top_p:g}"] if self.top_p < 1 else []
        words += [f"top-k {self.top_k}"] if self.top_k else []
        return ", ".join(words + ([] if self.seed is None else [f"seed {self.seed}"]))


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sampler(sampler) -> "Sampler":
    """``sampler``, or greedy decoding for None."""
    if sampler is None:
        return Sampler()
    if not isinstance(sampler, Sampler):
        raise SageKVError(f"sampler must be a sagekv.Sampler, got {sampler!r}")
    return sampler


def filtered_logits(ops, logits, sampler: Sampler):
    """One vector of logits as float32, divided by the temperature, -inf where top-k or top-p leave a
    token out (as transformers' warpers); in the library of ``ops``."""
    xp = ops.xp
    logits = ops.float32(logits) / sampler.temperature
    if 0 < sampler.top_k < logits.shape[-1]:
        kth = ops.reduce_min(logits[ops.topk_indices(logits, sampler.top_k)], axis=-1)
        logits = xp.where(logits < kth, -math.inf, logits)  # ties with the k-th stay
    if sampler.top_p < 1:
        order = xp.argsort(-logits)
        probs = ops.softmax(logits[order])
        # a token goes once those above it reach top_p, so the first always stays
        dropped = xp.cumsum(probs, axis=-1) - probs >= sampler.top_p
        logits = xp.where(dropped[xp.argsort(order)], -math.inf, logits)
    return logits
