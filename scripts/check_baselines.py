"""Check each baseline against its paper's claim on needle retrieval, on a real model.

Each sample is prefilled once; every policy at every budget then decodes from a copy of that
cache and stops once the answer is decided. Budgets are fractions of the sample's prompt tokens
(a value up to 1: "1/4", "1") or absolute counts ("512"). One table per task: accuracy per policy
and budget next to full attention's. What to read in it:

- every policy at budget 1 (the whole prompt): full attention's answers (the line under the table
  counts the samples whose text equals full attention's; Quest's only nearly: its budget caps what
  one step reads, and the context outgrows the prompt while decoding);
- Quest (arXiv 2406.10774): near full accuracy from 1/4 of the context;
- SnapKV (arXiv 2404.14469): near full on needle retrieval at modest budgets;
- StreamingLLM (arXiv 2309.17453): only needles inside its sink + recent window are answered; the
  row "streaming: needle in window" is the share of samples whose answer's tokens all are;
- SAGE-KV (arXiv 2503.08879): near full at small budgets.

    python scripts/check_baselines.py --model PATH --backend torch --device cuda --dtype bfloat16 \\
        --length 2048 --seeds 20 --json baselines.json
"""

import argparse
import json
import statistics
from collections import defaultdict
from fractions import Fraction

import sagekv
from sagekv.evaluate import stop_when_decided, synthetic_cases
from sagekv.policies import make_policy

CLAIMS = "quest,snapkv,streaming,sagekv,sagekv_kv_follow"


def budget_of(spec: str, n: int) -> int:
    """Tokens of a budget spec for an n-token prompt: a fraction of n up to 1, else a count."""
    value = Fraction(spec)
    return round(n * value) if value <= 1 else int(value)


def answer_span(model, prompt: str, answer: str) -> tuple:
    """Token positions [start, end) of the answer's only occurrence in the prompt (up to a token
    at either end, where the tokenizer merges across the cut)."""
    start = prompt.index(answer)
    return len(model.encode(prompt[:start])), len(model.encode(prompt[: start + len(answer)]))


def in_window(policy, n: int, span: tuple) -> bool:
    """Whether a policy that selects nothing (StreamingLLM) keeps every token of ``span``."""
    layout = policy.layout(n, 1, 1)
    evicted = layout.candidates
    return not layout.evicts or span[1] <= evicted.start or span[0] >= evicted.stop


def run_case(model, case, policies: list, specs: list) -> list:
    """One record per policy and budget (and one for full attention), all from one prefill."""
    ids = model.encode(case.prompt)
    n = len(ids)
    cells = [("full", None, sagekv.Full())]
    cells += [(name, spec, make_policy(name, budget_of(spec, n))) for name in policies for spec in specs]
    prefilled = model.prefill(ids, max(policy.observed_queries for _, _, policy in cells))
    span = answer_span(model, case.prompt, case.answer)
    records = []
    for name, spec, policy in cells:
        result = model.decode(prefilled, policy, case.max_tokens, on_token=stop_when_decided(model, case))
        records.append({"task": case.task, "seed": case.seed, "prompt_tokens": n, "policy": name, "budget": spec,
                        "budget_tokens": getattr(policy, "budget", None), "prediction": result.text,
                        "answer": case.answer, "score": case.score(result.text),
                        "needle_in_window": in_window(policy, n, span) if name == "streaming" else None})
    return records


def table(records: list, policies: list, specs: list) -> str:
    """Markdown: mean score per policy and budget, the streaming window line, and budget-1 agreement."""
    score, window, same = defaultdict(list), defaultdict(list), defaultdict(list)
    full = {r["seed"]: r for r in records if r["policy"] == "full"}
    for r in records:
        score[r["policy"], r["budget"]].append(r["score"])
        if r["needle_in_window"] is not None:
            window[r["budget"]].append(r["needle_in_window"])
        if r["budget"] == "1":
            same[r["policy"]].append(r["prediction"] == full[r["seed"]]["prediction"])
    tokens = {spec: statistics.mean(r["budget_tokens"] for r in records if r["budget"] == spec) for spec in specs}
    mean = lambda values: f"{statistics.mean(values):.2f}"  # noqa: E731
    lines = [f"full attention: {mean(score['full', None])}", "",
             "| policy | " + " | ".join(f"{spec} ({tokens[spec]:.0f})" for spec in specs) + " |",
             "|---" * (len(specs) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(mean(score[name, spec]) for spec in specs) + " |" for name in policies]
    if window:
        lines.append("| streaming: needle in window | " + " | ".join(mean(window[spec]) for spec in specs) + " |")
    if same:
        lines += ["", "budget 1, same text as full attention: " + ", ".join(f"{name} {sum(v)}/{len(v)}" for name, v in same.items())]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the reference model)")
    parser.add_argument("--backend", choices=["mlx", "torch"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--seeds", type=int, default=4, help="samples per task (seeds 0..N-1)")
    parser.add_argument("--tasks", default="single_needle,multi_key")
    parser.add_argument("--policies", default=CLAIMS)
    parser.add_argument("--budgets", default="1/16,1/8,1/4,1/2,1", help="fractions of the prompt (up to 1) or counts")
    parser.add_argument("--json", default=None, help="write every record and the settings here")
    args = parser.parse_args()
    policies, specs = args.policies.split(","), args.budgets.split(",")

    model = sagekv.load(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    records = []
    for task in args.tasks.split(","):
        cases = synthetic_cases(task, args.length, args.seeds, 0, model.encode)
        done = [r for case in cases for r in run_case(model, case, policies, specs)]
        tokens = statistics.mean(r["prompt_tokens"] for r in done)
        where = " ".join(filter(None, [model.backend, args.device, args.dtype]))
        print(f"\n## {task}: {tokens:.0f} tokens on average (asked {args.length}), {len(cases)} seeds; {model.name} on {where}\n")
        print(table(done, policies, specs), flush=True)
        records += done
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "model": model.name, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
