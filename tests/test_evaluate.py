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


def test_eval_haystacks_share_a_directory(tiny_models, tmp_path):
    """Records carry their haystack; cells name it where it is not the default; records made before
    the choice are the default haystack's."""
    from sagekv.evaluate import evaluate

    model, out = tiny_models("llama", "torch"), str(tmp_path / "run")
    args = (["single_needle"], [512], ["full"], [64], 2, 0, out)
    evaluate(model, *args, progress=False)
    metrics = evaluate(model, *args, progress=False, haystack="pydoc")
    records = read_records(out)
    assert [r["haystack"] for r in records] == ["syllable", "syllable", "pydoc", "pydoc"]
    for r in records:
        assert r["answer"] == tasks.generate("single_needle", 512, r["seed"], r["haystack"]).answer
    assert [m.get("haystack") for m in metrics] == [None, "pydoc"] and [m["n"] for m in metrics] == [2, 2]
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## single_needle\n" in summary and "## single_needle (pydoc haystack)\n" in summary
    assert "| single_needle (pydoc haystack) | 512 | full | - |" in summary

    lines = open(os.path.join(out, "predictions.jsonl")).readlines()
    old = [json.dumps({k: v for k, v in json.loads(line).items() if k != "haystack"}) + "\n" for line in lines[:2]]
    open(os.path.join(out, "predictions.jsonl"), "w").writelines(old + lines[2:])
    assert evaluate(model, *args, progress=False) == metrics  # nothing redone
    assert len(read_records(out)) == 4
    with pytest.raises(SageKVError, match="unknown haystack 'prose' \\(choose from: syllable, pydoc\\)"):
        evaluate(model, *args, progress=False, haystack="prose")


def test_committed_results_summarise_as_before():
    """results/ holds records made before haystacks: they read as the default haystack's."""
    from sagekv.evaluate import read_predictions, summarize

    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
    records = read_predictions(os.path.join(results, "predictions.jsonl"))
    assert records and all("haystack" not in r for r in records)
    metrics = summarize(records)
    assert metrics == json.load(open(os.path.join(results, "metrics.json")))
    assert summarize([{**r, "haystack": "syllable"} for r in records]) == metrics


def test_synthetic_cases_fit_the_models_tokens():
    from conftest import byte_tokens, word_tokens
    from sagekv.evaluate import synthetic_cases

    for haystack in tasks.HAYSTACKS:
        cases = synthetic_cases("multi_doc_qa", 2048, 3, 0, word_tokens, haystack)
        assert [(c.length, c.seed, c.haystack) for c in cases] == [(2048, seed, haystack) for seed in range(3)]
        assert all(abs(len(word_tokens(c.prompt)) - 2048) <= 0.03 * 2048 for c in cases)
        assert all("".join(c.documents) + c.question == c.prompt for c in cases)
        as_bytes = synthetic_cases("multi_doc_qa", 2048, 3, 0, byte_tokens, haystack)
        assert [c.prompt for c in as_bytes] == [tasks.generate("multi_doc_qa", 2048, s, haystack).prompt for s in range(3)]


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


def test_eval_refuses_another_dtype_and_takes_a_legacy_directory(tiny_checkpoints, tmp_path):
    """run.json records the dtype; one written before dtypes were recorded takes any and stays as it is."""
    import sagekv
    from sagekv.evaluate import evaluate

    checkpoint, out = tiny_checkpoints["llama"], str(tmp_path / "run")
    args = (["single_needle"], [512], ["full"], [64], 1, 0, out)
    float32 = sagekv.load(checkpoint, backend="torch", device="cpu", dtype="float32")
    bfloat16 = sagekv.load(checkpoint, backend="torch", device="cpu", dtype="bfloat16")
    evaluate(float32, *args, progress=False)
    run_json = os.path.join(out, "run.json")
    assert json.load(open(run_json))["dtype"] == "float32"
    with pytest.raises(SageKVError, match="holds results of .* in float32, not bfloat16; pass --dtype float32"):
        evaluate(bfloat16, *args, progress=False)
    legacy = {k: v for k, v in json.load(open(run_json)).items() if k != "dtype"}
    open(run_json, "w").write(json.dumps(legacy))
    evaluate(bfloat16, *args, progress=False)
    assert json.load(open(run_json)) == legacy


