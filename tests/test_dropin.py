"""Drop-in use: a policy's cache in transformers' and mlx-lm's own generate loops gives the tokens of
SageModel.generate with the same policy, on tiny random checkpoints loaded by each library's own loader."""

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pytest

import sagekv
from conftest import needs_mlx, needs_torch, to_numpy

PROMPT = "Alpha beta gamma delta. The key for door seven is 4821. Epsilon zeta eta theta iota. " * 3
TOKENS = 24
EOS = 257  # the byte tokenizer's </s>

POLICIES = [
    sagekv.Full(),
    sagekv.make_policy("sagekv_kv_follow", 32),
    sagekv.SageKV(32),
    sagekv.SnapKV(48, window=8),
    sagekv.StreamingLLM(32),
    sagekv.Quest(32, page=8, dense_layers=1),
]
NAMES = ["full", "sagekv_kv_follow", "sagekv", "snapkv", "streaming", "quest"]
# transformers 5.24 renamed generate's past_key_values to cache; 5.17 knows only the old name
OLD_NAME = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def until_eos(tokens) -> list:
    """Generated ids up to the end-of-sequence token, which SageModel.generate does not return."""
    tokens = list(tokens)
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


@dataclass(frozen=True)
class RecordedSnapKV(sagekv.SnapKV):
    """SnapKV that keeps the queries each layer's selection is given."""

    seen: list = field(default_factory=list, compare=False, repr=False)

    def decode_cache(self, ops, queries, keys, values, layer):
        self.seen.append(to_numpy(queries))
        return super().decode_cache(ops, queries, keys, values, layer)


# transformers


def load_transformers(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # its default attention, SDPA


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    """hf_models(family): the checkpoint loaded once by transformers itself."""
    loaded = {}

    def get(family):
        if family not in loaded:
            loaded[family] = load_transformers(tiny_checkpoints[family])
        return loaded[family]

    return get


def hf_generate(hf, ids, cache, tokens=TOKENS, **settings):
    import torch

    return hf.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=tokens, **settings)


