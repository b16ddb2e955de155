"""The evaluation harness and LongBench's metrics, on fixture files written here."""

import json
import os
import subprocess
import sys

import pytest

from sagekv import longbench, tasks
from sagekv.errors import SageKVError
from sagekv.policies import make_policy


def test_qa_f1():
    assert longbench.qa_f1("The cat sat.", "cat sat") == 1.0
    assert longbench.qa_f1("a dog", "cat") == 0.0
    assert longbench.qa_f1("cat sat on mat", "cat sat") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_rouge_l():
    assert longbench.rouge_l("a b c d", "a b c d") == 1.0
    assert longbench.rouge_l("a x c", "a b c") == pytest.approx(2 / 3)  # LCS "a c"
    assert longbench.rouge_l("", "a") == 0.0


def test_classification_retrieval_count_code():
    classes = ["Location", "Description", "Human being"]
    assert longbench.classification("Location", "Location", all_classes=classes) == 1.0
    assert longbench.classification("Location or Description", "Location", all_classes=classes) == 0.5
    assert longbench.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert longbench.retrieval("3 or 4", "Paragraph 3") == 0.5
    assert longbench.count("There are 7 paragraphs", 7) == 1.0
    assert longbench.count("none", 7) == 0.0
    assert longbench.code_similarity("# comment\nreturn x + 1", "return x + 1") == 1.0
    assert 0 < longbench.code_similarity("return y", "return x + 1") < 1


def test_score_takes_best_answer_and_first_line():
    assert longbench.score("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    assert longbench.score("triviaqa", "\nParis\nand more words", ["Paris"]) == 1.0


def write_longbench(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


LONGBENCH = [
    {"context": "The river Ostra flows north. " * 20, "input": "Which way does the Ostra flow?", "answers": ["north"],
     "dataset": "hotpotqa", "length": 120},
    {"context": "Paragraph 1: cats. Paragraph 2: dogs.", "input": "Which paragraph is about dogs?",
     "answers": ["Paragraph 2"], "dataset": "passage_retrieval_en", "length": 20},
]


@pytest.mark.parametrize(
    "content,message",
    [("{bad json\n", "not JSON"), ('{"context": "x"}\n', "missing field"),
     ('{"context": "x", "input": "", "answers": [], "dataset": "lsht"}\n', "unknown LongBench dataset"), ("", "holds no records")],
)
def test_longbench_read_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SageKVError, match=message):
        longbench.read(str(path))


def test_eval_grid_resume_and_reports(tiny_models, tmp_path):
    from sagekv.evaluate import evaluate

    model = tiny_models("llama", "torch")
    fixture = write_longbench(tmp_path / "lb.jsonl", LONGBENCH)
    out = str(tmp_path / "run")
    args = (["single_needle", "multi_value", f"longbench:{fixture}"], [512], ["full", "sagekv", "snapkv", "quest"], [64, 128], 2, 0, out)
    metrics = evaluate(model, *args, progress=False)
    # 2 synthetic tasks x 1 length + 2 LongBench records (each its own cell) ; 1 + 3 x 2 policy cells
    predictions = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert len(predictions) == (2 * 2 + 2) * 7
    for record in predictions:
        if record["task"] in tasks.TASKS:
            sample = tasks.generate(record["task"], record["length"], record["seed"])
            assert record["score"] == tasks.score(sample, record["prediction"])
            assert record["answer"] == sample.answer
        assert record["kept_kv_bytes"] > 0 and record["full_kv_bytes"] > 0
    cell = next(m for m in metrics if m["task"] == "single_needle" and m["policy"] == "sagekv" and m["budget"] == 64)
    assert cell["n"] == 2 and 0 <= cell["accuracy"] <= 1
    assert {"task", "length", "policy", "budget", "accuracy", "n", "prefill_s", "select_s", "decode_s", "kept_kv_bytes"} <= set(cell)
    assert next(m for m in metrics if m["policy"] == "full")["budget"] is None
    assert json.load(open(os.path.join(out, "metrics.json"))) == metrics
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## single_needle" in summary and "| sagekv | 64 |" in summary and "## hotpotqa" in summary
    assert "file lengths" in summary  # LongBench records form one cell per dataset
    assert {m["n"] for m in metrics if m["task"] == "hotpotqa"} == {1} and all(
        m["length"] == 0 for m in metrics if m["task"] in ("hotpotqa", "passage_retrieval_en"))
    assert os.path.getsize(os.path.join(out, "accuracy_vs_budget.png")) > 10_000

    # a re-run skips everything; an interrupted run (last line cut, one line lost) redoes only that
    evaluate(model, *args, progress=False)
    assert len(open(os.path.join(out, "predictions.jsonl")).readlines()) == len(predictions)
    lines = open(os.path.join(out, "predictions.jsonl")).readlines()
    open(os.path.join(out, "predictions.jsonl"), "w").writelines(lines[:-2] + [lines[-2][:20]])
    evaluate(model, *args, progress=False)
    records = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl")) if line.strip().endswith("}")]
    assert len(records) == len(predictions)
    assert {tuple(sorted(r.items())) for r in records} >= {tuple(sorted(r.items())) for r in predictions[:-2]}