def test_eval_dtype_and_sampling_identity_sampled_runs_keep_their_own_directory(tiny_checkpoints, tmp_path):
    """run.json records sampling settings only for a sampled run; greedy and sampled results do not mix,
    and a sampled run with the same seed repeats its predictions."""
    import sagekv
    from sagekv.evaluate import evaluate

    model = sagekv.load(tiny_checkpoints["llama"], backend="torch", device="cpu", dtype="float32")
    args = (["single_needle"], [512], ["full", "streaming"], [64], 2, 0)
    sampler = sagekv.Sampler(1.0, top_k=50, seed=3)
    sampled, again, greedy = (str(tmp_path / name) for name in ("sampled", "again", "greedy"))
    evaluate(model, *args, sampled, progress=False, sampler=sampler)
    evaluate(model, *args, again, progress=False, sampler=sampler)
    evaluate(model, *args, greedy, progress=False)
    assert json.load(open(os.path.join(sampled, "run.json")))["sampling"] == sampler.record()
    assert "sampling" not in json.load(open(os.path.join(greedy, "run.json")))
    predictions = lambda out: [r["prediction"] for r in read_records(out)]  # noqa: E731
    assert predictions(sampled) == predictions(again) != predictions(greedy)
    with pytest.raises(SageKVError, match="holds results decoded with greedy, not temperature 1, top-k 50, seed 3"):
        evaluate(model, *args, greedy, progress=False, sampler=sampler)
    with pytest.raises(SageKVError, match="decoded with temperature 1, top-k 50, seed 3, not temperature 1, top-k 50, seed 4"):
        evaluate(model, *args, sampled, progress=False, sampler=sagekv.Sampler(1.0, top_k=50, seed=4))


PASSAGES = [
    {"context": "Passage 1:\nOstra\n" + "The river Ostra flows north past the mill. " * 3 + "\nPassage 2:\nVelm\nThe town of Velm "
                "lies on the Ostra.\n",
     "input": "Which way does the Ostra flow?", "answers": ["north"], "dataset": "hotpotqa"},
    {"context": "Passage 1:\nKarn\nKarn was founded by Ilsa Vorn.\nPassage 2:\nIlsa Vorn\nIlsa Vorn was born in Tesk.\n"
                "Passage 3:\nTesk\nTesk is a port.\n", "input": "Where was the founder of Karn born?", "answers": ["Tesk"],
     "dataset": "2wikimqa"},
]
RAG_RECORD_FIELDS = {"task", "length", "haystack", "seed", "method", "prediction", "answer", "score", "kept_tokens", "total_tokens",
                     "kept_fraction", "ttft_s", "store_s", "kv_bytes", "decode_tokens_per_s"}


def test_longbench_passages_make_up_the_prompt():
    for record in PASSAGES:
        documents, question = longbench.passages(record["dataset"], record["context"], record["input"])
        assert "".join(documents) + question == longbench.prompt_for(record["dataset"], record["context"], record["input"])
        assert len(documents) == record["context"].count("Passage ") and all(d.startswith("Passage ") for d in documents)
        assert question.endswith(f"Question: {record['input']}\nAnswer: ")
    with pytest.raises(SageKVError, match="passage_retrieval_en has no passages"):
        longbench.passages("passage_retrieval_en", "Paragraph 1: cats.", "Which?")


@pytest.fixture(scope="module")
def rag_checkpoint(tmp_path_factory):
    """Four layers: CacheBlend's check layer (1) must come before the last."""
    pytest.importorskip("transformers")
    from sagekv.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("rag") / "llama", "llama", seed=3, num_hidden_layers=4)


@pytest.fixture(scope="module")
def rag_model(rag_checkpoint):
    import sagekv

    return sagekv.load(rag_checkpoint, backend="torch", device="cpu", dtype="float32")


def read_records(out):
    return [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]


