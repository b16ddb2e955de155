"""MLX backend: unmodified mlx-lm models decoding on a SAGE-KV prompt cache.

mlx-lm models call ``cache.update_and_fetch`` and then ``scaled_dot_product_attention``
from their own module with ``cache=cache``. :class:`SageKVCache` is passed as the prompt
cache; a wrapper around that attention function records the last queries during prefill and
sends decode steps to the policy's decode cache. ``offset`` stays the true position after eviction
while the physical rows shrink.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from ..cache import full_layer, kept_of
from ..dropin import OnePrompt
from ..errors import SageKVError
from ..generate import check_attention, check_model_type, legacy_rope_fields
from ..layerwise import host_available_bytes
from ..ops import Ops
from ..sampling import filtered_logits
from ..selection import last_queries


class MlxOps(Ops):
    """MLX: float32 throughout, its precise softmax and fused attention."""

    xp = mx
    index_dtype = mx.int32
    host_slots = True  # a slice write costs less than a scatter from a computed index, and MLX replays no graph

    @classmethod
    def float32(cls, x):
        return x.astype(mx.float32)  # MLX computes float64 on the CPU only

    @classmethod
    def softmax(cls, x):
        return mx.softmax(x, axis=-1, precise=True)

    @classmethod
    def attention(cls, q, k, v, scale, mask=None):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


class Draw:
    """One generation's draws: a key from the sampler's seed, split for each token."""

    def __init__(self, sampler):
        self.sampler, self.key = sampler, mx.random.key(sampler.seed)

    def __call__(self, logits):
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(filtered_logits(MlxOps, logits, self.sampler), key=key)


STORED_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int64: "I64", mx.int32: "I32"}  # safetensors' names


class SageKVCache(KVCache):
    """A KVCache during prefill; after :meth:`compress`, the policy's decode cache."""

    def __init__(self, observed_queries: int = 1):
        super().__init__()
        self.window = max(observed_queries, 1)
        self.queries = None  # the last prompt queries, [Hq, W, D]
        self.observing = True  # until selection: afterwards a step does what mlx-lm's own does
        self.decoder = None

    def update_and_fetch(self, keys, values):
        if self.decoder is None:
            return super().update_and_fetch(keys, values)
        self.decoder.append(keys, values)
        self.offset = offset_of(self.decoder)
        return keys, values  # the attention wrapper reads the decoder instead

    def observe(self, queries):
        self.queries = last_queries(MlxOps, self.queries, queries, self.window)

    def compress(self, policy, layer: int):
        if self.decoder is not None:  # assembled from stored documents (sagekv.rag): decode on it or compact it
            self.decoder = self.decoder.decode_cache(policy, layer)
            return
        keys, values = self.keys_and_values()
        self.decoder = policy.decode_cache(MlxOps, self.queries, keys, values, layer)
        if self.decoder is not None:
            self.keys = self.values = None  # release the full cache
        self.queries, self.observing = None, False

    def is_trimmable(self):
        return self.decoder is None

    @property
    def nbytes(self):
        if self.decoder is not None:
            return self.decoder.nbytes
        keys, values = self.keys_and_values()
        return keys.nbytes + values.nbytes

    def clone(self):
        """A copy that shares no buffer it could write into."""
        twin = copy.copy(self)
        if self.decoder is not None:
            twin.decoder = self.decoder.copy()
        else:
            twin.keys, twin.values = self.keys_and_values()  # slices are new arrays
        return twin


class PromptKVCache(OnePrompt, SageKVCache):
    """A SageKVCache for mlx-lm's own ``generate_step`` (:func:`prompt_cache_for`). It runs the prompt but its
    last token in chunks, evaluating the cache's ``state`` after each, then the last token alone, then one
    token per step: a one-token step right after another, with no ``state`` read between, is the first
    decode step (a chunk can be one token long)."""

    maker = "sagekv.prompt_cache_for"

    def __init__(self, policy, index: int):
        super().__init__(policy.observed_queries)
        self.serve(policy, index)
        self.after_single = False  # the last step was one token and no chunk ended after it

    @property
    def state(self):
        self.after_single = False  # a prefill chunk ended: that one token was part of the prompt
        return super().state

    @state.setter
    def state(self, value):
        KVCache.state.fset(self, value)

    def update_and_fetch(self, keys, values):
        batch, _, steps, _ = keys.shape
        self.before_step(batch, steps, decoding=self.after_single)
        self.after_single = steps == 1
        return super().update_and_fetch(keys, values)

    def is_trimmable(self):
        return False  # evicted entries cannot come back: mlx-lm refuses speculative decoding on it

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise SageKVError("a sagekv cache cannot be quantized (kv_bits)")


