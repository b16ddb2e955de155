"""Accuracy against KV budget: every (task, length, policy, budget) cell on one model; and RAG
methods over stored documents: every (task, length, method) cell (a task without documents has its
context cut into documents, ``tasks.documents_of``).

Each sample is prefilled once and decoded under every policy from a copy of that cache. A RAG
method answers the sample's question over its documents, each document prefilled alone once per
sample and shared by the methods (:mod:`sagekv.rag`). For single answers decoding stops as soon as
the score is decided (the prediction is then cut there). Results go to a directory:
``predictions.jsonl`` (one line per sample and cell, appended as they finish, so a re-run skips
what is done), ``metrics.json``, ``summary.md``, ``accuracy_vs_budget.png`` (policies) and
``rag_score_vs_ttft.png`` (RAG methods).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

from . import longbench, tasks
from .errors import SageKVError
from .policies import make_policy
from .rag import METHODS, make_method
from .sampling import Sampler, check_sampler
from .store import MemoryStore

AS_GIVEN = 0  # the "length" of LongBench samples: one cell per dataset, whatever each prompt's length
STAT_FIELDS = ("prefill_s", "select_s", "decode_s", "decode_tokens_per_s", "full_kv_bytes", "kept_kv_bytes")
KEY_FIELDS = ("task", "length", "haystack", "seed", "policy", "budget", "method")  # a record's cell and sample
CELL_FIELDS = tuple(field for field in KEY_FIELDS if field != "seed")
SAMPLE_FIELDS = KEY_FIELDS[:4]  # a record's sample
POLICY_PLOT, RAG_PLOT = "accuracy_vs_budget.png", "rag_score_vs_ttft.png"


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
    documents: tuple = ()
    question: str = ""
    """With documents: ``prompt == "".join(documents) + question``."""
    haystack: Optional[str] = None
    """Synthetic tasks: the haystack's kind (:data:`sagekv.tasks.HAYSTACKS`)."""


def synthetic_cases(task: str, length: int, samples: int, seed: int, encode,
                    haystack: str = tasks.DEFAULT_HAYSTACK) -> list:
    """Prompts of ``length`` tokens of ``encode`` (within 3%, :func:`sagekv.tasks.generate_in_tokens`)."""
    cases = []
    for s in range(seed, seed + samples):
        sample = tasks.generate_in_tokens(task, length, s, encode, haystack)
        budget = len(encode(sample.answer)) + 4
        decided = partial(answer_decided, sample.answer) if len(sample.answers) == 1 else None
        # a context cut into documents of about DOC_BYTES tokens, as the document tasks have
        document_bytes = round(tasks.DOC_BYTES * len(sample.prompt) / len(encode(sample.prompt)))
        cases.append(Case(task, length, s, sample.prompt, sample.answer, budget, lambda text, x=sample: tasks.score(x, text),
                          decided, tasks.documents_of(sample, document_bytes), sample.question, haystack))
    return cases


def answer_decided(answer: str, text: str) -> bool:
    """An exact-start answer is decided once the text leaves it, or runs one character past it."""
    text = text.lstrip()
    return len(text) > len(answer) or not answer.startswith(text)


def longbench_cases(path: str, samples: int, documents: bool = False) -> list:
    """``documents``: cut each prompt into its passages (RAG methods; refused for other datasets)."""
    cases = []
    for index, record in enumerate(longbench.read(path, limit=samples)):
        dataset = record["dataset"]
        prompt = longbench.prompt_for(dataset, record["context"], record["input"])
        score = lambda text, r=record: longbench.score(r["dataset"], text, r["answers"], r.get("all_classes"))  # noqa: E731
        answer = record["answers"][0] if record["answers"] else ""
        try:
            parts = longbench.passages(dataset, record["context"], record["input"]) if documents else ((), "")
        except SageKVError as error:
            raise SageKVError(f"{path}: {error}") from None
        cases.append(Case(dataset, AS_GIVEN, index, prompt, answer, longbench.DATASETS[dataset][1], score, None, *parts))
    return cases


@dataclass(frozen=True)
class PolicyCell:
    """One policy at one budget (full attention: no budget)."""

    name: str
    budget: Optional[int]
    policy: object

    @property
    def key(self) -> dict:
        return {"policy": self.name, "budget": self.budget}