def test_eval_rag_cells_resume_and_reports(rag_model, tmp_path):
    import statistics

    from sagekv.evaluate import evaluate
    from sagekv.rag import METHODS

    model = rag_model
    fixture = write_longbench(tmp_path / "lb.jsonl", PASSAGES)
    out = str(tmp_path / "run")
    args = (["multi_doc_qa", "multi_doc_qa_2hop", f"longbench:{fixture}"], [512], ["full"], [64], 2, 0, out)
    metrics = evaluate(model, *args, progress=False, methods=list(METHODS))
    records = read_records(out)
    assert len(records) == (2 * 2 + 2) * (1 + len(METHODS))  # (2 tasks x 2 seeds + 2 LongBench lines) x (full + 5 methods)
    full = {(r["task"], r["seed"]): r for r in records if r.get("policy") == "full"}
    for r in (r for r in records if "method" in r):
        assert set(r) | {"haystack"} == RAG_RECORD_FIELDS and ("haystack" in r) == (r["task"] in tasks.TASKS)  # not LongBench's
        assert r["kept_fraction"] == r["kept_tokens"] / r["total_tokens"] and r["kv_bytes"] > 0 and r["ttft_s"] > 0
        assert r["kept_fraction"] == 1 or r["method"] == "samkv"  # the others keep every document token
        if r["method"] == "full_recompute":  # the same prompt tokens as full attention, so the same answer
            assert r["prediction"] == full[r["task"], r["seed"]]["prediction"]
        if r["task"] in tasks.TASKS:
            sample = tasks.generate(r["task"], r["length"], r["seed"])
            assert r["score"] == tasks.score(sample, r["prediction"]) and r["answer"] == sample.answer
            assert r["total_tokens"] == len(model.encode(sample.prompt)) - len(sample.question)  # byte-level tokens
    assert any(len(r["prediction"]) > 10 for r in records if r.get("method") == "full_recompute")  # LongBench: 32 tokens
    assert any(r["kept_fraction"] < 1 for r in records if r.get("method") == "samkv")

    policy_cells, rag_cells = [m for m in metrics if "policy" in m], [m for m in metrics if "method" in m]
    assert metrics == policy_cells + rag_cells and len(policy_cells) == 4 and len(rag_cells) == 4 * len(METHODS)
    assert [m["method"] for m in rag_cells[:len(METHODS)]] == list(METHODS)
    cell = next(m for m in rag_cells if m["task"] == "multi_doc_qa_2hop" and m["method"] == "samkv")
    mine = [r for r in records if r["task"] == "multi_doc_qa_2hop" and r.get("method") == "samkv"]
    assert set(cell) == {"task", "length", "method", "n", "accuracy", "kept_fraction", "ttft_s", "kv_bytes", "decode_tokens_per_s"}
    assert cell["n"] == 2 and cell["ttft_s"] == statistics.median(r["ttft_s"] for r in mine)
    assert cell["kept_fraction"] == pytest.approx(sum(r["kept_fraction"] for r in mine) / 2)
    assert cell["kv_bytes"] == sum(r["kv_bytes"] for r in mine) / 2
    assert {m["length"] for m in rag_cells if m["task"] in ("hotpotqa", "2wikimqa")} == {0}
    assert json.load(open(os.path.join(out, "metrics.json"))) == metrics
    summary = open(os.path.join(out, "summary.md")).read()
    assert "## multi_doc_qa\n" in summary and "## RAG over stored documents" in summary
    assert "| multi_doc_qa | 512 tokens | full_recompute | " in summary and "| 2wikimqa | file lengths | samkv | " in summary
    for name in ("accuracy_vs_budget.png", "rag_score_vs_ttft.png"):
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    assert sorted(os.listdir(out)) == ["accuracy_vs_budget.png", "metrics.json", "predictions.jsonl", "rag_score_vs_ttft.png",
                                       "run.json", "summary.md"]  # no temporary file left

    # a re-run skips everything; a lost RAG line is redone, and only it
    evaluate(model, *args, progress=False, methods=list(METHODS))
    assert read_records(out) == records
    lines = open(os.path.join(out, "predictions.jsonl")).readlines()
    lost = next(i for i, line in enumerate(lines) if '"method": "cacheblend"' in line)
    open(os.path.join(out, "predictions.jsonl"), "w").writelines(lines[:lost] + lines[lost + 1:])
    evaluate(model, *args, progress=False, methods=list(METHODS))
    again = read_records(out)
    assert len(again) == len(records) and again[-1]["method"] == "cacheblend"
    assert {(r["task"], r["seed"], r.get("method")) for r in again} == {(r["task"], r["seed"], r.get("method")) for r in records}


def test_eval_rag_on_a_haystack_cut_into_documents(rag_model, tmp_path):
    """A task without documents is answered over its context cut into documents; full recompute then
    sees the same tokens as full attention."""
    from sagekv.evaluate import evaluate

    out = str(tmp_path / "run")
    evaluate(rag_model, ["single_needle"], [1024], ["full"], [64], 2, 0, out, progress=False, methods=["full_recompute", "reuse"])
    records = read_records(out)
    full = {r["seed"]: r["prediction"] for r in records if r.get("policy") == "full"}
    for r in (r for r in records if "method" in r):
        sample = tasks.generate("single_needle", 1024, r["seed"])
        assert r["total_tokens"] == len(rag_model.encode(sample.prompt)) - len(sample.question)
        if r["method"] == "full_recompute":
            assert r["prediction"] == full[r["seed"]]
    assert sorted(r.get("method") or r["policy"] for r in records) == ["full", "full", "full_recompute", "full_recompute",
                                                                        "reuse", "reuse"]


