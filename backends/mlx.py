"""MLX backend: unmodified mlx-lm models decoding on a SAGE-KV prompt cache.

mlx-lm models call ``cache.update_and_fetch`` and then ``scaled_dot_product_attention``
from their own module with ``cache=cache``. :class:`SageKVCache` is passed as the prompt
cache; a wrapper around that attention function records the last queries during prefill and
sends decode steps to the policy's decode cache. ``offset`` stays the true position after eviction
while the physical rows shrink.
"""

from __future__ import annotations

import copy
import sys

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from ..errors import SageKVError
from ..ops import Ops
from ..selection import last_queries


class MlxOps(Ops):
    """MLX: float32 throughout, its precise softmax and fused attention."""

    xp = mx
    index_dtype = mx.int32

    @classmethod
    def float32(cls, x):
        return x.astype(mx.float32)  # MLX computes float64 on the CPU only

    @classmethod
    def softmax(cls, x):
        return mx.softmax(x, axis=-1, precise=True)

    @classmethod
    def attention(cls, q, k, v, scale):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


class SageKVCache(KVCache):
    """A KVCache during prefill; after :meth:`compress`, the policy's decode cache."""

    def __init__(self, observed_queries: int = 1):
        super().__init__()
        self.window = max(observed_queries, 1)
        self.queries = None  # the last prompt queries, [Hq, W, D]
        self.decoder = None

    def update_and_fetch(self, keys, values):
        if self.decoder is None:
            return super().update_and_fetch(keys, values)
        self.decoder.append(keys, values)
        self.offset += 1
        return keys, values  # the attention wrapper reads the decoder instead

    def observe(self, queries):
        self.queries = last_queries(MlxOps, self.queries, queries, self.window)

    def compress(self, policy, layer: int):
        keys, values = self.keys_and_values()
        self.decoder = policy.decode_cache(MlxOps, self.queries, keys, values, layer)
        if self.decoder is not None:
            self.keys = self.values = None  # release the full cache
        self.queries = None

    def is_trimmable(self):
        return self.decoder is None

    @property
    def nbytes(self):
        if self.decoder is not None:
            return self.decoder.nbytes
        keys, values = self.keys_and_values()
        return keys.nbytes + values.nbytes

    def kept(self):
        return self.decoder.kept() if self.decoder is not None else None

    def clone(self):
        """A copy that shares no buffer it could write into (a prefilled cache only)."""
        twin = copy.copy(self)
        twin.keys, twin.values = self.keys_and_values()  # slices are new arrays
        return twin


def _wrap_attention(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, **kwargs):
        if isinstance(cache, SageKVCache):
            if cache.decoder is not None:
                return cache.decoder.attend(queries, scale)
            cache.observe(queries)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)

    scaled_dot_product_attention.sagekv_original = original
    return scaled_dot_product_attention


def install_attention(model) -> None:
    """Route the model module's attention through the SAGE-KV wrapper (idempotent)."""
    module = sys.modules[type(model).__module__]
    current = module.scaled_dot_product_attention
    if not hasattr(current, "sagekv_original"):
        module.scaled_dot_product_attention = _wrap_attention(current)


def _rope_overrides(config: dict) -> dict:
    """transformers 5 nests rope_theta under rope_parameters; older mlx-lm models only read rope_theta."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or config.get("rope_theta") is not None:
        return {}
    overrides = {"rope_theta": rope.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = rope
    return overrides


class Runner:
    """The generation loop's runner (:class:`sagekv.backend.Runner`) for mlx-lm models."""

    name = "mlx"

    def __init__(self, path: str, config: dict, device=None, dtype=None):
        from mlx_lm import load

        if device is not None:
            if device not in ("cpu", "gpu"):
                raise SageKVError(f"MLX devices are 'cpu' and 'gpu', got {device!r}")
            mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
        self.model, wrapper = load(path, model_config=_rope_overrides(config))
        self.tokenizer = wrapper._tokenizer  # the Hugging Face tokenizer mlx-lm wraps
        if dtype is not None:
            self.model.set_dtype(getattr(mx, dtype))
        install_attention(self.model)
        self.num_layers = len(self.model.layers)
        self.model_type = config.get("model_type", self.model.model_type)
        self.eos_ids = set(wrapper.eos_token_ids or [])

    def new_cache(self, observed_queries: int = 1):
        return [SageKVCache(observed_queries) for _ in self.model.layers]

    def prefill(self, ids, cache):
        self.model(mx.array(ids)[None], cache=cache)
        mx.eval([c.state for c in cache])

    def forward(self, ids, cache):
        logits = self.model(mx.array(ids)[None], cache=cache)[0, -1]
        # a decoder's kept positions feed no logit: evaluate its state so no graph grows per step
        mx.eval(logits, [c.queries if c.decoder is None else c.decoder.state for c in cache])
        return logits

    def argmax(self, logits) -> int:
        return int(mx.argmax(logits).item())

    def logits_numpy(self, logits):
        return np.array(logits.astype(mx.float32))

    def compress(self, cache, policy):
        if any(c.queries is None for c in cache):
            raise RuntimeError("attention was not routed through sagekv; is this model family supported?")
        for layer, c in enumerate(cache):
            c.compress(policy, layer)
        mx.eval([c.decoder.state for c in cache if c.decoder is not None])

    def clone_cache(self, cache):
        return [c.clone() for c in cache]

    def kv_bytes(self, cache) -> int:
        return sum(c.nbytes for c in cache)

    def kept(self, cache):
        return [c.kept() for c in cache]

    def sync(self):
        mx.synchronize()
