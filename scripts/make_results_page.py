"""Regenerate results/: the accuracy-against-budget grid on one model and the paper's comparisons;
with --rag, RAG methods over stored documents too.

    python scripts/make_results_page.py --model PATH [--backend mlx --device gpu] [--samples 20] [--out results] [--rag | --rag-only]

Runs (or resumes) ``sagekv eval`` over every task at 2K/4K/8K tokens, every policy and budgets
64..2048, then writes OUT/README.md (comparisons, per-task tables, memory and time) next to
OUT/accuracy_vs_budget.png and the raw metrics.json / predictions.jsonl. ``--rag`` also runs every
RAG method on multi_doc_qa and multi_doc_qa_2hop at 4K/8K into a "RAG over stored documents" section
(a table and OUT/rag_score_vs_ttft.png); ``--rag-only`` runs that grid alone.
"""

import argparse
import os

import sagekv
from sagekv.analysis import SOLVED_SCORE, comparisons_markdown, solved_tasks
from sagekv.evaluate import (RAG_PLOT, evaluate, evaluate_in_workers, rag_markdown, split_cells, summary_markdown, task_label,
                             write_file)
from sagekv.policies import NAMED
from sagekv.rag import METHODS
from sagekv.tasks import DEFAULT_HAYSTACK, DOCUMENT_TASKS, HAYSTACKS, TASKS

LENGTHS = [2048, 4096, 8192]
BUDGETS = [64, 128, 256, 512, 1024, 2048]
POLICIES = ["full", "sagekv", "sagekv_pool", "sagekv_kv", "sagekv_follow", "sagekv_kv_follow", "streaming", "snapkv",
            "quest", "tova", "knorm", "random"]
assert set(POLICIES) <= set(NAMED)
RAG_LENGTHS = [4096, 8192]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled reference model")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--rag", action="store_true", help="also the RAG methods over stored documents")
    parser.add_argument("--rag-only", action="store_true", help="the RAG methods alone")
    parser.add_argument("--rag-lengths", default=",".join(map(str, RAG_LENGTHS)))
    parser.add_argument("--rag-tasks", default=",".join(DOCUMENT_TASKS), help="tasks without documents are cut into them")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--haystacks", default=DEFAULT_HAYSTACK, help=f"from: {', '.join(HAYSTACKS)}")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--workers", type=int, default=1, help="eval processes side by side (sagekv eval --workers)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    devices = args.device.split(",") if args.device else [None]
    model = sagekv.load(args.model, backend=args.backend, device=devices[0], dtype=args.dtype)

    def grid(task_list: str, lengths: str, policies: list, budgets: list, methods: list = ()):
        for haystack in args.haystacks.split(","):
            cells = (task_list.split(","), [int(n) for n in lengths.split(",")], policies, budgets, args.samples, 0)
            options = dict(out=args.out, methods=methods, haystack=haystack)
            if args.workers > 1:
                load_args = dict(model=args.model, backend=args.backend, dtype=args.dtype)
                metrics = evaluate_in_workers(model, load_args, devices, args.workers, *cells, **options)
            else:
                metrics = evaluate(model, *cells, **options)
        return metrics

    if not args.rag_only:
        metrics = grid(args.tasks, args.lengths, args.policies.split(","), [int(b) for b in args.budgets.split(",")])
    if args.rag or args.rag_only:
        metrics = grid(args.rag_tasks, args.rag_lengths, [], [], list(METHODS))
    policy_metrics, rag_metrics = split_cells(metrics)  # all the directory holds, of both kinds
    page = [f"# Results: {model.name} ({model.backend}, device {getattr(model.runner, 'device', 'default')})", "",
            f"Regenerate with `{command_line(args, parser)}` ({args.samples} evaluation seeds per task and length).", ""]
    if not args.rag_only:
        page += policy_sections(policy_metrics)
    if args.rag or args.rag_only:
        page += [rag_markdown(rag_metrics, "## RAG over stored documents"), "![score against TTFT](" + RAG_PLOT + ")", ""]
    write_file(os.path.join(args.out, "README.md"), "\n".join(page))
    print(f"wrote {args.out}/README.md")


def command_line(args, parser) -> str:
    """The command that regenerates the page: the options given other than their defaults."""
    words = ["python scripts/make_results_page.py"]
    for name, value in vars(args).items():
        flag = "--" + name.replace("_", "-")
        if value == parser.get_default(name) or args.rag_only and name in ("tasks", "lengths", "budgets", "policies"):
            continue  # a default, or the policy grid's settings where it is not run
        words.append(flag if value is True else f"{flag} {value}")
    return " ".join(words)


def policy_sections(metrics: list) -> list:
    """The plot, the paper's comparisons (on the tasks full attention solves, if not all) and the per-task tables."""
    solved = solved_tasks(metrics)
    if solved and len(solved) < len({task_label(m) for m in metrics}):  # judge eviction where full attention answers
        comparisons = [f"## On the tasks full attention solves ({', '.join(solved)}: {SOLVED_SCORE} or more at every length)", "",
                       comparisons_markdown([m for m in metrics if task_label(m) in solved], level=3),
                       "## On all tasks", "", comparisons_markdown(metrics, level=3)]
    else:
        comparisons = [comparisons_markdown(metrics)]
    return ["![accuracy against budget](accuracy_vs_budget.png)", "", *comparisons,
            summary_markdown(metrics, "per task").split("\n", 1)[1]]


if __name__ == "__main__":
    main()
