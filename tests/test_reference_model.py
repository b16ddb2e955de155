"""The bundled reference model: its files, both loaders, and the answers it gives (issue 3)."""

import json
import os

import numpy as np
import pytest

from conftest import HAVE_MLX, needs_torch
from sagekv.generate import REFERENCE_MODEL

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(REFERENCE_MODEL, "config.json")),
                                reason="the reference model is not bundled yet")
MAX_BYTES = 25 * 2**20


def test_files_format_and_size():
    names = set(os.listdir(REFERENCE_MODEL))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert sum(os.path.getsize(os.path.join(REFERENCE_MODEL, name)) for name in names) <= MAX_BYTES
    config = json.loads(open(os.path.join(REFERENCE_MODEL, "config.json")).read())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    assert config["num_attention_heads"] == 4 * config["num_key_value_heads"]  # GQA group size 4, as Llama-3
    assert config["max_position_embeddings"] >= 8192
    card = open(os.path.join(REFERENCE_MODEL, "README.md")).read()
    assert "not a chat" in card and "| single_needle |" in card and "| multi_doc_qa_2hop |" in card


@needs_torch
@pytest.mark.skipif(not HAVE_MLX, reason="mlx and mlx-lm are not installed")
@pytest.mark.parametrize("task", ["single_needle", "multi_key", "multi_doc_qa"])
def test_both_backends_give_the_same_right_answer(task):
    import sagekv
    from sagekv import tasks
    from sagekv.policies import DEFAULT_POLICY, Full, SageKV, make_policy

    sample = tasks.generate(task, 1024, 0)  # MLX on a Linux CPU is slow (a 2K prefill takes ~30 s)
    max_tokens = len(sample.answer) + 2
    results = {}
    for backend in ("torch", "mlx"):
        model = sagekv.load(backend=backend, dtype="float32")
        assert model.name == "sagekv reference model"  # reports name it, not a path on this machine
        ids = model.encode(sample.prompt)
        prefilled = model.prefill(ids, 1)
        policies = (Full(), SageKV(256, pool=9), make_policy(DEFAULT_POLICY, 256))
        results[backend] = [model.decode(prefilled, policy, max_tokens) for policy in policies]
    assert tasks.score(sample, results["torch"][0].text) == 1.0  # full attention answers it
    for on_torch, on_mlx in zip(results["torch"], results["mlx"]):
        assert on_torch.tokens == on_mlx.tokens
        assert (on_torch.kept_positions is None) == (on_mlx.kept_positions is None)
        for a, b in zip(on_torch.kept_positions or [], on_mlx.kept_positions or []):
            np.testing.assert_array_equal(a, b)


@needs_torch
def test_main_job_answers_the_built_in_example():
    """`sagekv run` with no arguments (the README's main job) on the bundled model, with full attention right."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sagekv.cli", "run", "--backend", "torch", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["model"] == "sagekv reference model" and record["task"] == "multi_key"
    assert record["full_text"].strip() == record["expected"]
    assert record["kv"]["kept_bytes"] < record["kv"]["full_bytes"] / 10
