"""Regenerate results/: the accuracy-against-budget grid on one model and the paper's comparisons.

    python scripts/make_results_page.py --model PATH [--backend mlx --device gpu] [--samples 20] [--out results]

Runs (or resumes) ``sagekv eval`` over every task at 2K/4K/8K tokens, every policy and budgets
64..2048, then writes OUT/README.md (comparisons, per-task tables, memory and time) next to
OUT/accuracy_vs_budget.png and the raw metrics.json / predictions.jsonl.
"""

import argparse
import os

import sagekv
from sagekv.analysis import SOLVED_SCORE, comparisons_markdown, solved_tasks
from sagekv.evaluate import evaluate, summary_markdown
from sagekv.policies import NAMED
from sagekv.tasks import TASKS

LENGTHS = [2048, 4096, 8192]
BUDGETS = [64, 128, 256, 512, 1024, 2048]
POLICIES = ["full", "sagekv", "sagekv_pool", "sagekv_kv", "sagekv_follow", "sagekv_kv_follow", "streaming", "snapkv",
            "quest", "tova", "knorm", "random"]
assert set(POLICIES) <= set(NAMED)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled reference model")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    model = sagekv.load(args.model, backend=args.backend, device=args.device)
    metrics = evaluate(model, args.tasks.split(","), [int(n) for n in args.lengths.split(",")], POLICIES,
                       [int(b) for b in args.budgets.split(",")], args.samples, 0, args.out)
    command = "python scripts/make_results_page.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    solved = solved_tasks(metrics)
    if solved and len(solved) < len({m["task"] for m in metrics}):  # judge eviction where full attention answers
        comparisons = [f"## On the tasks full attention solves ({', '.join(solved)}: {SOLVED_SCORE} or more at every length)", "",
                       comparisons_markdown([m for m in metrics if m["task"] in solved], level=3),
                       "## On all tasks", "", comparisons_markdown(metrics, level=3)]
    else:
        comparisons = [comparisons_markdown(metrics)]
    page = [f"# Results: {model.name} ({model.backend}, device {getattr(model.runner, 'device', 'default')})", "",
            f"Regenerate with `{command}` ({args.samples} evaluation seeds per task and length).", "",
            "![accuracy against budget](accuracy_vs_budget.png)", "", *comparisons,
            summary_markdown(metrics, "per task").split("\n", 1)[1]]
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(page))
    print(f"wrote {args.out}/README.md")


if __name__ == "__main__":
    main()
