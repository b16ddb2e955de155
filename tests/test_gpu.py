"""CUDA runs of both backends against the CPU torch results (skipped without a GPU)."""

import numpy as np
import pytest

import sagekv

FAMILIES = ["llama", "qwen2"]
PROMPT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
POLICIES = [sagekv.Full(), sagekv.SageKV(32), sagekv.SageKV(32, group="kv_head"), sagekv.StreamingLLM(32)]


def torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch


def mlx_gpu():
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    if not mx.is_available(mx.gpu):
        pytest.skip("MLX has no GPU device here")
    return mx


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    pytest.importorskip("transformers")
    from sagekv.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("gpu")
    return {family: make_tiny_checkpoint(root / family, family, seed=3) for family in FAMILIES}


def results(path, backend, device):
    model = sagekv.load(path, backend=backend, device=device, dtype="float32")
    return [model.generate(PROMPT, policy=p, max_tokens=24) for p in POLICIES]


def assert_same(got, expected):
    for a, b in zip(got, expected):
        assert a.tokens == b.tokens
        assert (a.kept_positions is None) == (b.kept_positions is None)
        if a.kept_positions is not None:
            assert all(np.array_equal(x, y) for x, y in zip(a.kept_positions, b.kept_positions))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_cuda_matches_cpu(checkpoints, family):
    torch_cuda()
    assert_same(results(checkpoints[family], "torch", "cuda"), results(checkpoints[family], "torch", "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_mlx_cuda_matches_torch_cpu(checkpoints, family):
    mlx_gpu()
    pytest.importorskip("torch")
    assert_same(results(checkpoints[family], "mlx", "gpu"), results(checkpoints[family], "torch", "cpu"))


@pytest.mark.gpu
def test_torch_cuda_releases_full_cache(tmp_path):
    torch = torch_cuda()
    from sagekv.checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "wide", "llama", num_hidden_layers=4, num_key_value_heads=4, num_attention_heads=8)
    run = sagekv.load(path, backend="torch", device="cuda", dtype="bfloat16").runner
    ids = [65 + i % 26 for i in range(8192)]
    cache = run.new_cache()
    run.prefill(ids[:-1], cache)
    run.forward(ids[-1:], cache)
    full = run.kv_bytes(cache)
    assert full == 2 * 4 * 4 * 8192 * 16 * 2
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    run.compress(cache, sagekv.SageKV(256))
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    kept = run.kv_bytes(cache)
    assert kept == 2 * 4 * 4 * 257 * 16 * 2
    assert before - after >= 0.95 * (full - kept)
    token = run.token_id(run.next_token(run.forward([66], cache)))
    assert 0 <= token < 258


@pytest.mark.gpu
def test_torch_cuda_selection_never_waits_for_the_device(checkpoints):
    """No policy's selection makes the host wait for the GPU (torch raises on any call that would)."""
    torch = torch_cuda()
    from sagekv.policies import NAMED, make_policy

    model = sagekv.load(checkpoints["llama"], backend="torch", device="cuda", dtype="float32")
    for name in NAMED:
        policy = make_policy(name, 32)
        cache = model.prefill(model.encode(PROMPT), policy.observed_queries).cache
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.runner.compress(cache, policy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(model.runner.kept(cache)) == model.runner.num_layers


RAG_DOCUMENTS = ["Alpha beta gamma delta. The key for door seven is 4821. " * 3, "Eta theta iota kappa lambda. " * 5]
RAG_QUESTION = "Question: what is the key for door seven? Answer:"


@pytest.mark.gpu
def test_torch_cuda_rag_matches_cpu(tmp_path):
    torch_cuda()
    from sagekv.checkpoints import make_tiny_checkpoint
    from sagekv.rag import METHODS

    path = make_tiny_checkpoint(tmp_path / "rag", "llama", seed=3, num_hidden_layers=4)
    cpu, gpu = (sagekv.load(path, backend="torch", device=device, dtype="float32") for device in ("cpu", "cuda"))
    for method in METHODS:
        a = gpu.rag(RAG_DOCUMENTS, RAG_QUESTION, method=method, max_tokens=8)
        b = cpu.rag(RAG_DOCUMENTS, RAG_QUESTION, method=method, max_tokens=8)
        assert a.tokens == b.tokens and a.rag.kept_tokens == b.rag.kept_tokens, method


STATIC = ["sagekv_kv_follow", "sagekv", "snapkv", "streaming", "tova", "knorm", "random"]
CLOSE = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_cuda_graph_steps_match_eager(checkpoints, dtype):
    """Every policy whose decode cache is static: the captured step gives eager's token at every step, past
    two turns of the ring, with the same positions written, and a replayed step never waits for the device."""
    torch = torch_cuda()
    from sagekv.backends.torch import CudaGraphs
    from sagekv.policies import make_policy

    model = sagekv.load(checkpoints["llama"], backend="torch", device="cuda", dtype=dtype)
    run = model.runner
    assert run.graphs is CudaGraphs
    for name in STATIC:
        policy = make_policy(name, 32)
        prefilled = model.prefill(model.encode(PROMPT), policy.observed_queries)
        eager, captured = (model.select(prefilled, policy).cache for _ in range(2))
        token = run.next_token(prefilled.logits)
        for index in range(2 * captured.layers[0].decoder.ring_size + 3):
            run.graphs = None
            expected = run.forward(token, eager)
            run.graphs = CudaGraphs
            if index >= 2:  # replays: the warm-up and the capture wait for the device by design
                torch.cuda.set_sync_debug_mode("error")
            try:
                got = run.forward(token, captured)
                ahead = run.next_token(got)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            token = run.next_token(expected)
            assert run.token_id(ahead) == run.token_id(token), (name, index)
            torch.testing.assert_close(got.float(), expected.float(), rtol=CLOSE[dtype], atol=CLOSE[dtype])
            assert captured.get_seq_length() == eager.get_seq_length() and captured.counted == eager.counted
            assert torch.equal(captured.position, eager.position)
            for a, b in zip(captured.layers, eager.layers):
                assert torch.equal(a.decoder.step, b.decoder.step)
                assert all(torch.equal(x, y) for x, y in zip(a.decoder.position_arrays, b.decoder.position_arrays))
        assert captured.graph.replay is not None, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_cuda_graph_decode_gives_eager_tokens(checkpoints, dtype):
    """generate's loop on captured steps (tokens read from pinned memory): eager's tokens, each streamed in order."""
    torch_cuda()
    from sagekv.backends.torch import CudaGraphs

    model = sagekv.load(checkpoints["qwen2"], backend="torch", device="cuda", dtype=dtype)
    run = model.runner
    prefilled = model.prefill(model.encode(PROMPT))
    streamed = {}
    for graphs in (None, CudaGraphs):
        run.graphs, seen = graphs, []
        result = model.decode(prefilled, sagekv.make_policy("sagekv_kv_follow", 32), 48, on_token=lambda t: seen.append(list(t)))
        streamed[graphs] = (result.tokens, seen)
    assert streamed[CudaGraphs] == streamed[None]
    tokens, seen = streamed[None]
    assert seen == [tokens[: i + 1] for i in range(len(tokens))] and len(tokens) >= 8


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["full", "sagekv", "sagekv_kv_follow"])
def test_torch_cuda_batch_replays_and_matches_each_prompt_alone(checkpoints, name):
    """A batch (a short prompt that keeps everything, padded, beside longer ones) on captured steps: eager's
    tokens, which are each prompt's alone on the CPU; a replayed batch step never waits for the device."""
    torch = torch_cuda()
    from sagekv.backends.torch import CudaGraphs

    prompts = ["Door seven: 4821.", PROMPT, PROMPT[7:] * 2]
    policy = sagekv.make_policy(name, 32)
    model = sagekv.load(checkpoints["llama"], backend="torch", device="cuda", dtype="float32")
    run = model.runner
    cpu = sagekv.load(checkpoints["llama"], backend="torch", device="cpu", dtype="float32")
    alone = [cpu.generate(prompt, policy, 40).tokens for prompt in prompts]
    batches = {}
    for graphs in (None, CudaGraphs):
        run.graphs = graphs
        batches[graphs] = [r.tokens for r in model.generate_batch(prompts, policy, 40)]
    assert batches[CudaGraphs] == batches[None] == alone
    prefilled = [model.select(model.prefill(model.encode(p)), policy, keep_prefill=False) for p in prompts]
    cache = model.stack([p.cache for p in prefilled], 40)
    token = run.next_tokens(torch.stack([p.logits for p in prefilled]))
    for index in range(12):
        if index >= 2:  # replays: the warm-up and the capture wait for the device by design
            torch.cuda.set_sync_debug_mode("error")
        try:
            token = run.next_tokens(run.forward(token, cache))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.graph.replay is not None



@pytest.mark.gpu
def test_two_gpus_sharded_by_heads_give_one_gpu_tokens(tmp_path):
    import json

    from conftest import run_script

    if torch_cuda().cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    report = tmp_path / "tp.json"
    done = run_script("bench_tp.py", "--gpus", "2", "--length", "2048", "--budget", "256", "--max-tokens", "24",
                      "--json", str(report))
    assert done.returncode == 0, done.stderr + done.stdout
    one, sharded = json.loads(report.read_text())["runs"]
    assert one["device"].startswith("cuda") and sharded["processes"] == 2
    assert all(a["tokens"] == b["tokens"] for a, b in zip(one["rows"], sharded["rows"]))
