"""Small checkpoints in the real Hugging Face format, built locally (nothing is downloaded).

Tests and the demo use tiny random models of each supported family; the tokenizer is
byte-level (one token per UTF-8 byte plus <s> and </s>), so it needs no training data.
Needs transformers, tokenizers and torch, imported only when called.
"""

from __future__ import annotations

FAMILIES = {
    # family: (config class name, extra config fields); head counts give GQA groups 4, 2, 7, 4
    "llama": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16)),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=7, num_key_value_heads=1, head_dim=16, hidden_size=112)),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=32)),
}
BYTE_VOCAB = 256
BOS, EOS = "<s>", "</s>"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Llama shapes the benchmarks build with random weights (see random_model)
SHAPES = {
    "llama3-8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_parameters=LLAMA3_ROPE, rope_theta=None, initializer_range=0.02),
    "small": dict(num_hidden_layers=8, hidden_size=256, intermediate_size=768, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=65536),
    # a cache far larger than the weights: many layers and KV heads over a narrow residual stream
    "cache-heavy": dict(num_hidden_layers=16, hidden_size=64, intermediate_size=128, num_attention_heads=8,
                        num_key_value_heads=8, head_dim=64, max_position_embeddings=65536),
    "tiny": dict(num_hidden_layers=4, max_position_embeddings=65536),
}


def byte_tokenizer():
    """A fast byte-level tokenizer: ids 0-255 are bytes, 256 is <s> (prepended), 257 is </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
    mapping = _bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(BYTE_VOCAB)}
    assert set(vocab) == set(byte_chars)
    vocab[BOS], vocab[EOS] = BYTE_VOCAB, BYTE_VOCAB + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BYTE_VOCAB)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table, which ByteLevel uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(BYTE_VOCAB):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(BYTE_VOCAB + extra)
            extra += 1
    return chars


def tiny_config(family: str, **overrides):
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (choose from: {', '.join(FAMILIES)})")
    class_name, fields = FAMILIES[family]
    settings = dict(
        vocab_size=BYTE_VOCAB + 2,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=4096,
        rope_theta=500000.0,  # not mlx-lm's default, so the nested rope_parameters must be read
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=BYTE_VOCAB,
        eos_token_id=BYTE_VOCAB + 1,
    )
    settings.update(fields)
    settings.update(overrides)
    return getattr(transformers, class_name)(**settings)


def make_tiny_checkpoint(path, family: str = "llama", seed: int = 0, dtype: str = "float32", **overrides) -> str:
    """Save a random model of ``family`` with the byte tokenizer to ``path``; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def random_model(shape: str, device=None, dtype=None, backend: str = "torch"):
    """A Llama model of ``shape`` (:data:`SHAPES`) with random weights: built on the device from a
    config-only folder (torch: no weights file written), or saved once and loaded (MLX, whose runner
    loads checkpoints only)."""
    import os
    import tempfile

    import sagekv

    with tempfile.TemporaryDirectory() as path:
        if backend == "torch":
            tiny_config("llama", **SHAPES[shape]).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            return sagekv.load(path, backend="torch", device=device, dtype=dtype, random_weights=True)
        folder = make_tiny_checkpoint(os.path.join(path, shape), "llama", dtype=dtype or "float32", **SHAPES[shape])
        return sagekv.load(folder, backend="mlx", device=device, dtype=dtype)


def bench_model(model, shape: str, device=None, dtype=None, backend: str = "torch"):
    """What a benchmark runs on: ``model`` as :func:`sagekv.load` takes it ("" for the bundled reference
    model, in its own dtype unless ``dtype``), or when None a random model of ``shape`` (float32 unless ``dtype``)."""
    if model is None:
        return random_model(shape, device, dtype or "float32", backend)
    import sagekv

    return sagekv.load(model or None, backend=backend, device=device, dtype=dtype)


def device_name(device) -> str:
    """The device a benchmark ran on, as its table names it: a CUDA GPU's name (torch's "cuda..."), an MLX
    GPU's ("gpu"), else "cpu" with the processor's model."""
    device = str(device or "cpu")
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    if device == "gpu":
        import mlx.core as mx

        return mx.device_info().get("device_name", "gpu")
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        name = platform.processor() or platform.machine()
    return f"cpu ({name})"


def add_model_option(parser) -> None:
    """The benchmarks' --model: run on a checkpoint (or with no value the bundled reference model) rather than --shape."""
    parser.add_argument("--model", nargs="?", const="", default=None,
                        help="a path or name sagekv.load takes, or no value for the bundled reference model "
                             "(default: a random model of --shape)")
