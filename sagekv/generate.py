"""Loading a model on a backend and the prefill -> select -> decode loop shared by both."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from .backend import Runner
from .errors import SageKVError
from .policies import Full, Policy
from .sampling import check_sampler

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "float16", "bfloat16")
PREFILL_CHUNK = 2048  # tokens per model call of the full-cache prefill
REFERENCE_MODEL = os.path.join(os.path.dirname(__file__), "reference_model")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".npz", ".pt")
FINGERPRINT_BYTES = 1 << 20


@dataclass
class Stats:
    """Cache bytes at the end of prefill (full) and after selection (kept), and timings.

    After a layer-wise prefill (generation with an evicting policy) the full cache never existed:
    ``full_kv_bytes`` is what it would have held, and selection ran inside prefill, layer by layer, so
    its time is part of ``prefill_s`` and ``select_s`` is zero but for a device sync.
    """

    full_kv_bytes: int
    kept_kv_bytes: int
    prefill_s: float
    select_s: float
    decode_s: float
    decode_tokens_per_s: float


@dataclass
class Result:
    text: str
    tokens: list
    prompt_tokens: int
    stats: Stats
    kept_positions: Optional[list] = field(default=None, repr=False)
    """Per layer: the positions each row kept at selection time (numpy), or None if none evicted."""
    rag: Optional[object] = None
    """For answers over stored documents (:meth:`SageModel.rag`): a ``sagekv.rag.RagStats``."""


def default_backend() -> str:
    """MLX on Apple silicon, PyTorch elsewhere."""
    return "mlx" if platform.system() == "Darwin" and platform.machine() == "arm64" else "torch"


def read_config(path: str) -> dict:
    """A local checkpoint's config.json, checked for a supported model type."""
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise SageKVError(f"no config.json in model directory {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SageKVError(f"cannot read {config_path}: {error}") from None
    if not isinstance(config, dict):
        raise SageKVError(f"{config_path} is not a JSON object")
    check_model_type(config.get("model_type"))
    check_attention(config)
    return config


def check_model_type(model_type) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SageKVError(
            f"unsupported model type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def check_attention(config: dict) -> None:
    """Refuse attention that the eviction caches do not reproduce in decode: a sliding window narrower
    than the context, and logit soft-capping (a config that sets it was made for a model using it)."""
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    layer_types = config.get("layer_types")
    if layer_types is not None:  # transformers 5 writes which layers slide
        sliding = "sliding_attention" in layer_types
    else:  # as transformers reads Mistral's and Qwen's fields: Qwen slides only from layer max_window_layers
        context = config.get("max_position_embeddings") or float("inf")
        sliding = window is not None and window < context and config.get("num_hidden_layers", 1) > config.get(
            "max_window_layers", 0)
    if sliding:
        raise SageKVError(f"sliding_window={window} is not supported (decode attends to every kept entry)")
    for setting in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(setting) is not None:
            raise SageKVError(f"{setting}={config[setting]} is not supported (decode does not soft-cap logits)")


def legacy_rope_fields(config: dict) -> dict:
    """``rope_theta`` (and ``rope_scaling``) as they stood before transformers 5 nested them under
    ``rope_parameters``: mlx-lm's Llama and Qwen2 read only these. Empty when nothing is nested."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or config.get("rope_theta") is not None:
        return {}
    fields = {"rope_theta": rope.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        fields["rope_scaling"] = rope
    return fields


def load(model: Optional[str] = None, backend: Optional[str] = None, device=None, dtype=None,
         random_weights: bool = False, tensor_parallel: bool = False) -> "SageModel":
    """Load a local checkpoint directory, a GGUF file, a named model of :data:`sagekv.gguf.MODELS`
    (``"smollm2-135m-instruct"``) or a Hugging Face id with the backend's own loader.

    ``backend``: "mlx" (mlx-lm) or "torch" (transformers); default MLX on Apple silicon, else
    torch. ``device``: torch device string, or "cpu"/"gpu" for MLX. ``dtype``: one of
    float32, float16, bfloat16, or None for the checkpoint's own (float32 for a GGUF file, which is
    converted once into a folder of that dtype: see :mod:`sagekv.gguf`). ``random_weights`` (torch; for
    benchmarks): the directory's config and tokenizer with random weights built on the device.
    ``tensor_parallel`` (torch, under ``torchrun``, one process per GPU): the checkpoint sharded by heads
    with transformers' ``tp_plan="auto"``; each process selects on its own KV heads and every process
    generates the same tokens.
    """
    from .backends import get_backend
    from .gguf import resolve as resolve_gguf

    if model is None:
        if not os.path.exists(os.path.join(REFERENCE_MODEL, "config.json")):
            raise SageKVError("no model given and the bundled reference model is not installed: pass --model PATH_OR_ID")
        model = REFERENCE_MODEL
    if dtype is not None and dtype not in DTYPES:
        raise SageKVError(f"unknown dtype {dtype!r} (choose from: {', '.join(DTYPES)})")
    module = get_backend(backend or default_backend())
    name = "sagekv reference model" if model == REFERENCE_MODEL else str(model)  # what reports call it
    model = resolve_gguf(str(model), dtype) or os.path.expanduser(str(model))
    if os.path.isdir(model):
        config = read_config(model)
    elif os.path.exists(model) or model.startswith((".", "/")) or model.count("/") != 1:
        raise SageKVError(f"model path not found: {model}")
    else:
        config = {}  # a hub id: the loader fetches it, the type is checked once loaded
    if tensor_parallel and module.Runner.name != "torch":
        raise SageKVError("tensor_parallel needs the torch backend (transformers' tp_plan)")
    sharded = {"tensor_parallel": True} if tensor_parallel else {}
    try:
        runner = module.Runner(model, config, device=device, dtype=dtype, random_weights=random_weights, **sharded)
    except SageKVError:
        raise
    except Exception as error:  # loaders raise many types; the user needs the first line
        raise SageKVError(f"cannot load model {model} with {module.Runner.name}: {first_line(error)}") from None
    check_model_type(runner.model_type)  # a hub id's config is only seen by the loader
    check_attention(runner.config)
    return SageModel(runner, name, None if random_weights else weights_fingerprint(model))


def first_line(error: Exception) -> str:
    """What a one-line error quotes of an exception from a loader: its first line, else its type."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def weights_fingerprint(path: str) -> Optional[str]:
    """Digest of a local checkpoint's weight files (names, sizes, first and last MiB): it changes when the
    model is retrained or replaced, and reads 2 MiB per file however large the checkpoint. None for hub ids."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES)):
        fingerprint_file(digest, os.path.join(path, name), name)
    return digest.hexdigest()[:16]


def fingerprint_file(digest, file: str, name: str) -> None:
    """Add a file's name, size, first and last MiB to ``digest`` (hashlib)."""
    size = os.path.getsize(file)
    digest.update(f"{name}:{size};".encode())
    with open(file, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        f.seek(max(size - FINGERPRINT_BYTES, 0))
        digest.update(f.read(FINGERPRINT_BYTES))


class SageModel:
    """A loaded model; :meth:`generate` runs full-attention prefill, one selection, then decode."""

    def __init__(self, runner: Runner, name: str, weights: Optional[str] = None):
        self.runner, self.name, self.weights = runner, name, weights
        self.backend, self.dtype = runner.name, runner.dtype

    def encode(self, text: str, chat: bool = False) -> list:
        """Token ids of ``text``, or of a one-turn chat asking it with the model's chat template."""
        tokenizer = self.runner.tokenizer
        if not chat:
            return list(tokenizer.encode(text))
        if not getattr(tokenizer, "chat_template", None):
            raise SageKVError(f"{self.name} has no chat template; run without chat")
        messages = [{"role": "user", "content": text.strip()}]  # not content: a prompt file's final newline
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(rendered, add_special_tokens=False))  # the template writes its own <bos>

    @property
    def store_id(self) -> str:
        """What stored document caches are keyed by: the weights fingerprint, else a digest of the name."""
        return self.weights or hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def encode_plain(self, text: str) -> list:
        """Token ids of ``text`` alone, without the special tokens put before a whole prompt."""
        return list(self.runner.tokenizer.encode(text, add_special_tokens=False))

    def preamble_ids(self) -> list:
        """The special tokens the tokenizer puts before any text (``<bos>``), possibly none."""
        whole, plain = self.runner.tokenizer.encode("x"), self.encode_plain("x")
        return list(whole[: len(whole) - len(plain)]) if whole[len(whole) - len(plain):] == plain else []

    def check_length(self, tokens: int) -> None:
        limit = self.runner.max_positions
        if limit and tokens > limit:
            raise SageKVError(f"{tokens} tokens (prompt and generation) exceed the {limit} positions {self.name} handles")

    def rag(self, documents, question: str, method=None, store=None, max_tokens: int = 64, policy=None,
            on_token=None, sampler=None) -> Result:
        """Answer ``question`` over ``documents`` (strings), each prefilled alone and stored (see
        :mod:`sagekv.rag`); ``method``: a RAG method or its name (default SamKV); ``on_token`` and
        ``sampler`` as in :meth:`generate`."""
        from .rag import rag

        return rag(self, documents, question, method, store, max_tokens, policy, on_token, sampler)

    def save_cache(self, prefilled: "Prefilled", path) -> str:
        """Save a prefilled (or selected) cache to the safetensors file ``path`` (see
        :mod:`sagekv.saved_cache`); returns its absolute path."""
        from .saved_cache import save_cache

        return save_cache(self, prefilled, path)

    def load_cache(self, path) -> "Prefilled":
        """A cache saved by :meth:`save_cache`, with this model's weights, on either backend."""
        from .saved_cache import load_cache

        return load_cache(self, path)

    def decode_text(self, ids: list) -> str:
        return self.runner.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: str, policy=None, max_tokens: int = 64, prefill_chunk: Optional[int] = None,
                 chat: bool = False, on_token=None, sampler=None) -> Result:
        """Generation of up to ``max_tokens`` tokens (stops early at end-of-sequence).

        A policy that evicts prefills layer-wise (:mod:`sagekv.layerwise`): each layer keeps only its
        decode cache from the moment it is computed, so the full cache never exists. ``prefill_chunk``:
        tokens per call of a layer there (default: from the model's shape and the free memory), per call
        of the model otherwise (default PREFILL_CHUNK).

        ``chat``: wrap the prompt in the model's chat template as one user turn. ``on_token``: called
        with the tokens generated so far after each new one (streaming); returning True stops.
        ``sampler``: a :class:`sagekv.Sampler` (temperature, top-p, top-k, seed); default greedy.
        """
        policy, sampler = check_generation(policy, max_tokens, prefill_chunk, sampler)
        check_prompt(prompt, "prompt", "the prompt")
        return self.generate_ids(self.encode(prompt, chat), policy, max_tokens, prefill_chunk, on_token, sampler)

    def generate_ids(self, ids: list, policy, max_tokens: int, prefill_chunk: Optional[int] = None, on_token=None,
                     sampler=None) -> Result:
        self.check_length(len(ids) + max_tokens)
        prefilled = self.prefill_for(ids, policy, prefill_chunk)
        return self.decode(prefilled, None if policy.evicts else policy, max_tokens, keep_prefill=False,
                           on_token=on_token, sampler=sampler)

    def generate_batch(self, prompts: list, policy=None, max_tokens: int = 64, prefill_chunk: Optional[int] = None,
                       chat: bool = False, on_token=None, sampler=None) -> list:
        """:meth:`generate` of each prompt of the list ``prompts``, decoded together: a Result per prompt,
        the tokens each would get alone (up to floating-point ties).

        Each prompt is prefilled and selected alone, as :meth:`generate` does; then the caches are stacked
        into one per layer (:class:`sagekv.cache.BatchKV`) and every step runs the model once for the whole
        batch, each sequence at its own positions. A sequence that ends (end-of-sequence, ``max_tokens``, a
        stop) keeps running until all have ended, its further tokens discarded. Compact caches of unequal
        size (a prompt within the budget keeps everything) and full caches of unequal length are padded,
        the padding masked out of attention; a full cache is padded to the longest prompt plus
        ``max_tokens``, so full attention over prompts of very different lengths wastes memory. Quest's
        cache, which chooses pages per step, is refused.

        ``on_token``: called with the prompt's index and the tokens it has generated so far after each new
        one; returning True stops that prompt. ``sampler``: as in :meth:`generate`; each prompt draws from its
        own generator seeded with the sampler's seed (a fresh one for each prompt where it has none), so a
        seeded batch samples what each prompt would alone. The other arguments are as in :meth:`generate`.
        Each Result's decode time is the batch's: the batch's throughput is the sum of their rates.
        """
        policy, sampler = check_generation(policy, max_tokens, prefill_chunk, sampler)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise SageKVError(f"prompts must be a non-empty list of str, got {prompts!r:.60}")
        for index, prompt in enumerate(prompts):
            check_prompt(prompt, f"prompts[{index}]", f"prompts[{index}]")
        check_batched(policy)
        ids = [self.encode(prompt, chat) for prompt in prompts]
        for one in ids:
            self.check_length(len(one) + max_tokens)  # every prompt before any prefill
        prefilled = [self.prefill_for(one, policy, prefill_chunk) for one in ids]
        return self.decode_batch(prefilled, None if policy.evicts else policy, max_tokens, keep_prefill=False,
                                 on_token=on_token, sampler=sampler)

    def prefill_for(self, ids: list, policy, prefill_chunk: Optional[int]) -> "Prefilled":
        """The prefill generation runs under ``policy``: layer-wise when it evicts, else full."""
        if policy.evicts:
            return self.prefill_layerwise(ids, policy, prefill_chunk)
        return self.prefill(ids, policy.observed_queries, prefill_chunk or PREFILL_CHUNK)

    def prefill_layerwise(self, ids: list, policy, prefill_chunk: Optional[int] = None) -> "Prefilled":
        """Layer-wise prefill (:func:`sagekv.layerwise.prefill`): each layer's cache is already ``policy``'s,
        as after :meth:`select` (it decodes with ``decode(prefilled, None, ...)``)."""
        from .layerwise import prefill

        start = time.perf_counter()
        cache, logits, full_bytes = prefill(self.runner, ids, policy, prefill_chunk)
        self.runner.sync()
        return Prefilled(cache, logits, len(ids), full_bytes, time.perf_counter() - start, policy.observed_queries,
                         list(ids), selected_by=repr(policy))

    def prefill(self, ids: list, observed_queries: int = 1, prefill_chunk: int = PREFILL_CHUNK) -> "Prefilled":
        """Full-attention prefill; the result can be decoded under several policies, have more tokens
        appended (:meth:`extend`) and be saved (:meth:`save_cache`)."""
        cache = self.runner.new_cache(observed_queries)
        start = time.perf_counter()
        logits = self.prefill_into(cache, ids, prefill_chunk)
        return Prefilled(cache, logits, len(ids), self.runner.kv_bytes(cache), time.perf_counter() - start, observed_queries,
                         list(ids))

    def extend(self, prefilled: "Prefilled", ids: list, keep_prefill: bool = True,
               prefill_chunk: int = PREFILL_CHUNK) -> "Prefilled":
        """``prefilled``'s prompt followed by ``ids`` (a question after a document), prefilled over its cache
        as one prefill of the whole prompt would be: its last token alone, so that token's query guides
        selection. ``keep_prefill``: extend a copy, so ``prefilled`` can take other questions; otherwise
        its cache is taken over."""
        if prefilled.selected_by is not None:
            raise SageKVError(f"tokens can be appended to a full prefilled cache only; this one was selected by {prefilled.selected_by}")
        if len(ids) == 0:
            raise SageKVError("no tokens to append")
        cache = self.take_cache(prefilled, keep_prefill)
        start = time.perf_counter()
        logits = self.prefill_into(cache, ids, prefill_chunk)
        return Prefilled(cache, logits, prefilled.prompt_tokens + len(ids), self.runner.kv_bytes(cache),
                         time.perf_counter() - start, prefilled.observed_queries, prefilled.ids + list(ids))

    def prefill_into(self, cache, ids: list, prefill_chunk: int):
        """Run ``ids`` through the model into ``cache``, ``prefill_chunk`` tokens at a time and the last
        one alone (its query guides selection); its logits."""
        run = self.runner
        for i in range(0, len(ids) - 1, prefill_chunk):
            run.prefill(ids[i : min(i + prefill_chunk, len(ids) - 1)], cache)
        logits = run.forward(ids[-1:], cache)
        run.sync()
        return logits

    def select(self, prefilled: "Prefilled", policy=None, keep_prefill: bool = True) -> "Prefilled":
        """``prefilled`` with each layer's cache chosen by ``policy`` (default full attention): the policy's
        compact decode cache, or the whole cache where it keeps everything. It decodes with
        ``decode(selected, None, ...)`` and saves as a compact cache (:meth:`save_cache`).
        ``keep_prefill``: select from a copy; otherwise the cache is taken over and evicted entries freed."""
        policy = Full() if policy is None else policy
        check_policy(policy)
        if prefilled.selected_by is not None:
            raise SageKVError(f"this cache was selected by {prefilled.selected_by} already")
        check_observed(prefilled, policy)
        run = self.runner
        cache = self.take_cache(prefilled, keep_prefill)
        run.sync()  # a copy still queued on the device is not selection time
        start = time.perf_counter()
        run.compress(cache, policy)
        run.sync()
        return replace(prefilled, cache=cache, selected_by=repr(policy), select_s=time.perf_counter() - start)

    def take_cache(self, prefilled: "Prefilled", keep_prefill: bool):
        """The cache to work on: a copy of ``prefilled``'s, or its own, which it then no longer holds."""
        if prefilled.cache is None:
            raise SageKVError("this prefilled cache was taken over by an earlier call with keep_prefill=False")
        if keep_prefill:
            return self.runner.clone_cache(prefilled.cache)
        cache, prefilled.cache = prefilled.cache, None
        return cache

    def decode(self, prefilled: "Prefilled", policy, max_tokens: int, keep_prefill: bool = True, on_token=None,
               sampler=None) -> Result:
        """Select with ``policy`` (a cache :meth:`select` has chosen takes None), then decode with
        ``sampler`` (default greedy; a seed restarts here).

        ``keep_prefill``: work on a copy so ``prefilled`` can serve other policies; otherwise its
        cache is consumed and the evicted entries are freed before decoding.
        """
        stop = None if on_token is None else (lambda index, tokens: on_token(tokens))
        return self.decode_batch([prefilled], policy, max_tokens, keep_prefill, stop, sampler)[0]

    def decode_batch(self, prefilled: list, policy, max_tokens: int, keep_prefill: bool = True, on_token=None,
                     sampler=None) -> list:
        """:meth:`decode` of each of ``prefilled`` (a list), decoded together as in :meth:`generate_batch`
        (one alone decodes on its own cache); ``on_token`` takes the index and the tokens, as there."""
        run = self.runner
        sampler = check_sampler(sampler)
        if policy is not None and len(prefilled) > 1:
            check_batched(policy)
        selected = []
        for one in prefilled:
            if one.selected_by is None:
                selected.append(self.select(one, policy, keep_prefill))
            elif policy is not None:
                raise SageKVError(f"this cache was selected by {one.selected_by} already: decode it with policy None")
            else:
                selected.append(replace(one, cache=self.take_cache(one, keep_prefill)))
        kept_bytes = [run.kv_bytes(one.cache) for one in selected]
        kept = [run.kept(one.cache) for one in selected]
        draws = None if sampler.greedy else [run.new_draw(sampler.seeded()) for _ in selected]
        caches = [one.cache for one in selected]
        for one in selected:
            one.cache = None  # decoding consumes the caches: stacked, each sequence's is let go of layer by layer
        if len(caches) == 1:
            cache, logits = caches[0], prefilled[0].logits
        else:
            cache = self.stack(caches, max_tokens)
            logits = run.ops.concat([one.logits[None] for one in prefilled], axis=0)

        tokens, live = [[] for _ in selected], set(range(len(selected)))
        start = time.perf_counter()
        pending = run.next_tokens(logits, draws)  # the first tokens come from the full-attention prefill
        for step in range(max_tokens):
            # the next step is queued before these tokens are read, so the device computes while the host
            # waits and checks (as mlx-lm's loop); a step after every sequence has ended is discarded
            ahead = run.next_tokens(run.forward(pending, cache), draws) if step + 1 < max_tokens else None
            for index, token in enumerate(run.token_ids(pending)):
                if index not in live:
                    continue  # an ended sequence runs on with the others; its tokens are dropped
                if token in run.eos_ids:
                    live.discard(index)
                    continue
                tokens[index].append(token)
                if on_token is not None and on_token(index, tokens[index]):
                    live.discard(index)
            if not live:
                break
            pending = ahead
        decode_s = time.perf_counter() - start
        results = []
        for one, chosen, own, held, positions in zip(prefilled, selected, tokens, kept_bytes, kept):
            steps = max(len(own) - 1, 0)
            stats = Stats(one.full_kv_bytes, held, one.seconds, chosen.select_s, decode_s, steps / decode_s if steps else 0.0)
            results.append(Result(self.decode_text(own), own, one.prompt_tokens, stats,
                                  positions if any(k is not None for k in positions) else None))
        return results

    def stack(self, caches: list, room: int):
        """One cache of ``caches`` (each one sequence's, fresh from selection), layer by layer stacked along the
        batch axis (:class:`sagekv.cache.BatchKV`) with ``room`` for each sequence's decoded tokens; each
        sequence's layer is let go of once stacked."""
        from .cache import BatchKV

        run = self.runner
        layers = [run.unwrap(cache) for cache in caches]
        caches.clear()
        stacked = []
        for index in range(run.num_layers):
            stacked.append(BatchKV(run.ops, [sequence[index] for sequence in layers], room))
            run.evaluate(stacked[-1].arrays)  # MLX: computed while the sequences' layers are still held
            for sequence in layers:
                sequence[index] = None
        return run.wrap(stacked)