def test_eval_rag_only_then_policies_in_the_same_directory(rag_model, tmp_path):
    from sagekv.evaluate import evaluate

    out = str(tmp_path / "run")
    metrics = evaluate(rag_model, ["multi_doc_qa"], [512], [], [64], 2, 0, out, progress=False, methods=["reuse", "samkv"])
    assert [m["method"] for m in metrics] == ["reuse", "samkv"] and all("policy" not in r for r in read_records(out))
    assert open(os.path.join(out, "summary.md")).read().startswith("# RAG over stored documents: ")
    assert not os.path.exists(os.path.join(out, "accuracy_vs_budget.png"))
    both = evaluate(rag_model, ["multi_doc_qa"], [512], ["full"], [64], 2, 0, out, progress=False)
    assert [m.get("policy") or m["method"] for m in both] == ["full", "reuse", "samkv"]
    assert os.path.exists(os.path.join(out, "accuracy_vs_budget.png")) and len(read_records(out)) == 6


@pytest.mark.parametrize(
    "task,policies,methods,message",
    [
        ("longbench", [], ["reuse"], "passage_retrieval_en has no passages"),
        ("multi_doc_qa", [], [], "nothing to evaluate"),
        ("multi_doc_qa", [], ["nope"], "unknown method 'nope'"),
    ],
)
def test_eval_rag_refusals_write_nothing(tiny_models, tmp_path, task, policies, methods, message):
    from sagekv.evaluate import evaluate

    spec = f"longbench:{write_longbench(tmp_path / 'lb.jsonl', PASSAGES + LONGBENCH)}" if task == "longbench" else task
    out = tmp_path / "run"
    with pytest.raises(SageKVError, match=message):
        evaluate(tiny_models("llama", "torch"), [spec], [512], policies, [64], 4, 0, str(out), progress=False, methods=methods)
    assert not out.exists()