def offset_of(decoder):
    """The cache ``offset`` that mlx-lm's RoPE reads as the next token's position: a number, or for a batch
    one per row (mx.fast.rope takes an array of one offset per batch row)."""
    lengths = decoder.lengths
    return lengths[0] if len(lengths) == 1 else mx.array(lengths)


def _wrap_attention(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, **kwargs):
        if isinstance(cache, SageKVCache):
            if cache.decoder is not None:
                return cache.decoder.attend(queries, scale)
            if cache.observing:
                cache.observe(queries)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)

    scaled_dot_product_attention.sagekv_original = original
    return scaled_dot_product_attention


class TokenPositions:
    """A cache ``offset`` that gives every token of a layer-by-layer pass its own position."""

    def __init__(self, positions):
        self.array = positions


class TokenRoPE(nn.Module):
    """The model's RoPE, also applying one position per token when the offset is TokenPositions."""

    def __init__(self, rope):
        super().__init__()
        self.rope = rope

    def __call__(self, x, offset=0):
        if not isinstance(offset, TokenPositions):
            return self.rope(x, offset=offset)
        # one token per batch row: mx.fast.rope takes one offset per row
        return self.rope(x.transpose(2, 1, 0, 3), offset=offset.array).transpose(2, 1, 0, 3)


def install_attention(model) -> None:
    """Route the model module's attention through the SAGE-KV wrapper and let its RoPE take
    positions per token (idempotent)."""
    module = sys.modules[type(model).__module__]
    current = module.scaled_dot_product_attention
    if not hasattr(current, "sagekv_original"):
        module.scaled_dot_product_attention = _wrap_attention(current)
    for layer in model.layers:
        if not isinstance(layer.self_attn.rope, TokenRoPE):
            layer.self_attn.rope = TokenRoPE(layer.self_attn.rope)


def prompt_cache_for(model, policy) -> list:
    """See :func:`sagekv.prompt_cache_for`."""
    if not isinstance(model, nn.Module) or not hasattr(model, "args"):
        raise SageKVError(f"prompt_cache_for takes an mlx-lm model, got {type(model).__name__} (transformers: sagekv.cache_for)")
    check_model_type(model.model_type)
    check_attention(vars(model.args))
    install_attention(model)
    return [PromptKVCache(policy, index) for index in range(len(model.layers))]


