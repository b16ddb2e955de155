"""The built-in example of ``sagekv run``: one task sample, full attention against a policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import tasks
from .policies import Full

TASK, LENGTH, SEED, BUDGET = "multi_key", 4096, 0, 256
MAX_TOKENS = 16  # the answer is a few digits


@dataclass
class Example:
    sample: tasks.Sample
    full: object  # Result
    evicted: object  # Result
    answer_positions: list
    """Prompt positions of the answer's tokens (located by tokenizing the text before them)."""

    def answer_kept_layers(self) -> int:
        """Layers in which some head kept every token of the answer."""
        kept = self.evicted.kept_positions
        if kept is None:
            return -1
        wanted = set(self.answer_positions)
        return sum(any(wanted <= set(row.tolist()) for row in np.atleast_2d(layer)) for layer in kept)


def run_example(model, policy, max_tokens: int = MAX_TOKENS, sampler=None) -> Example:
    sample = tasks.generate_in_tokens(TASK, LENGTH, SEED, model.encode)
    ids = model.encode(sample.prompt)
    prefilled = model.prefill(ids, policy.observed_queries)
    full = model.decode(prefilled, Full(), max_tokens, sampler=sampler)
    evicted = model.decode(prefilled, policy, max_tokens, sampler=sampler)
    start = sample.prompt.index(sample.answer)
    first = len(model.encode(sample.prompt[:start]))
    last = len(model.encode(sample.prompt[: start + len(sample.answer)]))
    return Example(sample, full, evicted, list(range(first, last)))


def report(example: Example, policy_label: str, layers: int) -> str:
    s, full, evicted = example.sample, example.full, example.evicted
    verdict = lambda r: "correct" if tasks.score(s, r.text) == 1 else "wrong"  # noqa: E731
    question = s.question.strip().splitlines()[0]
    share = evicted.stats.kept_kv_bytes / full.stats.kept_kv_bytes
    width = max(len("full attention"), len(policy_label)) + 1
    lines = [
        f"Built-in example: {s.task}, {full.prompt_tokens} tokens (evaluation seed {s.seed})",
        question,
        f"{'expected':<{width}}: {s.answer}",
        f"{'full attention':<{width}}: {full.text.strip()!r} [{verdict(full)}]  KV {full.stats.kept_kv_bytes / 2**20:.2f} MiB, "
        f"all {full.prompt_tokens} positions kept",
        f"{policy_label:<{width}}: {evicted.text.strip()!r} [{verdict(evicted)}]  KV {evicted.stats.kept_kv_bytes / 2**20:.2f} MiB "
        f"({share:.1%} of full)",
    ]
    kept_layers = example.answer_kept_layers()
    if kept_layers >= 0:
        per_row = example.evicted.kept_positions[0].shape[1]
        lines.append(f"{policy_label} kept {per_row} of {full.prompt_tokens} positions per head; the needle's value "
                     f"(positions {example.answer_positions[0]}-{example.answer_positions[-1]}) survived in "
                     f"{kept_layers} of {layers} layers")
    return "\n".join(lines)