@dataclass(frozen=True)
class RagCell:
    """One RAG method over the sample's documents."""

    method: str

    @property
    def key(self) -> dict:
        return {"method": self.method}


def cells(policies: list, budgets: list) -> list:
    """A PolicyCell for every policy and budget; full attention once, with no budget."""
    out = []
    for name in policies:
        for budget in [None] if name == "full" else budgets:
            out.append(PolicyCell(name, budget, make_policy(name, budget)))
    return out


def rag_cells(methods: list) -> list:
    for name in methods:
        make_method(name)  # an unknown name is refused here
    return [RagCell(name) for name in methods]


def evaluate(model, task_specs: list, lengths: list, policies: list, budgets: list, samples: int, seed: int, out: str,
             progress: bool = True, methods: list = (), haystack: str = tasks.DEFAULT_HAYSTACK, shard: tuple = (0, 1),
             report: bool = True, sampler=None, batch: int = 1) -> list:
    """Run the grid, append to ``out/predictions.jsonl``, write the summaries; returns metrics.

    ``methods``: RAG methods (:data:`sagekv.rag.METHODS`) run on every sample too; every task must
    have documents. ``haystack``: the synthetic tasks' filler (:data:`sagekv.tasks.HAYSTACKS`).
    ``shard`` (k, n): only every n-th sample from the k-th (:func:`evaluate_in_workers`); ``report``:
    write summary.md, metrics.json and the plots. ``sampler``: a :class:`sagekv.Sampler` for every answer
    (default greedy; its seed restarts for each), recorded in run.json. ``batch``: samples whose answers
    under one policy are decoded together (:meth:`sagekv.SageModel.decode_batch`; the same answers, their
    full prefilled caches held at once); their decode rates are then shares of the batch's time."""
    sampler = check_sampler(sampler)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise SageKVError(f"batch must be a positive integer, got {batch!r}")
    grid = cells(policies, budgets) + rag_cells(methods)
    if not grid:
        raise SageKVError("nothing to evaluate: no policies and no RAG methods")
    check_tasks(task_specs, lengths)
    if haystack not in tasks.HAYSTACKS:
        raise SageKVError(f"unknown haystack {haystack!r} (choose from: {', '.join(tasks.HAYSTACKS)})")
    cases = []
    for spec in task_specs:
        if spec.startswith("longbench:"):
            cases += longbench_cases(spec.split(":", 1)[1], samples, documents=bool(methods))
        else:
            for length in lengths:
                cases += synthetic_cases(spec, length, samples, seed, model.encode, haystack)
    cases = cases[shard[0]::shard[1]]

    os.makedirs(out, exist_ok=True)
    check_run(out, model, sampler)
    path = os.path.join(out, "predictions.jsonl")
    records = read_predictions(path)
    check_answers(path, records, cases)
    done = {record_key(r) for r in records}
    todo = [(case, [cell for cell in grid if record_key(key_of(case, cell)) not in done]) for case in cases]
    window = max((cell.policy.observed_queries for cell in grid if isinstance(cell, PolicyCell)), default=1)
    bar = progress_bar(sum(len(pending) for _, pending in todo), progress)
    with append_to(path) as f:
        for first in range(0, len(todo), batch):
            group = todo[first : first + batch]
            of_kind = lambda kind: [(case, [c for c in pending if isinstance(c, kind)]) for case, pending in group]  # noqa: E731
            answers = itertools.chain(policy_answers(model, of_kind(PolicyCell), window, sampler),
                                      *(rag_answers(model, case, cells, sampler) for case, cells in of_kind(RagCell)))
            for case, cell, result, measured in answers:
                record = {**key_of(case, cell), "prediction": result.text, "answer": case.answer,
                          "score": case.score(result.text), **measured}
                f.write(json.dumps(record) + "\n")
                f.flush()
                bar.update(1)
    bar.close()
    metrics = summarize(read_predictions(path))
    if report:
        write_reports(out, metrics, model)
    return metrics


WORKERS = "workers"  # OUT/workers/K: worker K's share of the grid until it is merged into OUT


