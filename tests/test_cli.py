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
def test_run_json_sampled_records_its_settings_and_repeats_with_its_seed(checkpoint):
    args = ["run", "--backend", "torch", "--model", checkpoint, "--max-tokens", "8", "--prompt", "hello there " * 4, "--json",
            "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40"]
    first = json.loads(sagekv(*args, "--seed", "7").stdout)
    assert first["sampling"] == {"temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}
    assert json.loads(sagekv(*args, "--seed", "7").stdout)["tokens"] == first["tokens"]
    drawn = json.loads(sagekv(*args).stdout)  # no seed: a fresh one, reported so the text can be repeated
    assert json.loads(sagekv(*args, "--seed", str(drawn["sampling"]["seed"])).stdout)["tokens"] == drawn["tokens"]


@needs_torch
def test_a_prompt_without_a_budget_gets_the_default_one(checkpoint):
    from sagekv.cli import PROMPT_BUDGET

    out = sagekv("run", "--backend", "torch", "--model", checkpoint, "--max-tokens", "2", "--prompt", "hi " * 600, "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["policy"] == {"name": DEFAULT_POLICY, "budget": PROMPT_BUDGET}
    assert record["kv"]["kept_bytes"] == 2 * 2 * 2 * (PROMPT_BUDGET + 1) * 16 * 4 < record["kv"]["full_bytes"]


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
        ("no model", "no model given and the bundled reference model is not installed"),
        ("unknown mlx device", "MLX devices are 'cpu' and 'gpu'"),
        ("chat with the example", "--chat needs --prompt or --prompt-file"),
        ("negative max tokens with the example", "--max-tokens must be >= 0, got -3"),
        ("mistral sliding window", "sliding_window=64 is not supported"),
        ("qwen sliding window", "sliding_window=64 is not supported"),
        ("soft-capping", "attn_logit_softcapping=50.0 is not supported"),
        ("negative temperature", "temperature must be a finite number >= 0, got -1.0"),
        ("top-p above 1", "top_p must be a number in (0, 1], got 1.5"),
        ("negative top-k", "top_k must be an integer >= 0, got -2"),
        ("negative seed", "seed must be an integer in 0..2**63-1 or None, got -5"),
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
    configs = {  # refused before the weights are looked for
        "mistral sliding window": {"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 4096},
        "qwen sliding window": {"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True,
                                "layer_types": ["full_attention", "sliding_attention"]},
        "soft-capping": {"model_type": "llama", "attn_logit_softcapping": 50.0},
    }
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        write(tmp_path / name / "config.json", json.dumps(config))
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
        "no model": ["run", "--budget", "8", "--prompt", "hi"],
        "unknown mlx device": base + ["--backend", "mlx", "--device", "banana"],
        "chat with the example": ["run", "--model", checkpoint, "--chat"],
        "negative max tokens with the example": ["run", "--model", checkpoint, "--max-tokens", "-3"],
        **{name: base + ["--model", str(tmp_path / name)] for name in configs},
        "negative temperature": base + ["--temperature", "-1"],
        "top-p above 1": base + ["--temperature", "1", "--top-p", "1.5"],
        "negative top-k": base + ["--top-k", "-2"],
        "negative seed": base + ["--seed", "-5"],
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


def test_only_an_active_sliding_window_is_refused():
    from sagekv.generate import check_attention

    check_attention({"model_type": "mistral", "sliding_window": None, "max_position_embeddings": 4096})
    check_attention({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 4096})
    check_attention({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": False})
    check_attention({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True, "num_hidden_layers": 24,
                     "max_window_layers": 28})  # transformers slides only from layer max_window_layers
    with pytest.raises(ValueError, match="sliding_window=64"):
        check_attention({"model_type": "qwen2", "sliding_window": 64, "use_sliding_window": True, "num_hidden_layers": 24,
                         "max_window_layers": 20})


@needs_torch
def test_run_without_prompt_shows_the_built_in_example(checkpoint):
    out = sagekv("run", "--backend", "torch", "--model", checkpoint, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Built-in example: multi_key" in text and "expected" in text and "full attention" in text
    assert f"{DEFAULT_POLICY} B=256" in text and "of full" in text and "positions per head" in text
    record = json.loads(sagekv("run", "--backend", "torch", "--model", checkpoint, "--json", "--policy", "streaming",
                               "--max-tokens", "2").stdout)
    assert record["policy"] == {"name": "streaming", "budget": 256} and record["task"] == "multi_key"
    assert record["expected"].isdigit() and record["kv"]["kept_bytes"] < record["kv"]["full_bytes"]
    assert len(record["tokens"]) <= 2  # --max-tokens is honoured


def test_interrupt_exits_130_with_one_line():
    code = ("import sys, sagekv.cli as cli\n"
            "def interrupted(*args, **kwargs): raise KeyboardInterrupt\n"
            "cli.load = interrupted\n"
            "sys.exit(cli.main(['run', '--prompt', 'hi']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 130
    assert out.stderr.strip().splitlines() == ["error: interrupted"] and out.stdout == ""


@needs_torch
def test_a_prompt_that_is_not_text_is_a_type_error(checkpoint):
    import sagekv

    with pytest.raises(sagekv.SageKVError, match="^prompt must be a str, got bytes$"):
        sagekv.load(checkpoint, backend="torch", device="cpu").generate(b"abc")


@needs_torch
def test_streamed_text_equals_the_json_text(checkpoint):
    args = ["run", "--backend", "torch", "--model", checkpoint, "--budget", "16", "--max-tokens", "20",
            "--prompt", "the streamed text is the whole text " * 3]
    streamed = sagekv(*args)
    record = json.loads(sagekv(*args, "--json").stdout)
    assert streamed.returncode == 0 and streamed.stdout == record["text"] + "\n"


DOCS = ["Document 1:\nThe key for door seven is 4821. The lamp is green.\n\n",
        "Document 2:\nMu nu xi omicron pi rho sigma tau, and the hall is long.\n\n"]
QUESTION = "Question: what is the key for door seven?\nAnswer: The key for door seven is "
RAG_JSON_FIELDS = {"text", "tokens", "method", "kept_tokens", "total_tokens", "kv_bytes", "policy", "backend", "model",
                   "ttft_s", "store_s", "decode_s", "decode_tokens_per_s"}


def doc_files(directory):
    directory.mkdir(exist_ok=True)
    return [str(write(directory / f"doc{i}.txt", text)) for i, text in enumerate(DOCS)]


def rag_args(checkpoint, docs, *extra):
    return ["rag", "--backend", "torch", "--model", checkpoint, "--device", "cpu", "--question", QUESTION,
            "--max-tokens", "6", *(a for path in docs for a in ("--doc", path)), *extra]


def stamps(directory):
    """Each file's bytes, inode and modification time: a file rewritten in place or replaced shows."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.fixture(scope="module")
def stored(checkpoint, tmp_path_factory):
    """A store written by one `sagekv rag --store` call, and that call's JSON."""
    root = tmp_path_factory.mktemp("stored")
    out = sagekv(*rag_args(checkpoint, doc_files(root / "docs"), "--store", str(root / "store"), "--json"))
    assert out.returncode == 0, out.stderr
    return root / "store", json.loads(out.stdout)


@needs_torch
def test_rag_json_and_a_reused_store(checkpoint, stored, tmp_path):
    store, record = stored
    assert set(record) == RAG_JSON_FIELDS
    assert record["method"] == "samkv" and record["policy"] == {"name": "full"} and record["backend"] == "torch"
    assert record["total_tokens"] == 1 + sum(len(d) for d in DOCS)  # <s> and one token per byte
    assert 0 < record["kept_tokens"] < record["total_tokens"] and record["kv_bytes"] > 0
    assert 0 < len(record["tokens"]) <= 6
    assert all(record[k] == round(record[k], 3) for k in ("ttft_s", "store_s", "decode_s"))
    assert len(list(store.iterdir())) == 1 + len(DOCS)  # the <s> piece and each document

    before = stamps(store)
    again = sagekv(*rag_args(checkpoint, doc_files(tmp_path / "docs"), "--store", str(store), "--json"))
    assert again.returncode == 0, again.stderr
    assert stamps(store) == before  # every document read back, no file written again
    second = json.loads(again.stdout)
    assert {k: second[k] for k in ("tokens", "kept_tokens", "kv_bytes")} == {k: record[k] for k in ("tokens", "kept_tokens", "kv_bytes")}
    in_memory = json.loads(sagekv(*rag_args(checkpoint, doc_files(tmp_path / "docs"), "--json")).stdout)
    assert in_memory["tokens"] == record["tokens"]


@needs_torch
def test_rag_text_output_with_a_policy(checkpoint, tmp_path):
    docs = doc_files(tmp_path)
    plain = json.loads(sagekv(*rag_args(checkpoint, docs, "--method", "reuse", "--json")).stdout)
    out = sagekv(*rag_args(checkpoint, docs, "--method", "reuse", "--policy", "streaming", "--budget", "8"))
    assert out.returncode == 0, out.stderr
    evicted = json.loads(sagekv(*rag_args(checkpoint, docs, "--method", "reuse", "--policy", "streaming", "--budget", "8", "--json")).stdout)
    assert out.stdout == evicted["text"] + "\n" and evicted["policy"] == {"name": "streaming", "budget": 8}
    total = 1 + sum(len(d) for d in DOCS)
    line = out.stderr.strip()
    assert len(out.stderr.strip().splitlines()) == 1
    assert line.startswith(f"[torch | reuse + streaming budget 8 | kept {total} of {total} document tokens (100.0%) | KV ")
    assert " MiB | TTFT " in line and " s | stored docs " in line and line.endswith(" tok/s]")
    assert evicted["kv_bytes"] < plain["kv_bytes"]


def corrupt(store):
    """Flip one byte in the data of the largest stored document."""
    path = max(store.iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


def other_weights(checkpoint, tmp_path) -> str:
    """A copy of the checkpoint with other weights (its last 8 bytes zeroed)."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(checkpoint, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)
    weights.write_bytes(bytes(data))
    return str(other)


def foreign(store, checkpoint, tmp_path):
    """The store as another model's: a copy of the checkpoint with other weights, its files renamed to it."""
    from sagekv.generate import weights_fingerprint

    other = other_weights(checkpoint, tmp_path)
    ours, theirs = weights_fingerprint(checkpoint), weights_fingerprint(other)
    for path in store.iterdir():
        path.rename(store / path.name.replace(ours, theirs))
    return str(other)


@needs_torch
@pytest.mark.parametrize(
    "case,message",
    [
        ("no doc", "give at least one --doc FILE"),
        ("missing doc", "cannot read document file"),
        ("doc is a directory", "cannot read document file"),
        ("doc not utf-8", "cannot read document file"),
        ("empty doc", "is empty"),
        ("no question", "give --question TEXT"),
        ("empty question", "the question is empty"),
        ("unknown method", "'h2o' is not one of"),
        ("negative max tokens", "--max-tokens must be >= 0"),
        ("too long", "exceed the 4096 positions"),
        ("store is a file", "is a file, not a directory"),
        ("corrupt store file", "is damaged (checksum mismatch); delete it"),
        ("store of another model", "belongs to another model"),
    ],
)
def test_rag_bad_input_gives_one_line_and_writes_nothing(case, message, checkpoint, stored, tmp_path):
    import shutil

    docs = doc_files(tmp_path / "docs")
    store = tmp_path / "store"
    shutil.copytree(stored[0], store)
    model = checkpoint
    if case == "corrupt store file":
        corrupt(store)
    if case == "store of another model":
        model = foreign(store, checkpoint, tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    fresh = tmp_path / "fresh"
    base = rag_args(model, docs, "--store", str(fresh))
    args = {
        "no doc": rag_args(model, [], "--store", str(fresh)),
        "missing doc": base + ["--doc", str(tmp_path / "nope.txt")],
        "doc is a directory": base + ["--doc", str(tmp_path)],
        "doc not utf-8": base + ["--doc", str(latin1)],
        "empty doc": base + ["--doc", str(write(tmp_path / "blank.txt", " \n"))],
        "no question": [a for a in base if a not in ("--question", QUESTION)],
        "empty question": base + ["--question", "  "],
        "unknown method": base + ["--method", "h2o"],
        "negative max tokens": base + ["--max-tokens", "-1"],
        "too long": base + ["--doc", str(write(tmp_path / "long.txt", "word " * 900))],
        "store is a file": rag_args(model, docs, "--store", str(write(tmp_path / "file", "x"))),
        "corrupt store file": rag_args(model, docs, "--store", str(store)),
        "store of another model": rag_args(model, docs, "--store", str(store)),
    }[case]
    before = stamps(store)
    out = sagekv(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr + out.stdout and out.stdout == ""
    assert not fresh.exists() and stamps(store) == before  # refused before any store was created or changed


@needs_torch
def test_rag_refuses_a_store_it_cannot_write(checkpoint, tmp_path, monkeypatch, capsys):
    """Root writes anywhere, so the failure is made in-process: creating any file in the store fails."""
    import sagekv.store
    from sagekv.cli import main

    def refuse(directory, name):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sagekv.store, "_open_temporary", refuse)
    store = tmp_path / "store"
    store.mkdir()
    assert main(rag_args(checkpoint, doc_files(tmp_path / "docs"), "--store", str(store))) == 1
    captured = capsys.readouterr()  # in-process, transformers' loading bar may show too (its setting is read at import)
    assert captured.err.strip().splitlines()[-1] == f"error: document store {store} is not writable: Permission denied"
    assert captured.err.count("error:") == 1 and "Traceback" not in captured.err
    assert captured.out == "" and list(store.iterdir()) == []


# --- saved caches: one document, several questions ---------------------------------------------------------------

DOCUMENT = "The key for door seven is 4821. The lamp is green. Mu nu xi omicron pi rho sigma tau. " * 3
QUESTIONS = ["Question: what is the key for door seven?\nAnswer: ", "Question: what colour is the lamp?\nAnswer: "]


def cache_args(checkpoint, *extra):
    return ["run", "--model", checkpoint, "--device", "cpu", "--budget", "16", "--max-tokens", "8", *extra]


@pytest.fixture(scope="module")
def saved_document(checkpoint, tmp_path_factory):
    """A document saved by `sagekv run --save-cache` on MLX, and that call's JSON."""
    pytest.importorskip("mlx_lm")
    root = tmp_path_factory.mktemp("saved")
    document, path = write(root / "document.txt", DOCUMENT), root / "document.safetensors"
    out = sagekv(*cache_args(checkpoint, "--backend", "mlx", "--prompt-file", str(document), "--save-cache", str(path),
                             "--max-tokens", "0", "--json"))
    assert out.returncode == 0, out.stderr
    return path, json.loads(out.stdout)


@needs_torch
def test_questions_over_a_saved_document_answer_as_the_whole_prompts(checkpoint, saved_document):
    path, record = saved_document
    assert record["cache"] == {"saved": str(path)} and record["tokens"] == [] and record["prompt_tokens"] == 1 + len(DOCUMENT)
    before = path.read_bytes(), path.stat().st_mtime_ns
    whole = [json.loads(sagekv(*cache_args(checkpoint, "--backend", "torch", "--prompt", DOCUMENT + q, "--json")).stdout)
             for q in QUESTIONS]
    asked = json.loads(sagekv(*cache_args(checkpoint, "--backend", "torch", "--load-cache", str(path), "--prompt", QUESTIONS[0],
                                          "--json")).stdout)
    assert asked["tokens"] == whole[0]["tokens"] and asked["prompt_tokens"] == whole[0]["prompt_tokens"]
    assert asked["kv"] == whole[0]["kv"] and asked["cache"] == {"loaded": str(path), "tokens": 1 + len(DOCUMENT)}
    out = sagekv(*cache_args(checkpoint, "--backend", "torch", "--load-cache", str(path), "--prompt", QUESTIONS[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout == whole[1]["text"] + "\n"
    assert f"| prompt {whole[1]['prompt_tokens']} tokens ({1 + len(DOCUMENT)} from {path}) |" in out.stderr
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # each question loads the document afresh


@needs_torch
@pytest.mark.parametrize(
    "case,message",
    [
        ("both flags", "give either --save-cache or --load-cache, not both"),
        ("built-in example", "--save-cache and --load-cache need --prompt or --prompt-file"),
        ("chat", "--chat cannot be used with --save-cache or --load-cache"),
        ("save into a missing directory", "cannot write cache file"),
        ("missing file", "cannot read cache file"),
        ("truncated", "is damaged (the tensors take"),
        ("another model", "was saved with another model"),
        ("too long", "exceed the 4096 positions"),
    ],
)
def test_cache_flags_bad_input_gives_one_line(case, message, checkpoint, saved_document, tmp_path):
    import shutil

    path = tmp_path / "document.safetensors"
    shutil.copy(saved_document[0], path)
    if case == "truncated":
        os.truncate(path, path.stat().st_size - 3)
    question = ["--prompt", QUESTIONS[0]]
    load = cache_args(checkpoint, "--load-cache", str(path))
    args = {
        "both flags": load + question + ["--save-cache", str(tmp_path / "new.safetensors")],
        "built-in example": load,
        "chat": load + question + ["--chat"],
        "save into a missing directory": cache_args(checkpoint, "--save-cache", str(tmp_path / "nope" / "x"), *question),
        "missing file": cache_args(checkpoint, "--load-cache", str(tmp_path / "nope"), *question),
        "truncated": load + question,
        "another model": cache_args(other_weights(checkpoint, tmp_path), "--load-cache", str(path), *question),
        "too long": load + ["--prompt", "word " * 800],
    }[case]
    out = sagekv(*args)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["document.safetensors"]  # nothing written

