"""The paper's comparisons, read off ``sagekv eval`` metrics (arXiv 2503.08879, Sec. 3.2).

Accuracies are averaged over tasks at one prompt length, as the paper averages LongBench tasks.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from .evaluate import task_label
from .policies import NAMED

VARIANTS = [name for name in NAMED if name.startswith("sagekv")]  # "sagekv" itself is the paper's setting
SOLVED_SCORE = 0.8  # full attention at or above this at every length: a task where eviction can be judged


def task_mean(metrics: list, policy: str, budget: Optional[int], length: int) -> Optional[float]:
    """Mean accuracy over the tasks evaluated at ``length`` (a task on another haystack counts as
    another task); None unless every task has the cell."""
    tasks = {task_label(m) for m in metrics if m["length"] == length}
    cells = {task_label(m): m["accuracy"] for m in metrics
             if m["length"] == length and m["policy"] == policy and m["budget"] == budget}
    if not tasks or set(cells) != tasks:
        return None
    return sum(cells.values()) / len(cells)


def lengths_of(metrics: list) -> list:
    return sorted({m["length"] for m in metrics})


def budgets_of(metrics: list, policy: str) -> list:
    return sorted({m["budget"] for m in metrics if m["policy"] == policy and m["budget"] is not None})


def gap_to_full(metrics: list, policy: str, fraction: float = 1 / 16) -> list:
    """(length, budget, accuracy, full accuracy) at budget = length x fraction, where evaluated."""
    rows = []
    for length in lengths_of(metrics):
        budget = round(length * fraction)
        ours, full = task_mean(metrics, policy, budget, length), task_mean(metrics, "full", None, length)
        if ours is not None and full is not None:
            rows.append((length, budget, ours, full))
    return rows


def matching_budget(metrics: list, policy: str, baseline: str, ratio: int, length: int):
    """Smallest budget B at which ``policy`` reaches ``baseline``'s accuracy at ratio x B, with both values.

    Both at zero is no match: it says nothing about memory.
    """
    for budget in budgets_of(metrics, policy):
        ours = task_mean(metrics, policy, budget, length)
        theirs = task_mean(metrics, baseline, budget * ratio, length)
        if ours is not None and theirs is not None and ours >= theirs and ours > 0:
            return budget, ours, theirs
    return None


def best_variant(metrics: list, variants: list) -> tuple:
    """(winner, {variant: mean accuracy over all lengths and budgets all variants share})."""
    shared = set.intersection(*(set(budgets_of(metrics, v)) for v in variants)) if variants else set()
    scores = defaultdict(list)
    for length in lengths_of(metrics):
        for budget in sorted(shared):
            values = {v: task_mean(metrics, v, budget, length) for v in variants}
            if all(x is not None for x in values.values()):
                for v, x in values.items():
                    scores[v].append(x)
    means = {v: sum(xs) / len(xs) for v, xs in scores.items() if xs}
    return (max(means, key=means.get) if means else None), means


def solved_tasks(metrics: list, threshold: float = SOLVED_SCORE) -> list:
    """Tasks on which full attention reaches ``threshold`` at every length: where eviction can be judged."""
    tasks = dict.fromkeys(task_label(m) for m in metrics)
    return [t for t in tasks if all(m["accuracy"] >= threshold for m in metrics if task_label(m) == t and m["policy"] == "full")]


def comparisons_markdown(metrics: list, level: int = 2) -> str:
    """The answers to the paper's questions, as markdown with headings at ``level``."""
    variants = [v for v in VARIANTS if any(m["policy"] == v for m in metrics)]
    winner, means = best_variant(metrics, variants)
    h = "#" * level
    lines = [f"{h} SAGE-KV against full attention at 1/16 of the context", "",
             "| length | budget | policy | accuracy | full attention | gap |", "|---|---|---|---|---|---|"]
    for policy in variants:
        for length, budget, ours, full in gap_to_full(metrics, policy):
            lines.append(f"| {length} | {budget} | {policy} | {ours:.3f} | {full:.3f} | {ours - full:+.3f} |")
    lines += ["", f"{h} Budget at which SAGE-KV matches a baseline with more memory", "",
              "| length | policy | baseline at | smallest budget B | policy at B | baseline at ratio x B |",
              "|---|---|---|---|---|---|"]
    for length in lengths_of(metrics):
        for policy in dict.fromkeys(v for v in ("sagekv", winner) if v in variants):  # the paper's and the best
            for baseline, ratio in (("streaming", 4), ("quest", 2)):
                found = matching_budget(metrics, policy, baseline, ratio, length)
                cells = (f"{found[0]} | {found[1]:.3f} | {found[2]:.3f}" if found else "none in the grid | - | -")
                lines.append(f"| {length} | {policy} | {baseline} x{ratio} | {cells} |")
    lines += ["", f"{h} Which SAGE-KV variant to ship", "",
              "Mean accuracy over every length and budget all of them were run at:", ""]
    lines += [f"- `{v}`: {x:.3f}" for v, x in sorted(means.items(), key=lambda kv: -kv[1])]
    if winner:
        lines += ["", f"Highest: `{winner}`."]
    return "\n".join(lines) + "\n"
