"""What a backend provides: the runner that the generation loop drives.

Each backend module (``sagekv.backends.mlx``, ``sagekv.backends.torch``) defines a class
``Runner``, built as ``Runner(path, config, device=None, dtype=None)``, that has every member
of :class:`Runner` here: what :mod:`sagekv.generate`, the CLI, the demo and the tests call on
``model.runner``. Caches and logits are the backend's own objects; the loop only passes them back.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Runner(Protocol):
    name: str
    """The backend's name: "mlx" or "torch"."""
    tokenizer: object
    """The model's Hugging Face tokenizer."""
    num_layers: int
    """Decoder layers, one cache layer each."""
    model_type: str
    """The model family as config.json names it ("llama", "qwen2", ...)."""
    eos_ids: set
    """Token ids that end generation."""
    config: dict
    """The checkpoint's config (config.json's fields)."""
    dtype: str
    """The dtype the model computes in: "float32", "float16" or "bfloat16"."""

    def new_cache(self, observed_queries: int = 1):
        """An empty cache that records each layer's last ``observed_queries`` prompt queries."""

    def prefill(self, ids: list, cache):
        """Run prompt tokens through the model into ``cache``; any result is unused."""

    def forward(self, ids, cache):
        """Run tokens (a list of ids, or one token from :meth:`next_token`) through the model into
        ``cache``; the last position's logits. On a batch's cache (``wrap`` of :class:`sagekv.cache.BatchKV`
        layers), ``ids`` from :meth:`next_tokens` gives each row one token: the logits [rows, vocabulary]."""

    def new_draw(self, sampler):
        """Random state for one generation drawing with ``sampler`` (a seeded, non-greedy
        :class:`sagekv.Sampler`): the same seed draws the same tokens."""

    def next_token(self, logits, draw=None):
        """The next token's id on the device (an array, or on torch with CUDA a handle that also copies it to
        the host behind it), computing without waiting for it: the highest logit, or drawn by ``draw`` (from
        :meth:`new_draw`) from the sampler's filtered distribution."""

    def next_tokens(self, logits, draws=None):
        """:meth:`next_token` of each row of ``logits`` [rows, vocabulary] (or of one vector), each drawn by its
        own of ``draws`` (one per row) if given: the tokens [rows] as :meth:`next_token` gives one."""

    def token_id(self, token) -> int:
        """A token from :meth:`next_token` on the host (waits for it)."""

    def token_ids(self, tokens) -> list:
        """Tokens from :meth:`next_tokens` on the host (waits for them)."""

    def logits_numpy(self, logits):
        """The logits as a float32 numpy array."""

    def compress(self, cache, policy) -> None:
        """Give each layer the policy's decode cache (releasing the full one), or keep it full."""

    def clone_cache(self, cache):
        """A copy of a prefilled cache that decoding can consume while the original serves again."""

    def kv_bytes(self, cache) -> int:
        """Bytes the cache holds now: keys, values and any decode-cache metadata."""

    def kept(self, cache) -> list:
        """Per layer, the positions each row keeps (numpy), or None where nothing was evicted."""

    def sync(self) -> None:
        """Wait until the device has finished queued work (for timings)."""

    # Layer by layer (sagekv.layerwise): the layer-wise prefill and caches assembled from stored documents

    ops: type
    """The :class:`sagekv.ops.Ops` of the backend's arrays."""
    kv_heads: int
    head_dim: int
    fused_causal: bool
    """Whether attention under the plain causal mask runs without materialising its scores."""

    def inference(self):
        """A context in which layers run without autograd bookkeeping."""

    def empty_kv(self):
        """Keys with no rows [1, Hkv, 0, D] in the model's dtype and device."""

    def wrap(self, layers, observed_queries: int = 1):
        """A cache whose layer ``i`` is ``layers[i]``: a decode cache it reads and writes, or a full layer's
        arrays (:func:`sagekv.cache.full_layer`)."""

    def unwrap(self, cache) -> list:
        """Per layer: its decode cache, or while it keeps everything its arrays (:func:`sagekv.cache.full_layer`)."""

    def set_decoder(self, cache, index: int, decoder) -> None:
        """Layer ``index`` of a cache from :meth:`wrap` uses ``decoder`` from now on (releasing the one it held)."""

    def embed(self, ids: list):
        """The tokens' embeddings [1, L, hidden]."""

    def layer(self, index: int, hidden, positions, cache):
        """Hidden states [1, L, hidden] of tokens at ``positions`` (numpy) through layer ``index``."""

    def head(self, hidden, cache):
        """The logits of the last of the final hidden states [1, L, hidden]."""

    def evaluate(self, arrays) -> None:
        """Compute lazily built arrays now (MLX), so that one layer's work does not wait for the next."""

    def free_bytes(self) -> int:
        """Memory the device can still allocate."""
