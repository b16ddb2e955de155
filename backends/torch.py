"""PyTorch backend: unmodified transformers models decoding on a SAGE-KV cache.

A :class:`SageCache` (a transformers ``Cache`` of :class:`SageLayer`) grows like a
``DynamicCache`` during prefill; the registered ``"sagekv"`` attention function records the
last queries of each layer and, after prefill, answers decode steps from the policy's decode cache.
``get_seq_length`` stays the true position, so positions continue from N.
"""

from __future__ import annotations

import contextlib
import copy
import contextvars
import functools
import inspect
import os

import numpy as np
import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..cache import full_layer, kept_of
from ..dropin import OnePrompt
from ..errors import SageKVError
from ..generate import check_attention, check_model_type
from ..layerwise import host_available_bytes
from ..ops import Ops
from ..sampling import filtered_logits
from ..selection import last_queries

ATTENTION = "sagekv"
_active_cache = contextvars.ContextVar("sagekv_active_cache", default=None)


class TorchOps(Ops):
    """torch: new arrays on the input's device; its own topk, sort, softmax and attention."""

    xp = torch
    index_dtype = torch.int64

    @classmethod
    def placement(cls, like) -> dict:
        return {"device": like.device}

    @classmethod
    def astype(cls, x, dtype):
        return x.to(dtype)

    @classmethod
    def asarray(cls, x, like):
        host = torch.as_tensor(x)
        if like.device.type != "cuda":
            return host.to(like.device)
        # from pinned memory the copy is queued behind the device's work; from pageable memory it waits for it
        return host.pin_memory().to(like.device, non_blocking=True)

    @classmethod
    def topk_indices(cls, x, k):
        return torch.topk(x, k, dim=-1, sorted=False).indices

    @classmethod
    def dot_keys(cls, queries, keys):
        if keys.is_cuda and keys.dtype in (torch.bfloat16, torch.float16):  # float32 out without a float32 copy of the keys
            return torch.bmm(queries.to(keys.dtype), keys.transpose(-1, -2), out_dtype=torch.float32)
        return super().dot_keys(queries, keys)

    @classmethod
    def sort(cls, x):
        return torch.sort(x, dim=-1).values

    @classmethod
    def reduce_max(cls, x, axis):
        return x.amax(dim=axis)  # Tensor.max(dim) also returns the indices

    @classmethod
    def reduce_min(cls, x, axis):
        return x.amin(dim=axis)

    @classmethod
    def softmax(cls, x):
        return torch.softmax(x, dim=-1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    @classmethod
    def attention(cls, q, k, v, scale, mask=None):
        if isinstance(mask, str) and q.shape[2] != k.shape[2]:  # the last queries: causal aligned at the end
            if q.is_cuda and q.shape[1] != k.shape[1]:
                # CausalBias's flash path calls the kernel without enable_gqa; with grouped heads on CUDA that
                # is not verified yet, so there the mask is built (on the device, as before)
                length, size = q.shape[2], k.shape[2]
                mask = torch.ones(length, size, dtype=torch.bool, device=q.device).tril(size - length)
            else:
                mask = causal_lower_right(q.shape[2], k.shape[2])
        causal = isinstance(mask, str)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else mask, is_causal=causal, scale=scale, enable_gqa=True)

    @classmethod
    def write(cls, buffer, axis, index, value):
        buffer.index_copy_(axis, index, value)  # one copy kernel; assignment would go through index_put_

    @classmethod
    def copy(cls, x):
        return x.clone()

    @classmethod
    def to_numpy(cls, x):
        return x.detach().cpu().numpy()