@needs_torch
@OLD_NAME
@pytest.mark.parametrize("policy", POLICIES, ids=NAMES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_transformers_generate_gives_sagekv_tokens(tiny_models, hf_models, family, policy):
    model, hf = tiny_models(family, "torch"), hf_models(family)
    ids = model.encode(PROMPT)
    cache = sagekv.cache_for(hf, policy)
    out = hf_generate(hf, ids, cache, do_sample=False)
    assert until_eos(out[0, len(ids):].tolist()) == model.generate(PROMPT, policy=policy, max_tokens=TOKENS).tokens
    assert all(layer.selected for layer in cache.layers)


@needs_torch
@OLD_NAME
def test_transformers_selection_sees_sagekvs_queries(tiny_models, hf_models):
    """generate prefills the prompt in one call; the policy still gets the last W queries that sagekv's own
    prefill (all tokens but the last, then the last alone) gives it."""
    model, hf = tiny_models("llama", "torch"), hf_models("llama")
    own, dropin = RecordedSnapKV(48, window=8), RecordedSnapKV(48, window=8)
    model.generate(PROMPT, policy=own, max_tokens=2)
    hf_generate(hf, model.encode(PROMPT), sagekv.cache_for(hf, dropin), 2, do_sample=False)
    assert len(own.seen) == len(dropin.seen) == 2
    for a, b in zip(own.seen, dropin.seen):
        assert a.shape == b.shape == (8, 8, 16)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@needs_torch
@OLD_NAME
def test_transformers_shortest_prompts(tiny_models, hf_models):
    """Prompts of one and two tokens under a policy keeping only the last prompt token."""
    model, hf = tiny_models("llama", "torch"), hf_models("llama")
    policy = sagekv.SageKV(1, sink=0, topk=0, recent=0)
    for ids in ([256], [256, 65]):
        cache = sagekv.cache_for(hf, policy)
        out = hf_generate(hf, ids, cache, do_sample=False)
        assert until_eos(out[0, len(ids):].tolist()) == model.generate_ids(ids, policy, TOKENS).tokens
        assert [layer.decoder is not None for layer in cache.layers] == [len(ids) == 2] * 2


@needs_torch
@OLD_NAME
def test_transformers_sampling_decodes_on_the_sagekv_cache(tiny_models, hf_models):
    """Sampled with temperature, top-k and top-p: each step's logits are those sagekv's own loop gives
    for the same tokens."""
    import torch

    model, hf = tiny_models("llama", "torch"), hf_models("llama")
    policy = sagekv.make_policy("sagekv_kv_follow", 32)
    ids = model.encode(PROMPT)
    torch.manual_seed(0)
    out = hf_generate(hf, ids, sagekv.cache_for(hf, policy), do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                      output_logits=True, return_dict_in_generate=True)
    sampled = out.sequences[0, len(ids):].tolist()
    run = model.runner
    prefilled = model.prefill(ids, policy.observed_queries)
    run.compress(prefilled.cache, policy)
    logits = [prefilled.logits] + [run.forward([token], prefilled.cache) for token in sampled[:-1]]
    assert len(logits) == len(out.logits) > 1
    np.testing.assert_allclose(np.stack([run.logits_numpy(x) for x in logits]), torch.cat(out.logits).numpy(),
                               rtol=1e-4, atol=1e-4)


@needs_torch
def test_transformers_model_is_unchanged_for_other_caches(tiny_checkpoints):
    import torch

    hf = load_transformers(tiny_checkpoints["llama"])
    ids = torch.tensor([list(range(60, 160))])
    before = hf.generate(ids, max_new_tokens=12, do_sample=False)
    sagekv.cache_for(hf, sagekv.SageKV(32))
    assert hf.config._attn_implementation == "sagekv"
    assert torch.equal(hf.generate(ids, max_new_tokens=12, do_sample=False), before)


@needs_torch
@OLD_NAME
@pytest.mark.filterwarnings("ignore::UserWarning")  # transformers' advice on a batch without attention mask
def test_transformers_refusals(hf_models):
    import torch

    hf, policy = hf_models("llama"), sagekv.SageKV(32)
    ids = list(range(60, 160))
    one = "a sagekv cache holds one sequence, got a batch of 2"
    with pytest.raises(sagekv.SageKVError, match=one):
        hf.generate(torch.tensor([ids, ids]), past_key_values=sagekv.cache_for(hf, policy), max_new_tokens=4)
    with pytest.raises(sagekv.SageKVError, match=one):
        hf_generate(hf, ids, sagekv.cache_for(hf, policy), num_beams=2)
    with pytest.raises(sagekv.SageKVError, match=one):
        hf_generate(hf, ids, sagekv.cache_for(hf, policy), do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="cropped"):  # transformers' own refusal: the cache cannot roll back
        hf_generate(hf, ids, sagekv.cache_for(hf, policy), prompt_lookup_num_tokens=3)

    cache = sagekv.cache_for(hf, policy)
    hf_generate(hf, ids, cache)
    with pytest.raises(sagekv.SageKVError, match="serves one generate call"):
        hf_generate(hf, ids[:40], cache)
    with torch.no_grad(), pytest.raises(sagekv.SageKVError, match="takes one token per step, got 3"):
        hf(torch.tensor([ids[:3]]), past_key_values=cache)  # a loop of one's own, past the prompt

    with pytest.raises(sagekv.SageKVError, match="takes a transformers model"):
        sagekv.cache_for(torch.nn.Linear(2, 2), policy)
    with pytest.raises(sagekv.SageKVError, match="policy must be a sagekv policy"):
        sagekv.cache_for(hf, "sagekv")


# mlx-lm


@pytest.fixture(scope="module")
def mlx_models(tiny_checkpoints):
    """mlx_models(family): (model, tokenizer) loaded once by mlx-lm itself."""
    loaded = {}

    def get(family):
        if family not in loaded:
            import mlx_lm

            from sagekv.generate import legacy_rope_fields

            path = tiny_checkpoints[family]
            with open(os.path.join(path, "config.json")) as f:  # rope_theta where mlx-lm reads it
                loaded[family] = mlx_lm.load(path, model_config=legacy_rope_fields(json.load(f)))
        return loaded[family]

    return get


def mlx_generate(model, tokenizer, prompt, cache, **settings) -> list:
    import mlx_lm

    responses = mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=TOKENS, prompt_cache=cache, **settings)
    return [response.token for response in responses]


@needs_mlx
@pytest.mark.parametrize("policy", POLICIES, ids=NAMES)
def test_mlx_lm_generate_gives_sagekv_tokens(tiny_models, mlx_models, policy):
    model, (mlx_model, tokenizer) = tiny_models("llama", "mlx"), mlx_models("llama")
    cache = sagekv.prompt_cache_for(mlx_model, policy)
    assert until_eos(mlx_generate(mlx_model, tokenizer, PROMPT, cache)) == model.generate(PROMPT, policy, TOKENS).tokens
    assert all(c.selected for c in cache)