def evaluate_in_workers(model, load_args: dict, devices: list, workers: int, *grid, out: str, progress: bool = True,
                        **options) -> list:
    """:func:`evaluate` split over ``workers`` processes side by side, each loading the model with
    ``load_args`` on the next of ``devices`` in turn; decoding a small model is bound by Python, so
    several processes fill one GPU. Worker K answers every ``workers``-th sample from the K-th into
    OUT/workers/K (seeded with OUT's records, so a re-run skips what is done); its new records are
    merged into OUT once all have finished, or on the next run after an interruption. ``model``
    (loaded here too) writes the summaries."""
    import multiprocessing

    merge_workers(out)
    os.makedirs(out, exist_ok=True)
    check_run(out, model, options.get("sampler"))
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
    processes, folders = [], [os.path.join(out, WORKERS, str(k)) for k in range(workers)]
    for k, folder in enumerate(folders):
        os.makedirs(folder, exist_ok=True)
        for name in ("run.json", "predictions.jsonl"):
            if os.path.exists(os.path.join(out, name)):
                shutil.copyfile(os.path.join(out, name), os.path.join(folder, name))
        args = ({**load_args, "device": devices[k % len(devices)]}, grid, {**options, "out": folder, "shard": (k, workers)})
        processes.append(context.Process(target=work, args=args, daemon=True))
        processes[-1].start()
    bar = progress_bar(None, progress)
    paths = [os.path.join(folder, "predictions.jsonl") for folder in folders]
    read = [os.path.getsize(path) if os.path.exists(path) else 0 for path in paths]  # the copied records
    while any(p.is_alive() for p in processes):
        time.sleep(2)
        for i, path in enumerate(paths):
            lines, read[i] = lines_after(path, read[i])
            bar.update(lines)
    bar.close()
    failed = [k for k, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        errors = os.path.join(folders[failed[0]], "error.txt")
        reason = open(errors).read().strip() if os.path.exists(errors) else f"exit status {processes[failed[0]].exitcode}"
        raise SageKVError(f"{len(failed)} of {workers} workers failed; worker {failed[0]}: {reason}")
    merge_workers(out)
    return evaluate(model, *grid, out=out, progress=False, **options)


def work(load_args: dict, grid: tuple, options: dict) -> None:
    """One worker of :func:`evaluate_in_workers`; an error's line goes to its folder's error.txt."""
    from .generate import load

    try:
        evaluate(load(**load_args), *grid, progress=False, report=False, **options)
    except SageKVError as error:
        write_file(os.path.join(options["out"], "error.txt"), str(error))
        raise SystemExit(1)


def lines_after(path: str, start: int) -> tuple:
    """(lines written to ``path`` after byte ``start``, its size now): only what a worker appended is read."""
    if not os.path.exists(path):
        return 0, start
    with open(path, "rb") as f:
        f.seek(start)
        appended = f.read()
    return appended.count(b"\n"), start + len(appended)


def merge_workers(out: str) -> None:
    """Append the workers' records that OUT lacks to OUT/predictions.jsonl, then remove OUT/workers."""
    root = os.path.join(out, WORKERS)
    if not os.path.isdir(root):
        return
    path = os.path.join(out, "predictions.jsonl")
    done = {record_key(r) for r in read_predictions(path)}
    new = []
    for name in sorted(os.listdir(root)):
        for record in read_predictions(os.path.join(root, name, "predictions.jsonl")):
            if record_key(record) not in done:
                done.add(record_key(record))
                new.append(record)
    with append_to(path) as f:
        f.writelines(json.dumps(record) + "\n" for record in new)
    shutil.rmtree(root)


def policy_answers(model, todo: list, window: int, sampler):
    """(case, cell, result, measurements) for each pending policy cell of each case of ``todo`` ([(case,
    cells)]): every case's prompt prefilled once, for all its cells; under each cell, the cases pending it
    decoded together (Quest's, which cannot be batched, one at a time)."""
    todo = [(case, pending) for case, pending in todo if pending]
    prefilled = [model.prefill(model.encode(case.prompt), window) for case, _ in todo]
    for cell in dict.fromkeys(cell for _, pending in todo for cell in pending):  # in the grid's order
        chosen = [(case, prompt) for (case, pending), prompt in zip(todo, prefilled) if cell in pending]
        for group in [chosen] if cell.policy.batches else [[one] for one in chosen]:
            cases = [case for case, _ in group]
            results = model.decode_batch([prompt for _, prompt in group], cell.policy, max(case.max_tokens for case in cases),
                                         on_token=stop_when_answered(model, cases), sampler=sampler)
            for case, result in zip(cases, results):
                yield case, cell, result, {"prompt_tokens": result.prompt_tokens,
                                           **{field: getattr(result.stats, field) for field in STAT_FIELDS}}


def rag_answers(model, case: Case, pending: list, sampler):
    """(case, cell, result, measurements) for each RAG cell; the sample's documents are prefilled once, for all of them."""
    store = MemoryStore(model.store_id)
    for cell in pending:
        result = model.rag(case.documents, case.question, cell.method, store, case.max_tokens,
                           on_token=stop_when_decided(model, case), sampler=sampler)
        stats = result.rag
        yield case, cell, result, {"kept_tokens": stats.kept_tokens, "total_tokens": stats.total_tokens,
                             "kept_fraction": stats.kept_tokens / stats.total_tokens, "ttft_s": stats.ttft_s,
                             "store_s": stats.store_s, "kv_bytes": stats.kv_bytes,
                             "decode_tokens_per_s": result.stats.decode_tokens_per_s}


def stop_when_decided(model, case: Case):
    return None if case.decided is None else (lambda ids: case.decided(model.decode_text(ids)))


def stop_when_answered(model, cases: list):
    """``on_token`` of :meth:`sagekv.SageModel.decode_batch` over ``cases``: each stops at its own max_tokens
    (the batch runs to the largest) or once its score is decided, as it would alone."""
    decided = [stop_when_decided(model, case) for case in cases]
    return lambda index, ids: len(ids) >= cases[index].max_tokens or (decided[index] is not None and decided[index](ids))


def check_tasks(task_specs: list, lengths: list) -> None:
    for spec in task_specs:
        if spec.startswith("longbench:"):
            continue
        if spec not in tasks.TASKS:
            raise SageKVError(f"unknown task {spec!r} (choose from: {', '.join(tasks.TASKS)}, or longbench:FILE.jsonl)")
        too_short = [n for n in lengths if n < tasks.MIN_LENGTH[spec]]
        if too_short:
            raise SageKVError(f"length {too_short[0]} is below {spec}'s minimum of {tasks.MIN_LENGTH[spec]} tokens")


def sample_of(case: Case) -> dict:
    """The fields that name the case's sample (a LongBench case has no haystack)."""
    haystack = {} if case.haystack is None else {"haystack": case.haystack}
    return {"task": case.task, "length": case.length, **haystack, "seed": case.seed}


def key_of(case: Case, cell) -> dict:
    return {**sample_of(case), **cell.key}


def record_key(record: dict, fields: tuple = KEY_FIELDS) -> tuple:
    """The fields a record lacks (a policy record's method, a RAG record's policy and budget) count as None;
    its haystack, lacking (records made before there was a choice, LongBench's), as the default one."""
    return tuple(record.get(k, tasks.DEFAULT_HAYSTACK if k == "haystack" else None) for k in fields)


def append_to(path: str):
    """``path`` opened for appending records; after a run interrupted mid-line, on a line of their own."""
    f = open(path, "a", encoding="utf-8")
    if f.tell():
        with open(path, "rb") as last:
            last.seek(-1, os.SEEK_END)
            if last.read(1) != b"\n":
                f.write("\n")
    return f


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


def check_run(out: str, model, sampler=None) -> None:
    """A results directory belongs to one model (its weights too), backend, dtype and way of decoding
    (``sampler``, default greedy); refuse to mix runs.

    A run.json written before dtypes were recorded names none: its directory takes any dtype and the file
    is left as it is (the dtype of the runs it holds is not known: the reference model's results were
    made in its checkpoint's bfloat16, results/smollm2 in bfloat16 asked of a float32 default). Sampling
    settings are recorded only for sampled runs: a run.json without them was decoded greedily."""
    path = os.path.join(out, "run.json")
    identity = {"model": model.name, "backend": model.backend, "weights": model.weights, "dtype": model.dtype}
    sampler = check_sampler(sampler)
    sampling = sampler.record()
    if not os.path.exists(path):
        write_file(path, json.dumps({**identity, **({"sampling": sampling} if sampling else {})}))
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    previous_sampling = previous.pop("sampling", {})
    previous_dtype = previous.get("dtype", model.dtype)
    if {**previous, "dtype": previous_dtype} != identity:
        same_name = (previous.get("model"), previous.get("backend")) == (model.name, model.backend)
        if same_name and previous.get("weights") == model.weights:
            raise SageKVError(f"{out} holds results of {model.name} in {previous_dtype}, not {model.dtype}; "
                              f"pass --dtype {previous_dtype} or use another --out")
        raise SageKVError(f"{out} holds results of {'other weights of ' if same_name else ''}{previous.get('model')} "
                          f"on {previous.get('backend')}; use another --out")
    if previous_sampling != sampling:
        raise SageKVError(f"{out} holds results decoded with {Sampler(**previous_sampling).describe()}, not "
                          f"{sampler.describe()}; use another --out")


def check_answers(path: str, records: list, cases: list) -> None:
    """Records whose sample now has another answer were made by an older task generator or data file."""
    expected = {record_key(sample_of(case), SAMPLE_FIELDS): case.answer for case in cases}
    for r in records:
        if expected.get(record_key(r, SAMPLE_FIELDS), r["answer"]) != r["answer"]:
            raise SageKVError(f"{path} holds predictions for other {r['task']} samples (seed {r['seed']} now has "
                              f"another answer: the tasks or the data changed); use another --out")


def mean(values: list) -> float:
    return sum(values) / len(values)


POLICY_STATS = {field: mean for field in STAT_FIELDS}
RAG_STATS = {"kept_fraction": mean, "ttft_s": statistics.median, "kv_bytes": mean, "decode_tokens_per_s": mean}


def summarize(records: list) -> list:
    """One cell per (task, length, haystack, policy, budget) or (task, length, haystack, method): n, accuracy
    and its stats. A cell names its haystack only where it is not the default."""
    groups = defaultdict(list)
    for r in records:
        groups[record_key(r, CELL_FIELDS)].append(r)
    metrics = []
    for rs in groups.values():
        cell = {k: rs[0][k] for k in CELL_FIELDS if k in rs[0] and (k, rs[0][k]) != ("haystack", tasks.DEFAULT_HAYSTACK)}
        cell.update(n=len(rs), accuracy=mean([r["score"] for r in rs]))
        stats = RAG_STATS if "method" in cell else POLICY_STATS
        cell.update({field: stat([r[field] for r in rs]) for field, stat in stats.items()})
        metrics.append(cell)
    return sorted(metrics, key=cell_order)


def task_label(cell: dict) -> str:
    """The cell's task as summaries name it: with its haystack where that is not the default."""
    return f"{cell['task']} ({cell['haystack']} haystack)" if "haystack" in cell else cell["task"]


def cell_order(cell: dict) -> tuple:
    """Policy cells by task (and haystack), length, policy and budget; then RAG cells by task, length and
    method in METHODS' order."""
    if "method" in cell:
        return 1, task_label(cell), cell["length"], list(METHODS).index(cell["method"])
    return 0, task_label(cell), cell["length"], cell["policy"], cell["budget"] or 0


def split_cells(metrics: list) -> tuple:
    """(policy cells, RAG cells)."""
    return [m for m in metrics if "method" not in m], [m for m in metrics if "method" in m]


def write_reports(out: str, metrics: list, model) -> None:
    policy_metrics, rag_metrics = split_cells(metrics)
    title = f"{model.name} ({model.backend})"
    sections = []
    if policy_metrics:
        sections.append(summary_markdown(policy_metrics, title))
        plot(policy_metrics, os.path.join(out, POLICY_PLOT))
    if rag_metrics:
        sections.append(rag_markdown(rag_metrics, "## RAG over stored documents" if policy_metrics else
                                     f"# RAG over stored documents: {title}"))
        plot_rag(rag_metrics, os.path.join(out, RAG_PLOT))
    write_file(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    write_file(os.path.join(out, "summary.md"), "\n".join(sections))


def write_file(path: str, text: str) -> None:
    """A temporary file replaced in one step: a reader never sees half a report."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def summary_markdown(metrics: list, title: str) -> str:
    lengths = sorted({m["length"] for m in metrics})
    lines = [f"# Accuracy against KV budget: {title}", "",
             "Budget: KV entries kept per KV head (plus the last prompt token). Accuracy: mean task score.", ""]
    for task in sorted({task_label(m) for m in metrics}):
        rows = defaultdict(dict)
        for m in metrics:
            if task_label(m) == task:
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
        lines.append(f"| {task_label(m)} | {m['length']} | {m['policy']} | {m['budget'] if m['budget'] is not None else '-'} | "
                     f"{m['full_kv_bytes'] / 2**20:.2f} | {m['kept_kv_bytes'] / 2**20:.2f} | {m['prefill_s']:.3f} | "
                     f"{m['select_s'] * 1e3:.2f} | {m['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def rag_markdown(metrics: list, heading: str) -> str:
    """The RAG cells as one table under ``heading``."""
    percent = ttft_percent(metrics)
    lines = [heading, "",
             "Each document prefilled alone and stored. Kept: document tokens in the cache the method decodes on. "
             "TTFT: time to first token from the question's arrival (median; storing the documents is not counted). "
             "KV: that cache's size (mean).", "",
             "| task | length | method | score | n | kept % | TTFT ms | TTFT % of full recompute | KV MiB | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        share = percent.get((task_label(m), m["length"], m["method"]))
        lines.append(f"| {task_label(m)} | {length_label(m['length'])} | {m['method']} | {m['accuracy']:.3f} | {m['n']} | "
                     f"{100 * m['kept_fraction']:.1f} | {m['ttft_s'] * 1e3:.1f} | {'-' if share is None else f'{share:.0f}'} | "
                     f"{m['kv_bytes'] / 2**20:.2f} | {m['decode_tokens_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def ttft_percent(metrics: list) -> dict:
    """(task label, length, method) -> TTFT as % of full_recompute's at that task and length, where it was run."""
    full = {(task_label(m), m["length"]): m["ttft_s"] for m in metrics if m["method"] == "full_recompute"}
    return {(task_label(m), m["length"], m["method"]): 100 * m["ttft_s"] / full[task_label(m), m["length"]]
            for m in metrics if (task_label(m), m["length"]) in full}


def length_label(length: int) -> str:
    return "file lengths" if length == AS_GIVEN else f"{length} tokens"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    temporary = f"{path}.tmp"
    fig.savefig(temporary, dpi=110, format="png")
    os.replace(temporary, path)
    pyplot().close(fig)


def plot(metrics: list, path: str) -> None:
    """One panel per task and length; one line per policy; full attention as a dashed line."""
    plt = pyplot()
    panels = sorted({(task_label(m), m["length"]) for m in metrics})
    columns = min(len(panels), 3)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    for ax, (task, length) in zip(axes.flat, panels):
        cell = [m for m in metrics if task_label(m) == task and m["length"] == length]
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
    save_figure(fig, path)


def plot_rag(metrics: list, path: str) -> None:
    """Score against TTFT, one marker per (method, task, length), its area proportional to the KV bytes
    decoded on (as SamKV's Figure 1); TTFT as % of full recompute's where every cell has that to compare with."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    percent = ttft_percent(metrics)
    relative = len(percent) == len(metrics)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(METHODS)}
    shapes = dict(zip(sorted({(task_label(m), m["length"]) for m in metrics}), itertools.cycle("osD^v<>ph*")))
    largest = max(m["kv_bytes"] for m in metrics)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for m in metrics:
        x = percent[task_label(m), m["length"], m["method"]] if relative else m["ttft_s"] * 1e3
        ax.scatter(x, m["accuracy"], s=400 * m["kv_bytes"] / largest, marker=shapes[task_label(m), m["length"]],
                   color=colors[m["method"]], alpha=0.7, edgecolors="black", linewidths=0.5)
    handles = [Line2D([], [], linestyle="", marker="o", color=colors[name], label=name)
               for name in METHODS if any(m["method"] == name for m in metrics)]
    handles += [Line2D([], [], linestyle="", marker=shape, color="gray", label=f"{task} @ {length_label(length)}")
                for (task, length), shape in shapes.items()]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("TTFT, % of full recompute's (median)" if relative else "TTFT ms (median)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("RAG: score against TTFT (marker area: KV bytes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="record", desc="sagekv eval", dynamic_ncols=True)  # a sample in a cell


def parse_list(text: Optional[str], cast, what: str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SageKVError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not items:
        raise SageKVError(f"--{what} is empty")
    return items