def test_eval_cli_policies_by_default_rag_methods_alone(tiny_checkpoints, tmp_path):
    def run(out, *extra):
        args = ["eval", "--backend", "torch", "--model", tiny_checkpoints["llama"], "--lengths", "512", "--budgets", "64",
                "--samples", "1", "--out", str(tmp_path / out), "--quiet", *extra]
        done = subprocess.run([sys.executable, "-m", "sagekv.cli", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout, read_records(tmp_path / out)

    stdout, records = run("policies", "--tasks", "multi_doc_qa")
    assert sorted(r["policy"] for r in records) == sorted(["full", "sagekv", "sagekv_kv_follow", "streaming", "snapkv", "quest"])
    assert stdout.strip().endswith("(metrics.json, predictions.jsonl, summary.md, accuracy_vs_budget.png)")
    stdout, records = run("rag", "--tasks", "multi_doc_qa", "--methods", "reuse,epic", "--haystack", "pydoc")
    assert [r["method"] for r in records] == ["reuse", "epic"] and all("policy" not in r for r in records)
    assert all(r["haystack"] == "pydoc" for r in records)
    assert stdout.strip().endswith("(metrics.json, predictions.jsonl, summary.md, rag_score_vs_ttft.png)")


def test_eval_in_workers_gives_one_process_records(tiny_checkpoints, tmp_path):
    def run(out, *extra):
        args = ["eval", "--backend", "torch", "--model", tiny_checkpoints["llama"], "--tasks", "single_needle,multi_doc_qa",
                "--lengths", "512", "--policies", "full,sagekv", "--methods", "reuse", "--budgets", "64", "--samples", "3",
                "--out", str(tmp_path / out), "--quiet", *extra]
        done = subprocess.run([sys.executable, "-m", "sagekv.cli", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("one")
    lines = open(tmp_path / "one" / "predictions.jsonl").readlines()
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "predictions.jsonl").write_text("".join(lines[:5]))
    stdout = run("split", "--workers", "3", "--device", "cpu,cpu")  # resumes the five records already there
    assert stdout.strip().startswith("13 new records; 6 cells in")
    assert run("split").strip().startswith("0 new records; 6 cells in")  # a re-run: nothing left to do
    timed = ("prefill_s", "select_s", "decode_s", "decode_tokens_per_s", "ttft_s", "store_s")
    untimed = lambda out: sorted(json.dumps({k: v for k, v in r.items() if k not in timed}, sort_keys=True)  # noqa: E731
                                 for r in read_records(tmp_path / out))
    assert untimed("split") == untimed("one") and len(untimed("one")) == 2 * 3 * 3
    assert open(tmp_path / "split" / "predictions.jsonl").readlines()[:5] == lines[:5]
    assert sorted(os.listdir(tmp_path / "split")) == sorted(os.listdir(tmp_path / "one"))  # the workers' folders merged


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_eval_in_batches_gives_one_at_a_time_records(tiny_models, tmp_path, backend):
    """--batch 3 over 4 samples of two tasks (batches of 3 and 1 per length) decodes the answers one at a time
    would, Quest's (not batched) and the RAG methods' too; a re-run with a record lost redoes only that one."""
    from sagekv.evaluate import evaluate, read_predictions

    model = tiny_models("llama", backend)
    grid = (["single_needle", "multi_doc_qa"], [512], ["full", "sagekv", "sagekv_kv_follow", "snapkv", "quest"], [64], 4, 0)
    timed = ("prefill_s", "select_s", "decode_s", "decode_tokens_per_s", "ttft_s", "store_s")
    untimed = lambda out: sorted(json.dumps({k: v for k, v in r.items() if k not in timed}, sort_keys=True)  # noqa: E731
                                 for r in read_predictions(str(tmp_path / out / "predictions.jsonl")))
    one = evaluate(model, *grid, str(tmp_path / "one"), progress=False, methods=["reuse"])
    three = evaluate(model, *grid, str(tmp_path / "three"), progress=False, methods=["reuse"], batch=3)
    assert untimed("three") == untimed("one") and len(untimed("one")) == 2 * 4 * 6
    assert [{k: m[k] for k in m if k not in timed} for m in three] == [{k: m[k] for k in m if k not in timed} for m in one]
    path = tmp_path / "three" / "predictions.jsonl"
    path.write_text("".join(open(path).readlines()[1:]))
    evaluate(model, *grid, str(tmp_path / "three"), progress=False, methods=["reuse"], batch=3)
    assert untimed("three") == untimed("one")
    with pytest.raises(SageKVError, match="batch must be a positive integer"):
        evaluate(model, *grid, str(tmp_path / "three"), progress=False, batch=0)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--batch", "0"], "--batch must be >= 1"),
        (["--tasks", "nope"], "unknown task 'nope'"),
        (["--tasks", "multi_doc_qa", "--methods", "reuse,nope"], "unknown method 'nope'"),
        (["--policies", ""], "nothing to evaluate"),
        (["--policies", ","], "--policies is empty"),
        (["--lengths", "100"], "below single_needle's minimum"),
        (["--budgets", "64,x"], "--budgets must be a comma-separated list"),
        (["--policies", "full,h2o"], "unknown policy 'h2o'"),
        (["--seed", "999999", "--samples", "5"], "evaluation seeds must lie in"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--device", "cpu,cpu"], "several devices need --workers"),
        (["--haystack", "prose"], "Invalid value for '--haystack': 'prose' is not one of 'syllable', 'pydoc'"),
        (["--tasks", "longbench:/no/such/file.jsonl"], "cannot read /no/such/file.jsonl"),
        (["--out", __file__], "File exists"),
        (["--top-p", "0"], "top_p must be a number in (0, 1]"),
        (["--sampling-seed", "-1"], "seed must be an integer"),
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


def test_results_page_rag_section(rag_checkpoint, tmp_path):
    """The RAG grid alone, then beside a (tiny) policy grid in the same directory."""
    from conftest import run_script
    from sagekv.rag import METHODS

    out = tmp_path / "results"

    def page(*extra):
        done = run_script("make_results_page.py", "--model", rag_checkpoint, "--backend", "torch", "--samples", "1",
                          "--rag-lengths", "1024", "--out", str(out), *extra)
        assert done.returncode == 0, done.stderr
        return (out / "README.md").read_text()

    alone = page("--rag-only")
    assert "## RAG over stored documents" in alone and "![score against TTFT](rag_score_vs_ttft.png)" in alone
    assert all(f"| {task} | 1024 tokens | {method} | " in alone for task in tasks.DOCUMENT_TASKS for method in METHODS)
    assert "--rag-only" in alone and "--rag-lengths 1024" in alone and "accuracy_vs_budget" not in alone
    assert "| 1024 tokens | full_recompute | " in alone and " | 100 | " in alone  # TTFT as % of full recompute's
    assert os.path.getsize(out / "rag_score_vs_ttft.png") > 10_000
    both = page("--rag", "--tasks", "single_needle", "--lengths", "512", "--budgets", "64")
    assert "![accuracy against budget](accuracy_vs_budget.png)" in both and "| sagekv | 64 |" in both
    assert both.index("## single_needle") < both.index("## RAG over stored documents")
    assert both.split("## RAG over stored documents")[1] == alone.split("## RAG over stored documents")[1]  # resumed, not re-run
