"""End to end on tiny random checkpoints of each family, loaded through the real loaders."""

import numpy as np
import pytest

import sagekv
from conftest import FAMILIES, needs_mlx, needs_torch

PROMPT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
BUDGET = 32


@pytest.fixture
def models(tiny_models):
    return tiny_models


@pytest.fixture
def checkpoints(tiny_checkpoints):
    return tiny_checkpoints


def prefill_logits(model, ids, chunk):
    run = model.runner
    cache = run.new_cache()
    for i in range(0, len(ids) - 1, chunk):
        run.prefill(ids[i : min(i + chunk, len(ids) - 1)], cache)
    return run.logits_numpy(run.forward(ids[-1:], cache))


def same_kept(a, b):
    if a is None or b is None:
        return a is None and b is None
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


POLICIES = [
    sagekv.Full(),
    sagekv.SageKV(BUDGET),
    sagekv.SageKV(BUDGET, group="kv_head"),
    sagekv.StreamingLLM(BUDGET),
]


@needs_mlx
@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_and_torch_agree(models, family):
    mlx_model, torch_model = models(family, "mlx"), models(family, "torch")
    ids = torch_model.encode(PROMPT)
    assert ids == mlx_model.encode(PROMPT)
    a, b = prefill_logits(mlx_model, ids, 64), prefill_logits(torch_model, ids, 64)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for policy in POLICIES:
        x = mlx_model.generate(PROMPT, policy=policy, max_tokens=24)
        y = torch_model.generate(PROMPT, policy=policy, max_tokens=24)
        assert x.tokens == y.tokens, policy
        assert same_kept(x.kept_positions, y.kept_positions), policy
        assert (x.stats.full_kv_bytes, x.stats.kept_kv_bytes) == (y.stats.full_kv_bytes, y.stats.kept_kv_bytes)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_at_least_prompt_equals_full(models, family, backend):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    model = models(family, backend)
    n = len(model.encode(PROMPT))
    full = model.generate(PROMPT, policy=sagekv.Full(), max_tokens=24)
    for budget in (n - 1, n, 4 * n):
        kept = model.generate(PROMPT, policy=sagekv.SageKV(budget), max_tokens=24)
        assert kept.tokens == full.tokens and kept.kept_positions is None
        assert kept.stats.kept_kv_bytes == full.stats.kept_kv_bytes
    evicting = model.generate(PROMPT, policy=sagekv.SageKV(n - 2), max_tokens=4)
    assert evicting.kept_positions is not None


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_equals_one_shot(models, family, backend):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    model = models(family, backend)
    ids = model.encode(PROMPT)
    one_shot = prefill_logits(model, ids, 10_000)
    for chunk in (1, 7, 32):
        np.testing.assert_allclose(prefill_logits(model, ids, chunk), one_shot, rtol=1e-4, atol=1e-4)
    policy = sagekv.SageKV(BUDGET)
    reference = model.generate(PROMPT, policy=policy, max_tokens=16)
    for chunk in (7, 32):
        result = model.generate(PROMPT, policy=policy, max_tokens=16, prefill_chunk=chunk)
        assert result.tokens == reference.tokens
        assert same_kept(result.kept_positions, reference.kept_positions)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_kept_bytes_are_the_bytes_held(models, backend):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    model = models("llama", backend)
    run = model.runner
    ids = model.encode(PROMPT)
    cache = run.new_cache()
    run.prefill(ids[:-1], cache)
    run.forward(ids[-1:], cache)
    layers, kv_heads, head_dim = 2, 2, 16
    assert run.kv_bytes(cache) == 2 * layers * kv_heads * len(ids) * head_dim * 4
    run.compress(cache, sagekv.SageKV(BUDGET))
    layer_caches = cache if backend == "mlx" else cache.layers
    for layer in layer_caches:
        assert layer.keys is None and layer.values is None  # the full cache is released
        held = sum(a.nbytes if backend == "mlx" else a.numel() * a.element_size() for a in layer.decoder.arrays)
        assert layer.nbytes == held == 2 * kv_heads * (BUDGET + 1) * head_dim * 4
    assert run.kv_bytes(cache) == 2 * layers * kv_heads * (BUDGET + 1) * head_dim * 4


