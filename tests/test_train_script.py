"""CPU smoke test of scripts/train_reference_model.py: a tiny model, a few seconds of training, a resume."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import HAVE_MLX, needs_torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference_model.py"
TASK_SUBSET = "single_needle,multi_value,multi_doc_qa_2hop"  # one needle, several answers, documents
TINY = ["--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "1", "--intermediate", "64",
        "--stages", "512,1024", "--tokens-per-step", "2048", "--tasks", TASK_SUBSET, "--stage-share", "0.3",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--eval-samples", "1", "--eval-lengths", "512"]
LOG_KEYS = {"event", "step", "elapsed", "stage", "length", "lr", "loss", "answer_loss", "answer_loss_avg",
            "steps_per_s", "heldout_token_acc", "heldout_exact", "answer_loss_by_task"}


def load_script():
    spec = importlib.util.spec_from_file_location("train_reference_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@needs_torch
def test_batch_targets_are_the_answer_then_eos():
    import torch

    script = load_script()
    from sagekv.tasks import generate

    samples = [generate("multi_value", 512, 1_000_000), generate("single_needle", 384, 1_000_001)]
    ids, kinds = script.encode_batch(samples)
    assert ids.shape[1] % 64 == 0
    for row, sample in enumerate(samples):
        targets = ids[row][kinds[row] == script.ANSWER].tolist()
        assert bytes(targets[:-1]).decode() == sample.answer and targets[-1] == script.EOS
        assert ids[row, 0] == script.BOS and kinds[row, 0] == script.PAD
        assert (kinds[row] == script.CONTEXT).sum() == len(sample.prompt)
    # Logits that put all mass on the next token give zero loss on exactly the answer positions.
    perfect = torch.full((*ids.shape, 258), -1e4)
    perfect[:, :-1].scatter_(2, ids[:, 1:, None], 1e4)
    loss, answer_loss, rows = script.losses(perfect, ids, kinds, 0.1)
    assert loss.item() == answer_loss.item() == 0.0
    assert rows[1].tolist() == [len(s.answer) + 1 for s in samples]  # answer tokens and </s> per row
    wrong_answer = perfect.clone()
    wrong_answer[:, :-1][kinds[:, 1:] == script.ANSWER] = 0.0  # uniform over 258 tokens at answer targets only
    loss, answer_loss, rows = script.losses(wrong_answer, ids, kinds, 0.1)
    assert answer_loss.item() == pytest.approx(torch.log(torch.tensor(258.0)).item(), rel=1e-4)
    assert (rows[0] / rows[1]).tolist() == pytest.approx([answer_loss.item()] * 2, rel=1e-5)
    assert loss.item() == pytest.approx(answer_loss.item(), rel=1e-6)


@needs_torch
def test_train_save_resume_and_reload(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    script = load_script()
    out = tmp_path / "run"
    script.main(["--out", str(out), "--minutes", "0.05", *TINY])
    for name in ("checkpoint.pt", "train_log.jsonl", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "final_eval.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "model/config.json").read_text())
    assert config["num_attention_heads"] == 4 * config["num_key_value_heads"]
    assert config["vocab_size"] == 258 and config["dtype"] == "bfloat16" and config["rope_theta"] == 500000.0
    assert (config["bos_token_id"], config["eos_token_id"]) == (256, 257)
    assert config["max_position_embeddings"] >= 16384
    log = read_log(out)
    records = [r for r in log if r["event"] == "log"]
    assert records and LOG_KEYS <= set(records[-1])
    stage_changes = [r for r in log if r["event"] == "stage"]  # --stage-share moved it on
    assert stage_changes[0]["from_tasks"] == ["single_needle"]  # the warm-up tasks that are in --tasks come first
    assert stage_changes[0]["to_tasks"] == TASK_SUBSET.split(",")
    for before, after in zip(records, records[1:]):  # sampling follows the last interval's losses
        if before["stage"] == after["stage"]:
            tasks = list(after["task_weights"])
            assert list(after["task_weights"].values()) == pytest.approx(
                script.task_weights(tasks, before["answer_loss_by_task"], 0.5))
    for record in records:  # per-task answer losses of the tasks trained since the previous record
        assert sum(record["task_weights"].values()) == pytest.approx(1.0)
        losses = record["answer_loss_by_task"]
        assert losses and set(losses) <= set(TASK_SUBSET.split(",")) and all(v > 0 for v in losses.values())
        assert record["stage"] > 0 or set(losses) == {"single_needle"}
    first = json.loads((out / "final_eval.json").read_text())
    assert set(first["results"]) == set(TASK_SUBSET.split(","))
    assert 0.0 <= first["results"]["single_needle"]["512"]["score"] <= 1.0
    assert first["elapsed"] >= 3.0

    with pytest.raises(SystemExit):  # an existing run is not overwritten by accident
        script.main(["--out", str(out), "--minutes", "0.05", *TINY])

    # The budget counts across runs: raising it to 6 s trains about 3 s more, from where it stopped.
    script.main(["--out", str(out), "--resume", "--minutes", "0.1", "--workers", "0", "--device", "cpu",
                 "--log-every", "1", "--eval-samples", "1", "--eval-lengths", "512"])
    second = json.loads((out / "final_eval.json").read_text())
    assert second["step"] > first["step"]
    assert first["elapsed"] < second["elapsed"] and second["elapsed"] >= 6.0
    resumed = [r for r in read_log(out)[len(log):] if r["event"] == "log"]
    assert resumed and resumed[0]["step"] > first["step"]
    assert resumed[0]["stage"] >= records[-1]["stage"] > 0  # not started over (it may move on at once)

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_key_value_heads == 1 and model.config.vocab_size == 258
    card = (out / "model" / "README.md").read_text()
    assert f"{second['step']} optimizer steps" in card and "| single_needle |" in card and "not a chat" in card
    if HAVE_MLX:  # plain mlx-lm must read the same RoPE base
        from mlx_lm import load

        mlx_model, _ = load(str(out / "model"))
        assert mlx_model.args.rope_theta == 500000.0

    # --init-from starts from the saved weights and shape (zero minutes: nothing trained, the same weights back)
    more = tmp_path / "more"
    script.main(["--out", str(more), "--minutes", "0", "--init-from", str(out / "model"), "--hidden", "64",
                 *TINY, "--warmup-tasks", ""])
    again = AutoModelForCausalLM.from_pretrained(more / "model")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    card = (more / "model" / "README.md").read_text()
    runs = card.split("### Training runs, in order\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(runs) == 2 and runs[0].startswith(f"1. {second['step']} optimizer steps")  # the earlier run's record
    assert runs[1].startswith("2. 0 optimizer steps") and "from run 1's weights" in runs[1]
    assert f"{second['step']} optimizer steps in {second['elapsed'] / 60:.1f} minutes of training in all" in card
    checkpoint = torch.load(out / "checkpoint.pt")
    del checkpoint["args"]["focus"]
    torch.save(checkpoint, out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="older version of this script .no focus"):
        script.main(["--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match="--focus 1.5: must be between 0 and 1"):
        script.main(["--out", str(tmp_path / "bad"), "--focus", "1.5", *TINY])
    with pytest.raises(SystemExit, match="cannot read config.json"):
        script.main(["--out", str(tmp_path / "bad"), "--init-from", str(tmp_path / "nowhere"), *TINY])


@needs_torch
def test_warmup_stage_then_all_tasks_with_shorter_lengths_replayed():
    script = load_script()
    args = script.parse_args(["--out", "unused", *TINY])
    plan = script.stage_plan(args)
    assert plan == [(512, ["single_needle"]), (512, TASK_SUBSET.split(",")), (1024, TASK_SUBSET.split(","))]
    for stage, (length, tasks) in enumerate(plan):
        dataset = script.TrainBatches(plan, stage, 2048, 0.5, 0, [1 / len(tasks)] * len(tasks))
        for index in range(6):
            batch_length, ids, kinds, task_ids = dataset.batch(index)
            assert batch_length in (512, length) and len(ids) == len(task_ids) == 2048 // batch_length
            assert {script.TASK_NAMES[i] for i in task_ids.tolist()} <= set(tasks)
            assert (batch_length, ids.tolist()) == (dataset.batch(index)[0], dataset.batch(index)[1].tolist())
    only_last = script.TrainBatches(plan, 1, 2048, 0.5, 0, [0, 0, 1])  # weights pick the tasks drawn
    assert all(set(only_last.batch(index)[3].tolist()) == {script.TASK_NAMES.index(plan[1][1][2])} for index in range(4))
    for warmup in ("", "multi_key"):  # none, or none of them among --tasks: no warm-up stage
        assert script.stage_plan(script.parse_args(["--out", "unused", *TINY, "--warmup-tasks", warmup]))[0][1] == \
            TASK_SUBSET.split(",")
    full = script.stage_plan(script.parse_args(["--out", "unused"]))  # the defaults: 1 warm-up stage + 5 lengths
    assert full[0] == (512, ["single_needle", "multi_key"])
    assert [length for length, _ in full[1:]] == [512, 1024, 2048, 4096, 8192]


@needs_torch
def test_task_weights_favour_tasks_with_high_answer_loss():
    script = load_script()
    tasks = ["a", "b", "c", "d"]
    assert script.task_weights(tasks, {}, 0.5) == [0.25] * 4
    assert script.task_weights(tasks, {"a": 2.0, "b": 1.0, "c": 1.0}, 0.5) == [0.25] * 4  # d not measured yet
    weights = script.task_weights(tasks, {"a": 3.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 9.0}, 0.5)
    assert weights == pytest.approx([0.125 + 0.375, 0.125 + 0.125, 0.125, 0.125])
    assert script.task_weights(tasks, {"a": 3.0, "b": 1.0, "c": 0.0, "d": 0.0}, 0.0) == [0.25] * 4
    assert script.task_weights(tasks, dict.fromkeys(tasks, 0.0), 1.0) == [0.25] * 4  # all learned: even


@needs_torch
def test_batched_greedy_matches_one_at_a_time():
    import torch

    script = load_script()
    from sagekv.tasks import generate

    args = script.parse_args(["--out", "unused", *TINY])
    model = script.build_model(args)
    samples = [generate("multi_value", 512, 7), generate("single_needle", 400, 8)]  # different prompt lengths
    device = torch.device("cpu")
    batched = script.greedy_texts(model, samples, device)
    assert batched == [script.greedy_texts(model, [sample], device)[0] for sample in samples]
    assert all(len(text) <= len(s.answer) + 2 for text, s in zip(batched, samples))  # one char per byte at most
