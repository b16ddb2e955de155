"""Accuracy against KV budget: every (task, length, policy, budget) cell on one model.

Each sample is prefilled once and decoded under every policy from a copy of that cache; for
single answers decoding stops as soon as the score is decided (the prediction is then cut there).
Results go to a directory: ``predictions.jsonl`` (one line per sample and cell, appended as
they finish, so a re-run skips what is done), ``metrics.json``, ``summary.md`` and
``accuracy_vs_budget.png``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from . import longbench, tasks
from .errors import SageKVError
from .policies import make_policy

AS_GIVEN = 0  # the "length" of LongBench samples: one cell per dataset, whatever each prompt's length
STAT_FIELDS = ("prefill_s", "select_s", "decode_s", "decode_tokens_per_s", "full_kv_bytes", "kept_kv_bytes")


@dataclass
class Case:
    task: str
    length: int
    seed: int
    prompt: str
    answer: str
    max_tokens: int
    score: Callable[[str], float]
    decided: Optional[Callable[[str], bool]] = None
    """For single answers: whether the text so far already fixes the score (decoding may stop)."""


def synthetic_cases(task: str, length: int, samples: int, seed: int, encode) -> list:
    cases = []
    for s in range(seed, seed + samples):
        sample = tasks.generate(task, length, s)
        budget = len(encode(sample.answer)) + 4
        decided = partial(answer_decided, sample.answer) if len(sample.answers) == 1 else None
        cases.append(Case(task, length, s, sample.prompt, sample.answer, budget,
                          lambda text, x=sample: tasks.score(x, text), decided))
    return cases


def answer_decided(answer: str, text: str) -> bool:
    """An exact-start answer is decided once the text leaves it, or runs one character past it."""
    text = text.lstrip()
    return len(text) > len(answer) or not answer.startswith(text)


def longbench_cases(path: str, samples: int) -> list:
    cases = []
    for index, record in enumerate(longbench.read(path, limit=samples)):
        dataset = record["dataset"]
        prompt = longbench.prompt_for(dataset, record["context"], record["input"])
        score = lambda text, r=record: longbench.score(r["dataset"], text, r["answers"], r.get("all_classes"))  # noqa: E731
        answer = record["answers"][0] if record["answers"] else ""
        cases.append(Case(dataset, AS_GIVEN, index, prompt, answer, longbench.DATASETS[dataset][1], score))
    return cases


def cells(policies: list, budgets: list) -> list:
    """(name, budget, policy) for every cell; full attention once, with no budget."""
    out = []
    for name in policies:
        for budget in [None] if name == "full" else budgets:
            out.append((name, budget, make_policy(name, budget)))
    return out


def evaluate(model, task_specs: list, lengths: list, policies: list, budgets: list, samples: int, seed: int, out: str,
             progress: bool = True) -> list:
    """Run the grid, append to ``out/predictions.jsonl``, write the summaries; returns metrics."""
    grid = cells(policies, budgets)
    check_tasks(task_specs, lengths)
    cases = []
    for spec in task_specs:
        if spec.startswith("longbench:"):
            cases += longbench_cases(spec.split(":", 1)[1], samples)
        else:
            for length in lengths:
                cases += synthetic_cases(spec, length, samples, seed, model.encode)

    os.makedirs(out, exist_ok=True)
    check_run(out, model)
    path = os.path.join(out, "predictions.jsonl")
    records = read_predictions(path)
    check_answers(path, records, cases)
    done = {record_key(r) for r in records}
    todo = [(case, [cell for cell in grid if record_key(key_of(case, cell)) not in done]) for case in cases]
    window = max(policy.observed_queries for _, _, policy in grid)
    bar = progress_bar(sum(len(pending) for _, pending in todo), progress)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() and not ends_with_newline(path):
            f.write("\n")  # a run interrupted mid-line: keep new records on lines of their own
        for case, pending in todo:
            if not pending:
                continue
            prefilled = model.prefill(model.encode(case.prompt), window)
            for name, budget, policy in pending:
                stop = None if case.decided is None else (lambda ids, c=case: c.decided(model.decode_text(ids)))
                result = model.decode(prefilled, policy, case.max_tokens, on_token=stop)
                record = {**key_of(case, (name, budget, policy)), "prediction": result.text, "answer": case.answer,
                          "score": case.score(result.text), "prompt_tokens": result.prompt_tokens,
                          **{field: getattr(result.stats, field) for field in STAT_FIELDS}}
                f.write(json.dumps(record) + "\n")
                f.flush()
                bar.update(1)
    bar.close()
    metrics = summarize(read_predictions(path))
    write_reports(out, metrics, model)
    return metrics


def check_tasks(task_specs: list, lengths: list) -> None:
    for spec in task_specs:
        if spec.startswith("longbench:"):
            continue
        if spec not in tasks.TASKS:
            raise SageKVError(f"unknown task {spec!r} (choose from: {', '.join(tasks.TASKS)}, or longbench:FILE.jsonl)")
        too_short = [n for n in lengths if n < tasks.MIN_LENGTH[spec]]
        if too_short:
            raise SageKVError(f"length {too_short[0]} is below {spec}'s minimum of {tasks.MIN_LENGTH[spec]} tokens")


def key_of(case: Case, cell) -> dict:
    name, budget, _ = cell
    return {"task": case.task, "length": case.length, "seed": case.seed, "policy": name, "budget": budget}


def record_key(record: dict) -> tuple:
    return tuple(record[k] for k in ("task", "length", "seed", "policy", "budget"))


def ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_predictions(path: str) -> list:
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by an interrupted run is redone
    return records


def check_run(out: str, model) -> None:
    """A results directory belongs to one model (its weights too) and backend; refuse to mix runs."""
    path = os.path.join(out, "run.json")
    identity = {"model": model.name, "backend": model.backend, "weights": model.weights}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous != identity:
            same_name = (previous.get("model"), previous.get("backend")) == (model.name, model.backend)
            raise SageKVError(f"{out} holds results of {'other weights of ' if same_name else ''}{previous.get('model')} "
                              f"on {previous.get('backend')}; use another --out")
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(identity, f)


def check_answers(path: str, records: list, cases: list) -> None:
    """Records whose sample now has another answer were made by an older task generator or data file."""
    expected = {(case.task, case.length, case.seed): case.answer for case in cases}
    for r in records:
        if expected.get((r["task"], r["length"], r["seed"]), r["answer"]) != r["answer"]:
            raise SageKVError(f"{path} holds predictions for other {r['task']} samples (seed {r['seed']} now has "
                              f"another answer: the tasks or the data changed); use another --out")


def summarize(records: list) -> list:
    groups = defaultdict(list)
    for r in records:
        groups[(r["task"], r["length"], r["policy"], r["budget"])].append(r)
    metrics = []
    for (task, length, policy, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3] or 0)):
        cell = {"task": task, "length": length, "policy": policy, "budget": budget, "n": len(rs),
                "accuracy": sum(r["score"] for r in rs) / len(rs)}
        cell.update({field: sum(r[field] for r in rs) / len(rs) for field in STAT_FIELDS})
        metrics.append(cell)
    return metrics


def write_reports(out: str, metrics: list, model) -> None:
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(metrics, f"{model.name} ({model.backend})"))
    plot(metrics, os.path.join(out, "accuracy_vs_budget.png"))


def summary_markdown(metrics: list, title: str) -> str:
    lengths = sorted({m["length"] for m in metrics})
    lines = [f"# Accuracy against KV budget: {title}", "",
             "Budget: KV entries kept per KV head (plus the last prompt token). Accuracy: mean task score.", ""]
    for task in sorted({m["task"] for m in metrics}):
        rows = defaultdict(dict)
        for m in metrics:
            if m["task"] == task:
                rows[(m["policy"], m["budget"])][m["length"]] = m
        lines += [f"## {task}", "", "| policy | budget | " + " | ".join(length_label(n) for n in lengths) + " | n |",
                  "|---|---|" + "---|" * len(lengths) + "---|"]
        for (policy, budget), by_length in sorted(rows.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], kv[0][1] or 0)):
            cells = [f"{by_length[n]['accuracy']:.3f}" if n in by_length else "" for n in lengths]
            count = max(m["n"] for m in by_length.values())
            lines.append(f"| {policy} | {budget if budget is not None else '-'} | " + " | ".join(cells) + f" | {count} |")
        lines.append("")
    lines += ["## Memory and time (means per sample)", "",
              "| task | length | policy | budget | KV full MiB | KV kept MiB | prefill s | select ms | decode tok/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        lines.append(f"| {m['task']} | {m['length']} | {m['policy']} | {m['budget'] if m['budget'] is not None else '-'} | "
                     f"{m['full_kv_bytes'] / 2**20:.2f} | {m['kept_kv_bytes'] / 2**20:.2f} | {m['prefill_s']:.3f} | "
                     f"{m['select_s'] * 1e3:.2f} | {m['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def length_label(length: int) -> str:
    return "file lengths" if length == AS_GIVEN else f"{length} tokens"


def plot(metrics: list, path: str) -> None:
    """One panel per task and length; one line per policy; full attention as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(m["task"], m["length"]) for m in metrics})
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax, (task, length) in zip(axes.flat, panels):
        cell = [m for m in metrics if m["task"] == task and m["length"] == length]
        for policy in sorted({m["policy"] for m in cell if m["policy"] != "full"}):
            points = sorted((m["budget"], m["accuracy"]) for m in cell if m["policy"] == policy)
            ax.plot([b for b, _ in points], [a for _, a in points], marker="o", label=policy)
        for m in cell:
            if m["policy"] == "full":
                ax.axhline(m["accuracy"], color="black", linestyle="--", label="full")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{task} @ {length_label(length)}")
        ax.set_xlabel("KV budget per KV head")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="cell", desc="sagekv eval", dynamic_ncols=True)


def parse_list(text: Optional[str], cast, what: str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SageKVError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise SageKVError(f"--{what} is empty")
    return items