@needs_torch
@pytest.mark.parametrize("family", FAMILIES)
def test_full_matches_transformers_generate(checkpoints, models, family):
    import torch
    from transformers import AutoModelForCausalLM

    ours = models(family, "torch").generate(PROMPT, policy=sagekv.Full(), max_tokens=20)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([models(family, "torch").encode(PROMPT)])
    out = reference.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    expected = out[0, ids.shape[1] :].tolist()
    eos = reference.generation_config.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos)]
    assert ours.tokens == expected


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_full_attention_decodes_as_the_library_does(models, backend, monkeypatch):
    """After selection under full attention a decode step observes no query and, on torch, calls
    transformers' SDPA attention with no mask, as its own decode does (SDPA's fast path)."""
    model = models("llama", backend)
    run = model.runner
    prefilled = model.prefill(model.encode(PROMPT))
    run.compress(prefilled.cache, sagekv.Full())
    layers = prefilled.cache if backend == "mlx" else prefilled.cache.layers
    masks = []
    if backend == "torch":
        import sagekv.backends.torch as backend_module

        sdpa = backend_module.sdpa_attention_forward
        monkeypatch.setattr(backend_module, "sdpa_attention_forward",
                            lambda module, q, k, v, mask, **kwargs: masks.append(mask) or sdpa(module, q, k, v, mask, **kwargs))
    token = run.next_token(prefilled.logits)
    for _ in range(3):
        token = run.next_token(run.forward(token, prefilled.cache))
    assert all(layer.queries is None and layer.decoder is None for layer in layers)
    assert masks == ([None] * 3 * run.num_layers if backend == "torch" else [])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_positions_continue_after_eviction(models, backend):
    """Decode steps after eviction use RoPE positions N, N+1, ... (not the shrunken length)."""
    model = models("llama", backend)
    run = model.runner
    ids = model.encode(PROMPT)
    cache = run.new_cache()
    run.prefill(ids[:-1], cache)
    run.forward(ids[-1:], cache)
    run.compress(cache, sagekv.SageKV(BUDGET))
    position = (lambda: cache[0].offset) if backend == "mlx" else cache.get_seq_length  # what RoPE reads
    layer = cache[0] if backend == "mlx" else cache.layers[0]
    assert position() == len(ids) and layer.decoder.length == len(ids)
    run.forward([65], cache)
    assert position() == len(ids) + 1
    assert layer.decoder.shared_positions.max() == len(ids)
    assert layer.decoder.shared_k.shape[2] == layer.decoder.layout.sink + layer.decoder.layout.recent + 1