class SageLayer(DynamicLayer):
    """A DynamicLayer during prefill; after :meth:`compress`, the policy's decode cache."""

    def __init__(self, observed_queries: int = 1):
        super().__init__()
        self.window = max(observed_queries, 1)
        self.queries = None  # the last prompt queries, [Hq, W, D]
        self.observing = True  # until selection: afterwards a step does what transformers' own does
        self.decoder = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.decoder is None:
            return super().update(key_states, value_states, *args, **kwargs)
        self.decoder.append(key_states, value_states)
        return key_states, value_states  # the attention function reads the decoder instead

    def get_seq_length(self) -> int:
        if self.decoder is not None:
            return self.decoder.length
        return super().get_seq_length()

    def observe(self, queries):
        self.queries = last_queries(TorchOps, self.queries, queries, self.window)

    def compress(self, policy, layer: int):
        if self.decoder is not None:  # assembled from stored documents (sagekv.rag): decode on it or compact it
            self.decoder = self.decoder.decode_cache(policy, layer)
            return
        self.decoder = policy.decode_cache(TorchOps, self.queries, self.keys, self.values, layer)
        if self.decoder is not None:
            self.keys = self.values = None  # release the full cache
        self.queries, self.observing = None, False

    @property
    def nbytes(self) -> int:
        if self.decoder is not None:
            return self.decoder.nbytes
        return TorchOps.nbytes(self.keys) + TorchOps.nbytes(self.values)


class SageCache(Cache):
    def __init__(self, num_layers: int, observed_queries: int = 1, layers=None):
        super().__init__(layers=layers or [SageLayer(observed_queries) for _ in range(num_layers)])
        self.position = None  # the next token's position, on the device
        self.counted = None  # the length it was counted to
        self.graph = None  # its decode step captured (StepGraph), once it decodes on a static cache

    def position_ids(self, input_ids):
        """Positions [rows, count] of the tokens ``input_ids`` [rows, count] (a row per sequence of a batch)
        from a counter on the device, advanced in place: a decode step reads no position from the host, so
        it is the same work every step."""
        count = input_ids.shape[1]
        if self.counted != self.get_seq_length():  # first use, or tokens added layer by layer (sagekv.rag)
            decoder = self.layers[0].decoder
            starts = [self.get_seq_length()] if decoder is None else decoder.lengths
            self.position = TorchOps.asarray(np.array(starts, np.int64), like=input_ids)
        positions = self.position[:, None] + torch.arange(count, device=input_ids.device)
        self.position += count
        self.counted = self.get_seq_length() + count
        return positions

    @property
    def static(self) -> bool:
        """Whether a decode step is the same work on the same tensors every step: every layer decodes on a
        fixed-size cache (CompactKV, BatchKV; a full layer, Quest's pages and a SegmentKV grow)."""
        return all(layer.decoder is not None and layer.decoder.static for layer in self.layers)

    def count_step(self):
        """What a decode step on a static cache counts on the host (each layer's length, the length the
        position counter was counted to), for a step replayed from a graph, which runs none of its Python."""
        for layer in self.layers:
            layer.decoder.length += 1
        self.counted = self.get_seq_length()

    @contextlib.contextmanager
    def active(self):
        """Make this the cache the ``sagekv`` attention function reads from."""
        token = _active_cache.set(self)
        try:
            yield self
        finally:
            _active_cache.reset(token)


def sagekv_attention(module, query, key, value, attention_mask, **kwargs):
    cache = _active_cache.get()
    if cache is not None:
        layer = cache.layers[module.layer_idx]
        if layer.decoder is not None:
            scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
            return layer.decoder.attend(query, scale).transpose(1, 2), None
        if layer.observing:
            layer.observe(query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, sagekv_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class PromptLayer(OnePrompt, SageLayer):
    """A SageLayer for the model's own ``generate`` (:func:`cache_for`): generate runs the prompt in one step
    (or in chunks of ``prefill_chunk_size``), so the first one-token step after it is the first decode step."""

    maker = "sagekv.cache_for"
    is_croppable = False  # evicted entries cannot come back: generate must not plan to roll a step back

    def __init__(self, policy, index: int):
        super().__init__(policy.observed_queries)
        self.serve(policy, index)

    def update(self, key_states, value_states, *args, **kwargs):
        batch, _, steps, _ = key_states.shape
        self.before_step(batch, steps, decoding=self.get_seq_length() > 0)
        return super().update(key_states, value_states, *args, **kwargs)


class PromptCache(SageCache):
    """PromptLayers for one ``generate`` call."""

    def __init__(self, num_layers: int, policy):
        super().__init__(num_layers, layers=[PromptLayer(policy, index) for index in range(num_layers)])
        self.called = False

    # generate sets this on the cache it is given at the start of every call: where a second call is refused
    @property
    def _is_user_defined(self) -> bool:
        return self.called

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool):
        if self.called:
            raise SageKVError("a sagekv cache serves one generate call: make a new one with sagekv.cache_for")
        self.called = True