@needs_mlx
@pytest.mark.parametrize("policy", POLICIES[1:4], ids=NAMES[1:4])
def test_mlx_lm_prefill_steps(tiny_models, mlx_models, policy):
    """Whatever prefill_step_size splits the prompt into, a one-token chunk included, the last prompt
    token's step is not taken for the first decode step."""
    model, (mlx_model, tokenizer) = tiny_models("qwen2", "mlx"), mlx_models("qwen2")
    ids = model.encode(PROMPT)
    expected = model.generate(PROMPT, policy, TOKENS).tokens
    for step in (64, len(ids) - 2):  # the second leaves a chunk of one token before the last prompt token
        tokens = mlx_generate(mlx_model, tokenizer, ids, sagekv.prompt_cache_for(mlx_model, policy), prefill_step_size=step)
        assert until_eos(tokens) == expected, step


@needs_mlx
def test_mlx_lm_shortest_prompts(tiny_models, mlx_models):
    """Prompts of one and two tokens (mlx-lm runs the second as a chunk of one) under a policy keeping only
    the last prompt token."""
    model, (mlx_model, tokenizer) = tiny_models("llama", "mlx"), mlx_models("llama")
    policy = sagekv.SageKV(1, sink=0, topk=0, recent=0)
    for ids in ([256], [256, 65]):
        cache = sagekv.prompt_cache_for(mlx_model, policy)
        assert until_eos(mlx_generate(mlx_model, tokenizer, ids, cache)) == model.generate_ids(ids, policy, TOKENS).tokens
        assert [c.decoder is not None for c in cache] == [len(ids) == 2] * 2


@needs_mlx
def test_mlx_lm_sampling_decodes_on_the_sagekv_cache(tiny_models, mlx_models):
    """Sampled with temperature, top-k and top-p: each step's log-probabilities are those of sagekv's own
    loop for the same tokens."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, (mlx_model, tokenizer) = tiny_models("llama", "mlx"), mlx_models("llama")
    policy = sagekv.make_policy("sagekv_kv_follow", 32)
    ids = model.encode(PROMPT)
    mx.random.seed(0)
    responses = list(mlx_lm.stream_generate(mlx_model, tokenizer, ids, max_tokens=TOKENS, sampler=make_sampler(0.8, 0.9, top_k=50),
                                            prompt_cache=sagekv.prompt_cache_for(mlx_model, policy)))
    run = model.runner
    prefilled = model.prefill(ids, policy.observed_queries)
    run.compress(prefilled.cache, policy)
    logits = [prefilled.logits] + [run.forward([r.token], prefilled.cache) for r in responses[:-1]]
    assert len(responses) > 1
    ours = np.stack([run.logits_numpy(x - mx.logsumexp(x)) for x in logits])
    np.testing.assert_allclose(ours, np.stack([np.array(r.logprobs) for r in responses]), rtol=1e-4, atol=1e-4)


@needs_mlx
def test_mlx_lm_refusals(mlx_models):
    import mlx.core as mx
    import mlx_lm

    mlx_model, tokenizer = mlx_models("llama")
    policy = sagekv.SageKV(32)
    with pytest.raises(sagekv.SageKVError, match="cannot be quantized"):
        mlx_generate(mlx_model, tokenizer, PROMPT, sagekv.prompt_cache_for(mlx_model, policy), kv_bits=4, quantized_kv_start=0)
    with pytest.raises(ValueError, match="trimmable"):  # mlx-lm's own refusal: the cache cannot roll back
        two = sagekv.prompt_cache_for(mlx_model, policy) + sagekv.prompt_cache_for(mlx_model, policy)
        mlx_generate(mlx_model, tokenizer, PROMPT, two, draft_model=mlx_model)
    with pytest.raises(sagekv.SageKVError, match="a sagekv cache holds one sequence, got a batch of 2"):
        mlx_model(mx.array([[256, 65], [256, 66]]), cache=sagekv.prompt_cache_for(mlx_model, policy))
    cache = sagekv.prompt_cache_for(mlx_model, policy)
    mlx_generate(mlx_model, tokenizer, PROMPT, cache)
    with pytest.raises(sagekv.SageKVError, match="takes one token per step"):
        mlx_generate(mlx_model, tokenizer, PROMPT, cache)
    with pytest.raises(sagekv.SageKVError, match="takes an mlx-lm model"):
        sagekv.prompt_cache_for(mlx_lm, policy)
    with pytest.raises(sagekv.SageKVError, match="policy must be a sagekv policy"):
        sagekv.prompt_cache_for(mlx_model, None)
