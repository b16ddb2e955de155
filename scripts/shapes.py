"""Model shapes the benchmarks build with random weights (a config-only folder, the weights made on the device)."""

import os
import tempfile

import sagekv
from sagekv.checkpoints import byte_tokenizer, make_tiny_checkpoint, tiny_config

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
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


def random_model(shape: str, device: str, dtype: str, backend: str = "torch"):
    """A llama model of ``shape`` with random weights: built on the device (torch), or saved once and
    loaded (MLX, whose runner loads checkpoints only)."""
    with tempfile.TemporaryDirectory() as path:
        if backend == "torch":
            tiny_config("llama", **SHAPES[shape]).save_pretrained(path)
            byte_tokenizer().save_pretrained(path)
            return sagekv.load(path, backend="torch", device=device, dtype=dtype, random_weights=True)
        folder = make_tiny_checkpoint(os.path.join(path, shape), "llama", dtype=dtype, **SHAPES[shape])
        return sagekv.load(folder, backend="mlx", device=device, dtype=dtype)