def test_eval_refuses_another_models_directory(tiny_models, tmp_path):
    from sagekv.evaluate import evaluate

    out = str(tmp_path / "run")
    evaluate(tiny_models("llama", "torch"), ["single_needle"], [512], ["full"], [64], 1, 0, out, progress=False)
    with pytest.raises(SageKVError, match="holds results of"):
        evaluate(tiny_models("qwen2", "torch"), ["single_needle"], [512], ["full"], [64], 1, 0, out, progress=False)


def test_eval_refuses_a_retrained_model_and_changed_samples(tiny_checkpoints, tmp_path):
    import shutil

    import sagekv
    from sagekv.evaluate import evaluate

    checkpoint, out = str(tmp_path / "model"), str(tmp_path / "run")
    shutil.copytree(tiny_checkpoints["llama"], checkpoint)
    args = (["single_needle"], [512], ["full"], [64], 2, 0, out)
    evaluate(sagekv.load(checkpoint, backend="torch", device="cpu"), *args, progress=False)
    predictions = os.path.join(out, "predictions.jsonl")
    before = open(predictions).read()

    lines = before.splitlines(keepends=True)
    record = json.loads(lines[0])
    open(predictions, "w").writelines([json.dumps({**record, "answer": "1234567"}) + "\n", *lines[1:]])
    with pytest.raises(SageKVError, match="other single_needle samples"):
        evaluate(sagekv.load(checkpoint, backend="torch", device="cpu"), *args, progress=False)
    open(predictions, "w").write(before)

    weights = os.path.join(checkpoint, "model.safetensors")  # the same name and size, other values
    data = bytearray(open(weights, "rb").read())
    data[-8:] = bytes(8)
    open(weights, "wb").write(bytes(data))
    with pytest.raises(SageKVError, match="holds results of other weights of"):
        evaluate(sagekv.load(checkpoint, backend="torch", device="cpu"), *args, progress=False)
    assert open(predictions).read() == before  # refused without touching the results


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--lengths", "100"], "below single_needle's minimum"),
        (["--budgets", "64,x"], "--budgets must be a comma-separated list"),
        (["--policies", "full,h2o"], "unknown policy 'h2o'"),
        (["--seed", "999999", "--samples", "5"], "evaluation seeds must lie in"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--tasks", "longbench:/no/such/file.jsonl"], "cannot read /no/such/file.jsonl"),
        (["--out", __file__], "File exists"),
    ],
)
def test_eval_cli_bad_input(tiny_checkpoints, tmp_path, extra, message):
    args = ["eval", "--backend", "torch", "--model", tiny_checkpoints["llama"], "--tasks", "single_needle",
            "--lengths", "512", "--budgets", "64", "--samples", "1", "--out", str(tmp_path / "o"), "--quiet", *extra]
    out = subprocess.run([sys.executable, "-m", "sagekv.cli", *args], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr


def test_eval_gives_the_same_predictions_on_mlx_and_torch(tiny_models, tmp_path):
    pytest.importorskip("mlx_lm")
    from sagekv.evaluate import evaluate

    runs = {}
    for backend in ("mlx", "torch"):
        out = str(tmp_path / backend)
        evaluate(tiny_models("llama", backend), ["multi_key"], [512], ["full", "sagekv", "snapkv"], [64], 2, 0, out, progress=False)
        runs[backend] = [{k: r[k] for k in ("task", "seed", "policy", "budget", "prediction", "score", "kept_kv_bytes")}
                         for r in map(json.loads, open(os.path.join(out, "predictions.jsonl")))]
    assert runs["mlx"] == runs["torch"]


def test_stopping_once_decided_keeps_the_score():
    import random

    from sagekv.evaluate import answer_decided

    rng = random.Random(0)
    for task in ("single_needle", "multi_key", "multi_doc_qa", "multi_doc_qa_2hop"):
        sample = tasks.generate(task, 1024, 3)
        answer = sample.answer
        texts = [answer, answer + ".", answer + "9", " " + answer + "\n", answer[:-1], answer[:3] + "x" + answer[4:], ""]
        texts += ["".join(rng.choice(answer + " .x0") for _ in range(rng.randint(0, len(answer) + 3))) for _ in range(200)]
        for text in texts:
            cut = next((i for i in range(1, len(text) + 1) if answer_decided(answer, text[:i])), len(text))
            assert tasks.score(sample, text[:cut]) == tasks.score(sample, text), (task, text)


def test_early_stop_matches_full_generation(tiny_models, tmp_path):
    from sagekv.evaluate import evaluate

    model = tiny_models("llama", "torch")
    out = str(tmp_path / "run")
    evaluate(model, ["single_needle", "multi_value"], [512], ["full", "sagekv"], [64], 2, 0, out, progress=False)
    for record in map(json.loads, open(os.path.join(out, "predictions.jsonl"))):
        sample = tasks.generate(record["task"], record["length"], record["seed"])
        policy = make_policy(record["policy"], record["budget"])
        full = model.generate_ids(model.encode(sample.prompt), policy, len(model.encode(sample.answer)) + 4)
        assert record["score"] == tasks.score(sample, full.text)
        assert full.text.startswith(record["prediction"])