def route(model) -> None:
    """Set ``model`` to run sagekv's attention, reading the SageCache that a call is given (idempotent);
    with any other cache, or none, that attention is SDPA's."""
    if model.config._attn_implementation != ATTENTION:
        model.set_attn_implementation(ATTENTION)
    forward = model.forward
    if getattr(forward, "sagekv_routed", False):
        return

    @functools.wraps(forward)  # generate reads the wrapped signature to choose the inputs it passes
    def routed(*args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renamed the argument
        if not isinstance(cache, SageCache):
            return forward(*args, **kwargs)
        with cache.active():
            return forward(*args, **kwargs)

    routed.sagekv_routed = True
    model.forward = routed


def cache_for(model, policy) -> PromptCache:
    """See :func:`sagekv.cache_for`."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise SageKVError(f"cache_for takes a transformers model, got {type(model).__name__} (mlx-lm: sagekv.prompt_cache_for)")
    check_model_type(model.config.model_type)
    check_attention(model.config.to_dict())
    route(model)
    return PromptCache(model.config.num_hidden_layers, policy)


class CudaGraphs:
    """How a decode step is captured on CUDA (:class:`StepGraph`). Explicit capture (torch.cuda.CUDAGraph)
    rather than torch.compile(mode="reduce-overhead"): nothing is compiled (minutes for an 8B model), and a
    cache of another size is one more capture rather than a recompile."""

    @staticmethod
    def warm(step):
        """Run ``step`` eagerly on a side stream, as torch asks of the work before a capture (lazy
        initialisation, such as cuBLAS workspaces and the kernels chosen for one-token shapes)."""
        side, main = torch.cuda.Stream(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            logits = step()
        main.wait_stream(side)
        logits.record_stream(main)  # allocated on the side stream, read on this one
        return logits

    @staticmethod
    def record(step):
        """Capture ``step`` and run it once (capture only records): (replay, the logits it writes)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        graph.replay()
        return graph.replay, logits


class StepGraph:
    """One static cache's decode step, captured once and replayed (:meth:`Runner.forward`).

    The first step runs eagerly (the warm-up), the second is captured, and every later one replays it:
    the same kernels on the same tensors, the token copied into the input it was captured with. The ring
    slot, the step and the position counter are on the device, advanced in place by those kernels; what
    the Python step also counts on the host is advanced after each replay (:meth:`SageCache.count_step`).
    """

    def __init__(self, graphs):
        self.graphs = graphs  # CudaGraphs, or a stand-in with its warm and record (tests on the CPU)
        self.warmed = False
        self.token = self.replay = self.logits = None

    def __call__(self, step, token, cache):
        if self.replay is not None:
            self.token.copy_(token)
            self.replay()
            cache.count_step()
            return self.logits
        if not self.warmed:
            self.warmed = True
            return self.graphs.warm(lambda: step(token, cache))
        self.token = token.clone()
        self.replay, self.logits = self.graphs.record(lambda: step(self.token, cache))
        return self.logits


class Token:
    """A token drawn on CUDA, its copy to pinned host memory queued right behind it: reading it waits for
    that copy only, not for the steps queued after it, so the device keeps working while the host reads."""

    def __init__(self, ids):
        self.ids = ids  # [rows] on the device
        self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        self.host.copy_(ids, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def __int__(self):
        return self.tolist()[0]

    def tolist(self) -> list:
        self.ready.synchronize()
        return self.host.tolist()


class Draw:
    """One generation's draws: a generator on the model's device, seeded with the sampler's seed."""

    def __init__(self, sampler, device):
        self.sampler = sampler
        self.generator = torch.Generator(device).manual_seed(sampler.seed)

    def __call__(self, logits):
        probs = torch.softmax(filtered_logits(TorchOps, logits, self.sampler), dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}  # safetensors' names


class Runner:
    """The generation loop's runner (:class:`sagekv.backend.Runner`) for transformers models."""

    name = "torch"

    def __init__(self, path: str, config: dict, device=None, dtype=None, random_weights: bool = False,
                 tensor_parallel: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if tensor_parallel:
            # transformers shards every attention layer by heads across the torchrun processes, one per
            # GPU (gloo on the CPU): each process's attention sees its own heads, so each selects its
            # own KV heads' entries and decodes them, with the model's own all-reduces only
            if "WORLD_SIZE" not in os.environ or random_weights:
                raise SageKVError("tensor_parallel loads a checkpoint in each of the processes torchrun starts")
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype] if dtype else "auto", attn_implementation=ATTENTION, tp_plan="auto")
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        elif random_weights:  # the checkpoint's shape, initialised on the device (benchmarks: no weights file)
            with self.device:
                self.model = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(path), dtype=DTYPES[dtype or "float32"], attn_implementation=ATTENTION)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=DTYPES[dtype] if dtype else "auto", attn_implementation=ATTENTION
            ).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model.eval()
        self.num_layers = self.model.config.num_hidden_layers
        self.model_type = self.model.config.model_type
        self.config = self.model.config.to_dict()
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name prints a FutureWarning)
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        config = self.model.config
        self.max_positions = getattr(config, "max_position_embeddings", None)
        self.kv_heads = config.num_key_value_heads // (int(os.environ["WORLD_SIZE"]) if tensor_parallel else 1)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # decode steps on a static cache replay a CUDA graph (SAGEKV_NO_GRAPH=1: eager, as on the CPU); RoPE
        # whose frequencies depend on the length reads it on the host every step, which a graph cannot; a
        # sharded step stays eager (its collectives are not captured)
        rope = getattr(self.model.model.rotary_emb, "rope_type", "default")
        captures = self.device.type == "cuda" and rope not in ("dynamic", "longrope") and not tensor_parallel and \
            os.environ.get("SAGEKV_NO_GRAPH") != "1"
        self.graphs = CudaGraphs if captures else None

    def new_cache(self, observed_queries: int = 1):
        return SageCache(self.num_layers, observed_queries)

    @torch.inference_mode()
    def forward(self, ids, cache):
        """See :class:`sagekv.backend.Runner`. A decode step (a token from :meth:`next_token`) on a static
        cache runs as a captured graph where :attr:`graphs` is set (CUDA): its logits are then the graph's
        output, which the next step overwrites."""
        if isinstance(ids, Token):
            ids = ids.ids
        if isinstance(ids, torch.Tensor) and self.graphs is not None and cache.static:
            if cache.graph is None:
                cache.graph = StepGraph(self.graphs)
            return cache.graph(self.step, ids, cache)
        return self.step(ids, cache)

    def step(self, ids, cache):
        """One eager step: a token per row [rows] on the device, or a list of ids of one sequence."""
        input_ids = ids.reshape(-1, 1) if isinstance(ids, torch.Tensor) else torch.tensor([ids], device=self.device)
        with cache.active():
            out = self.model(
                input_ids=input_ids,
                position_ids=cache.position_ids(input_ids),
                use_cache=True,
                logits_to_keep=1,
                **{self.cache_argument: cache},
            )
        logits = out.logits[:, -1]
        return logits[0] if len(logits) == 1 else logits

    prefill = forward

    def new_draw(self, sampler):
        return Draw(sampler, self.device)

    def next_token(self, logits, draw=None):
        return self.next_tokens(logits, None if draw is None else [draw])

    def next_tokens(self, logits, draws=None):
        logits = logits.reshape(-1, logits.shape[-1])
        tokens = torch.argmax(logits, dim=-1) if draws is None else torch.cat([draw(row) for draw, row in zip(draws, logits)])
        return Token(tokens) if self.device.type == "cuda" else tokens

    def token_id(self, token) -> int:
        return int(token) if isinstance(token, Token) else int(token.item())

    def token_ids(self, tokens) -> list:
        return tokens.tolist()  # a Token's waits for its copy to the host only

    def logits_numpy(self, logits):
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def compress(self, cache, policy):
        if any(layer.queries is None and layer.decoder is None for layer in cache.layers):
            raise SageKVError(f"attention of this {self.model_type} model was not routed through sagekv; its family is not supported")
        for index, layer in enumerate(cache.layers):
            layer.compress(policy, index)
        cache.graph = None  # new decoders: a graph captured over the old ones must not replay

    def clone_cache(self, cache):
        """A copy of a cache: full layers only rebind their tensors, so sharing them is safe; decode
        caches write into theirs, so they are copied."""
        twin = copy.copy(cache)
        twin.layers = [copy.copy(layer) for layer in cache.layers]
        twin.position = twin.counted = None  # the counter is advanced in place: the twin counts its own
        twin.graph = None  # captured over this cache's tensors
        for layer in twin.layers:
            if layer.decoder is not None:
                layer.decoder = layer.decoder.copy()
        return twin

    def kv_bytes(self, cache) -> int:
        return sum(layer.nbytes for layer in cache.layers)

    def kept(self, cache):
        return kept_of(TorchOps, [layer.decoder for layer in cache.layers])

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # A cache taken apart into layers and put back together (sagekv.rag, sagekv.saved_cache, sagekv.layerwise)

    ops = TorchOps
    fused_causal = True  # SDPA's causal kernels (flash, on CUDA and on the CPU) never hold the [heads, rows, rows] scores

    def wrap(self, layers, observed_queries: int = 1):
        """A cache of ``layers``: each a decode cache, or a full layer's arrays (sagekv.cache.full_layer)."""
        cache = SageCache(self.num_layers, observed_queries)
        for layer, held in zip(cache.layers, layers):
            if isinstance(held, dict):
                layer.update(held["keys"], held["values"])
                layer.queries = held.get("queries")
            else:
                layer.decoder = held
        return cache

    def unwrap(self, cache) -> list:
        """Per layer: its decode cache, or while it keeps everything its arrays (sagekv.cache.full_layer)."""
        return [layer.decoder if layer.decoder is not None else full_layer(layer.keys, layer.values, layer.queries)
                for layer in cache.layers]

    def raw(self, array):
        """(numpy array, safetensors dtype) of a tensor; bfloat16 as its uint16 bits."""
        tag = STORED_DTYPES[array.dtype]
        array = array.detach().contiguous().cpu()
        return (array.view(torch.uint16) if tag == "BF16" else array).numpy(), tag

    def from_raw(self, array, tag: str):
        tensor = torch.from_numpy(array)
        if tag == "BF16":
            tensor = tensor.view(torch.bfloat16)
        return tensor.to(self.device)

    # Layer by layer (sagekv.layerwise): the layer-wise prefill and caches assembled from stored documents (sagekv.rag)

    def inference(self):
        return torch.inference_mode()

    def empty_kv(self):
        return torch.zeros(1, self.kv_heads, 0, self.head_dim, dtype=self.model.dtype, device=self.device)

    def set_decoder(self, cache, index: int, decoder):
        cache.layers[index].decoder = decoder

    def evaluate(self, arrays):
        """Nothing to do: torch queues work as it is called."""

    def free_bytes(self) -> int:
        if self.device.type != "cuda":
            return host_available_bytes()
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)  # torch's cached blocks are free to it

    @torch.inference_mode()
    def embed(self, ids):
        return self.model.model.embed_tokens(torch.tensor([ids], device=self.device))

    @torch.inference_mode()
    def layer(self, index: int, hidden, positions, cache):
        position_ids = TorchOps.asarray(positions, like=hidden)[None]  # queued behind the device's work
        rotary = self.model.model.rotary_emb(hidden, position_ids)
        with cache.active():
            out = self.model.model.layers[index](hidden, attention_mask=None, position_ids=position_ids,
                                                 position_embeddings=rotary, use_cache=True, **{self.cache_argument: cache})
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def head(self, hidden, cache):
        return self.model.lm_head(self.model.model.norm(hidden))[0, -1]

    @torch.inference_mode()
    def rerotate(self, keys, shift: int):
        """Keys [..., D] rotated on by ``shift`` positions with the model's own RoPE frequencies
        (a pure rotation: the scaling some RoPE types apply was applied once, at prefill)."""
        rotary = self.model.model.rotary_emb
        if getattr(rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise SageKVError(f"stored caches cannot be moved under {rotary.rope_type} RoPE scaling (it depends on the length)")
        inv_freq = rotary.inv_freq.to(self.device, torch.float64)
        angle = torch.cat([inv_freq, inv_freq]) * shift
        rotated = angle.shape[0]  # partial rotary: only the first dims rotate
        x = keys[..., :rotated].float()
        half = rotated // 2
        turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        out = x * angle.cos().float() + turned * angle.sin().float()
        return torch.cat([out.to(keys.dtype), keys[..., rotated:]], dim=-1)