def check_policy(policy) -> None:
    if not isinstance(policy, Policy):
        raise SageKVError(f"policy must be a sagekv policy such as sagekv.SageKV(budget), got {policy!r}")


def check_batched(policy) -> None:
    if not policy.batches:
        raise SageKVError(f"{policy.name} cannot decode a batch (its decode cache is not a fixed set of entries)")


def check_generation(policy, max_tokens, prefill_chunk, sampler) -> tuple:
    """(policy, sampler) of a generation call, checked, with their defaults (full attention, greedy)."""
    policy = Full() if policy is None else policy
    check_policy(policy)
    sampler = check_sampler(sampler)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise SageKVError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise SageKVError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    return policy, sampler


def check_prompt(prompt, name: str, called: str) -> None:
    """A prompt must be text with something in it; ``name`` and ``called`` say which in messages."""
    if not isinstance(prompt, str):
        raise SageKVError(f"{name} must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise SageKVError(f"{called} is empty")


def check_observed(prefilled: "Prefilled", policy) -> None:
    """A policy scoring with its last W prompt queries needs a prefill that kept that many (or the whole prompt)."""
    if prefilled.observed_queries is None:
        return
    needed = min(policy.observed_queries, prefilled.prompt_tokens)
    if max(prefilled.observed_queries, 1) < needed:
        raise SageKVError(f"{policy.name} needs the last {needed} prompt queries but the prefill observed "
                          f"{prefilled.observed_queries}: prefill with observed_queries={policy.observed_queries}")


@dataclass
class Prefilled:
    """A prompt's full cache and last logits after prefill."""

    cache: object
    logits: object
    prompt_tokens: int
    full_kv_bytes: int
    seconds: float
    observed_queries: Optional[int] = None
    """Prompt queries each layer kept for selection; None for a cache whose layers check it
    themselves (assembled from stored documents, :mod:`sagekv.rag`)."""
    ids: Optional[list] = None
    """The prompt's token ids (None for a cache assembled from stored documents)."""
    selected_by: Optional[str] = None
    """The policy (its repr) whose caches the layers hold since :meth:`SageModel.select`; None while full."""
    select_s: float = 0.0
    """Seconds that selection took."""
