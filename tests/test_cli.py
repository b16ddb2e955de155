"""The command line: JSON output, and one-line errors with a non-zero exit for bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import needs_torch
from sagekv.policies import DEFAULT_POLICY


def sagekv(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sagekv.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    from sagekv.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli") / "llama", "llama", seed=1)


@needs_torch
def test_run_json(checkpoint):
    out = sagekv("run", "--backend", "torch", "--model", checkpoint, "--budget", "16", "--max-tokens", "5",
                 "--prompt", "hello there, general kenobi " * 4, "--json", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert set(record) == {"text", "tokens", "prompt_tokens", "policy", "backend", "model", "kv", "timing"}
    assert len(record["tokens"]) == 5 and record["prompt_tokens"] == 4 * 28 + 1
    assert record["policy"] == {"name": DEFAULT_POLICY, "budget": 16}
    assert record["backend"] == "torch"
    assert record["kv"]["kept_bytes"] == 2 * 2 * 2 * 17 * 16 * 4 < record["kv"]["full_bytes"]
    assert set(record["timing"]) == {"prefill_s", "select_s", "decode_s", "decode_tokens_per_s"}


@needs_torch
def test_run_prompt_file_and_text_output(checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a long prompt " * 10)
    out = sagekv("run", "--backend", "torch", "--model", checkpoint, "--policy", "streaming", "--budget", "8",
                 "--prompt-file", str(prompt), "--max-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert "streaming budget 8" in out.stderr and "KV" in out.stderr


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("negative budget", "budget must be >= 1"),
        ("fractional budget", "'1.5' is not a valid integer"),
        ("unknown policy", "'h2o' is not one of"),
        ("unknown backend", "'jax' is not one of"),
        ("missing model", "model path not found"),
        ("corrupt config", "cannot read"),
        ("no config", "no config.json"),
        ("unsupported type", "unsupported model type 'gpt2'"),
        ("empty prompt", "the prompt is empty"),
        ("missing prompt file", "cannot read prompt file"),
        ("negative max tokens", "--max-tokens must be >= 0"),
        ("missing budget", "--budget is required"),
        ("no model", "no model given and the bundled reference model is not installed"),
        ("unknown mlx device", "MLX devices are 'cpu' and 'gpu'"),
    ],
)
def test_bad_input_gives_one_line(case, message, tmp_path, checkpoint):
    from sagekv.generate import REFERENCE_MODEL

    if case == "no model" and os.path.exists(os.path.join(REFERENCE_MODEL, "config.json")):
        pytest.skip("the bundled reference model is installed")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    write(corrupt / "config.json", "{not json")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    write(gpt2 / "config.json", json.dumps({"model_type": "gpt2"}))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    base = ["run", "--backend", "torch", "--model", checkpoint, "--budget", "8", "--prompt", "hi there"]
    args = {
        "negative budget": base + ["--budget", "-3"],
        "fractional budget": base + ["--budget", "1.5"],
        "unknown policy": base + ["--policy", "h2o"],
        "unknown backend": base + ["--backend", "jax"],
        "missing model": base + ["--model", str(tmp_path / "does-not-exist")],
        "corrupt config": base + ["--model", str(corrupt)],
        "no config": base + ["--model", str(empty_dir)],
        "unsupported type": base + ["--model", str(gpt2)],
        "empty prompt": base + ["--prompt", "   "],
        "missing prompt file": ["run", "--model", checkpoint, "--budget", "8", "--prompt-file", str(tmp_path / "nope.txt")],
        "negative max tokens": base + ["--max-tokens", "-1"],
        "missing budget": ["run", "--model", checkpoint, "--prompt", "hi"],
        "no model": ["run", "--budget", "8", "--prompt", "hi"],
        "unknown mlx device": base + ["--backend", "mlx", "--device", "banana"],
    }[case]
    out = sagekv(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_core_import_does_not_load_backends():
    code = "import sys, sagekv; print(any(m.split('.')[0] in ('mlx', 'torch', 'transformers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_errors_are_sagekv_errors(tmp_path):
    import sagekv

    with pytest.raises(sagekv.SageKVError, match="unknown backend"):
        sagekv.load(str(tmp_path), backend="tpu")
    with pytest.raises(sagekv.SageKVError, match="unknown dtype"):
        sagekv.load(str(tmp_path), backend="torch", dtype="int3")
    assert os.path.isdir(tmp_path)


@needs_torch
def test_run_without_prompt_shows_the_built_in_example(checkpoint):
    out = sagekv("run", "--backend", "torch", "--model", checkpoint, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Built-in example: multi_key" in text and "expected" in text and "full attention" in text
    assert f"{DEFAULT_POLICY} B=256" in text and "of full" in text and "positions per head" in text
    record = json.loads(sagekv("run", "--backend", "torch", "--model", checkpoint, "--json", "--policy", "streaming").stdout)
    assert record["policy"] == {"name": "streaming", "budget": 256} and record["task"] == "multi_key"
    assert record["expected"].isdigit() and record["kv"]["kept_bytes"] < record["kv"]["full_bytes"]


@needs_torch
def test_streamed_text_equals_the_json_text(checkpoint):
    args = ["run", "--backend", "torch", "--model", checkpoint, "--budget", "16", "--max-tokens", "20",
            "--prompt", "the streamed text is the whole text " * 3]
    streamed = sagekv(*args)
    record = json.loads(sagekv(*args, "--json").stdout)
    assert streamed.returncode == 0 and streamed.stdout == record["text"] + "\n"