@pytest.mark.parametrize("policy", POLICIES[1:], ids=repr)
def test_torch_decode_step_after_eviction_is_the_same_graph_every_step(models, policy):
    """Nothing a decode step computes with comes from the host per step (ring slot, positions): traced
    at three steps it is one graph over the same tensors, written in place, so one captured step (a
    CUDA graph) can replay every later one. The traced steps and a replay give generate's tokens."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    model = models("llama", "torch")
    run = model.runner
    prefilled = model.prefill(model.encode(PROMPT))
    run.compress(prefilled.cache, policy)
    token, tokens, graphs = run.next_token(prefilled.logits), [], []
    for _ in range(3):
        tokens.append(run.token_id(token))
        logits = []  # tracing runs the step
        graphs.append(make_fx(lambda x: logits.append(run.forward(x, prefilled.cache)) or logits[0])(token))
        token = run.next_token(logits[0])
    tokens.append(run.token_id(token))
    with torch.inference_mode():  # as Runner.forward: the cache's tensors are inference tensors
        tokens.append(run.token_id(run.next_token(graphs[-1](token))))  # the last step's graph replayed as the next
    tensors = [[tensor for _, tensor in graph.named_buffers()] for graph in graphs]  # weights and cache state
    assert all(graph.code == graphs[0].code for graph in graphs)
    assert all(len(held) == len(tensors[0]) and all(a is b for a, b in zip(held, tensors[0])) for held in tensors)
    assert tokens == model.generate(PROMPT, policy=policy, max_tokens=5).tokens


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_one_prefill_serves_many_policies(models, backend):
    model = models("llama", backend)
    ids = model.encode(PROMPT)
    policies = [sagekv.SageKV(BUDGET), sagekv.Full(), sagekv.SnapKV(BUDGET, window=8), sagekv.Quest(32, page=8, dense_layers=1)]
    window = max(p.observed_queries for p in policies)
    prefilled = model.prefill(ids, window)
    before = model.runner.kv_bytes(prefilled.cache)
    for policy in policies + policies[:1]:
        shared = model.decode(prefilled, policy, 12)
        alone = model.generate_ids(ids, policy, 12)
        assert shared.tokens == alone.tokens, policy
        assert same_kept(shared.kept_positions, alone.kept_positions)
    assert model.runner.kv_bytes(prefilled.cache) == before


def test_generate_frees_the_evicted_entries(models):
    import gc
    import weakref

    model = models("llama", "torch")
    prefilled = model.prefill(model.encode(PROMPT))
    full_keys = weakref.ref(prefilled.cache.layers[0].keys)
    kept = model.decode(prefilled, sagekv.SageKV(BUDGET), 4, keep_prefill=False)
    gc.collect()
    assert full_keys() is None and prefilled.cache is None
    assert kept.stats.kept_kv_bytes < kept.stats.full_kv_bytes


@needs_mlx
@needs_torch
def test_llama3_rope_scaling_agrees(tmp_path):
    """Llama-3.1 checkpoints nest their RoPE scaling in rope_parameters (transformers 5)."""
    from sagekv.checkpoints import make_tiny_checkpoint
    from sagekv.tasks import generate

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    path = make_tiny_checkpoint(tmp_path / "llama3", "llama", seed=1, rope_parameters=rope, rope_theta=None)
    prompt = generate("single_needle", 1500, 0).prompt
    models = {b: sagekv.load(path, backend=b, device="cpu", dtype="float32") for b in ("mlx", "torch")}
    ids = models["torch"].encode(prompt)
    np.testing.assert_allclose(prefill_logits(models["mlx"], ids, 512), prefill_logits(models["torch"], ids, 512), rtol=1e-4, atol=1e-4)
    results = [m.generate(prompt, policy=sagekv.SageKV(64), max_tokens=12) for m in models.values()]
    assert results[0].tokens == results[1].tokens and same_kept(results[0].kept_positions, results[1].kept_positions)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_chat_template(tmp_path, backend):
    pytest.importorskip("mlx_lm" if backend == "mlx" else "torch")
    from transformers import AutoTokenizer

    from sagekv.checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "chat", "llama", seed=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = "<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    tokenizer.save_pretrained(path)
    model = sagekv.load(path, backend=backend, device="cpu", dtype="float32")
    ids = model.encode("What is 2+2?", chat=True)
    assert ids == [256] + list(b"[user] What is 2+2?\n[assistant] ")  # one <s>, written by the template
    result = model.generate("What is 2+2?", policy=sagekv.SageKV(8), max_tokens=3, chat=True)
    assert result.prompt_tokens == len(ids)
    plain = sagekv.load(make_tiny_checkpoint(tmp_path / "plain", "llama"), backend=backend, device="cpu")
    with pytest.raises(sagekv.SageKVError, match="has no chat template"):
        plain.generate("hi", chat=True)


def test_on_token_sees_every_step(models):
    model = models("llama", "torch")
    seen = []
    result = model.generate(PROMPT, policy=sagekv.SageKV(BUDGET), max_tokens=8, on_token=lambda t: seen.append(list(t)))
    assert seen == [result.tokens[: i + 1] for i in range(len(result.tokens))]