class Runner:
    """The generation loop's runner (:class:`sagekv.backend.Runner`) for mlx-lm models."""

    name = "mlx"

    def __init__(self, path: str, config: dict, device=None, dtype=None, random_weights: bool = False):
        from mlx_lm import load

        if random_weights:
            raise SageKVError("random_weights is implemented for the torch backend only")
        if device is not None:
            if device not in ("cpu", "gpu"):
                raise SageKVError(f"MLX devices are 'cpu' and 'gpu', got {device!r}")
            mx.set_default_device(mx.cpu if device == "cpu" else mx.gpu)
        self.model, wrapper, self.config = load(path, model_config=legacy_rope_fields(config), return_config=True)
        self.tokenizer = wrapper._tokenizer  # the Hugging Face tokenizer mlx-lm wraps
        if dtype is not None:
            self.model.set_dtype(getattr(mx, dtype))
        install_attention(self.model)
        self.num_layers = len(self.model.layers)
        self.model_type = config.get("model_type", self.model.model_type)
        self.dtype = str(self.model.model.norm.weight.dtype).removeprefix("mlx.core.")  # norms are never quantized
        self.eos_ids = set(wrapper.eos_token_ids or [])
        args = self.model.args
        self.max_positions = config.get("max_position_embeddings", getattr(args, "max_position_embeddings", None))
        self.kv_heads = args.num_key_value_heads
        self.head_dim = self.model.layers[0].self_attn.k_proj.weight.shape[0] // self.kv_heads

    def new_cache(self, observed_queries: int = 1):
        return [SageKVCache(observed_queries) for _ in self.model.layers]

    def prefill(self, ids, cache):
        self.model(mx.array(ids)[None], cache=cache)
        mx.eval([c.state for c in cache])

    def forward(self, ids, cache):
        tokens = ids.reshape(-1, 1) if isinstance(ids, mx.array) else mx.array(ids)[None]  # a token per row, or a list
        logits = self.model(tokens, cache=cache)[:, -1]
        logits = logits[0] if len(logits) == 1 else logits
        # a decoder's kept positions feed no logit: evaluate its state so no graph grows per step
        mx.async_eval(logits, [c.queries if c.decoder is None else c.decoder.state for c in cache])
        return logits

    def new_draw(self, sampler):
        return Draw(sampler)

    def next_token(self, logits, draw=None):
        return self.next_tokens(logits, None if draw is None else [draw])

    def next_tokens(self, logits, draws=None):
        logits = logits.reshape(-1, logits.shape[-1])
        tokens = mx.argmax(logits, axis=-1) if draws is None else mx.stack([draw(row) for draw, row in zip(draws, logits)])
        mx.async_eval(tokens)
        return tokens

    def token_id(self, token) -> int:
        return int(token.item())

    def token_ids(self, tokens) -> list:
        return tokens.tolist()

    def logits_numpy(self, logits):
        return np.array(logits.astype(mx.float32))

    def compress(self, cache, policy):
        if any(c.queries is None and c.decoder is None for c in cache):
            raise SageKVError(f"attention of this {self.model_type} model was not routed through sagekv; its family is not supported")
        for layer, c in enumerate(cache):
            c.compress(policy, layer)
        mx.eval([c.decoder.state for c in cache if c.decoder is not None])

    def clone_cache(self, cache):
        return [c.clone() for c in cache]

    def kv_bytes(self, cache) -> int:
        return sum(c.nbytes for c in cache)

    def kept(self, cache):
        return kept_of(MlxOps, [c.decoder for c in cache])

    def sync(self):
        mx.synchronize()

    # A cache taken apart into layers and put back together (sagekv.rag, sagekv.saved_cache, sagekv.layerwise)

    ops = MlxOps

    def wrap(self, layers, observed_queries: int = 1):
        """A cache of ``layers``: each a decode cache, or a full layer's arrays (sagekv.cache.full_layer)."""
        cache = self.new_cache(observed_queries)
        for c, held in zip(cache, layers):
            if isinstance(held, dict):
                c.update_and_fetch(held["keys"], held["values"])
                c.queries = held.get("queries")
            else:
                c.decoder, c.offset = held, offset_of(held)
        return cache

    def unwrap(self, cache) -> list:
        """Per layer: its decode cache, or while it keeps everything its arrays (sagekv.cache.full_layer)."""
        return [c.decoder if c.decoder is not None else full_layer(*c.keys_and_values(), c.queries) for c in cache]

    def raw(self, array):
        """(numpy array, safetensors dtype) of an array; bfloat16 as its uint16 bits."""
        tag = STORED_DTYPES[array.dtype]
        return np.array(array.view(mx.uint16) if tag == "BF16" else array), tag

    def from_raw(self, array, tag: str):
        out = mx.array(array)
        return out.view(mx.bfloat16) if tag == "BF16" else out

    # Layer by layer (sagekv.layerwise): the layer-wise prefill and caches assembled from stored documents (sagekv.rag)

    @property
    def fused_causal(self) -> bool:
        return mx.default_device() == mx.gpu  # the CPU's attention materialises the scores

    def inference(self):
        return contextlib.nullcontext()

    def empty_kv(self):
        dtype = self.model.model.embed_tokens.weight.dtype
        return mx.zeros((1, self.kv_heads, 0, self.head_dim), dtype=dtype)

    def set_decoder(self, cache, index: int, decoder):
        cache[index].decoder, cache[index].offset = decoder, offset_of(decoder)

    def evaluate(self, arrays):
        mx.eval(arrays)

    def free_bytes(self) -> int:
        if mx.default_device() != mx.gpu:
            return host_available_bytes()
        info = mx.device_info()
        if "free_memory" in info:  # CUDA: what the device had free (less MLX's own use, in case that was before it)
            return int(info["free_memory"]) - mx.get_active_memory()
        # unified memory: what Metal recommends a process keeps resident
        return int(info.get("max_recommended_working_set_size", info["memory_size"])) - mx.get_active_memory()

    def embed(self, ids):
        return self.model.model.embed_tokens(mx.array(ids)[None])

    def layer(self, index: int, hidden, positions, cache):
        cache[index].offset = TokenPositions(mx.array(positions.astype(np.int32)))
        return self.model.model.layers[index](hidden, None, cache=cache[index])

    def head(self, hidden, cache):
        hidden = self.model.model.norm(hidden)
        if getattr(self.model.args, "tie_word_embeddings", False):
            logits = self.model.model.embed_tokens.as_linear(hidden)[0, -1]
        else:
            logits = self.model.lm_head(hidden)[0, -1]
        mx.eval(logits, [c.decoder.arrays for c in cache])
        return logits

    def rerotate(self, keys, shift: int):
        """Keys [..., D] rotated on by ``shift`` positions with the model's own RoPE module."""
        rope = self.model.layers[0].self_attn.rope.rope
        if type(rope).__name__ not in ("RoPE", "Llama3RoPE"):
            raise SageKVError(f"stored caches cannot be moved under {type(rope).__name__} (not a pure rotation)")
        return rope(keys.reshape(-1, 1, keys.shape[-1]), offset=shift).reshape(keys.shape)
