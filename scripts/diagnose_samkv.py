"""Where SamKV loses: does its selection keep the answer, and does recomputation help or hurt?

For each sample of a needle task (its context cut into documents, ``tasks.documents_of``), finds
the tokens of the answer's value in its document, runs SamKV's selection, and reports whether
those tokens are kept at each selection layer and in the union, the share of document tokens kept,
and the scores of SamKV with recomputation, SamKV without (the kept entries as stored), SamKV
scoring with the question's last query, each also capped at 15% of the tokens (the paper's
share), SamKV selecting tokens instead of blocks (``unit="tokens"``) at 15%, with and without
recomputation and a selection again after a 64-token draft (``lookahead=64``), reuse and full
recompute, on the same documents (``--variants``: some of them). For ``multi_doc_qa_2hop`` the
answer's tokens looked for are the city's, in the second fact. One table of means over the
samples, JSON lines per sample with ``--json``.

    python scripts/diagnose_samkv.py --model smollm2-135m-instruct --device cuda --dtype bfloat16 \
        --task single_needle --length 4096 --seeds 20
"""

import argparse
import json

import numpy as np

import sagekv
from sagekv import evaluate, rag
from sagekv.store import MemoryStore

VARIANTS = {
    "samkv": rag.SamKV(),
    "samkv_stored": rag.SamKV(recompute=False),
    "samkv_last": rag.SamKV(query="last"),
    "samkv_last_stored": rag.SamKV(query="last", recompute=False),
    "samkv_15": rag.SamKV(max_kept=0.15),
    "samkv_15_stored": rag.SamKV(max_kept=0.15, recompute=False),
    "samkv_last_15": rag.SamKV(query="last", max_kept=0.15),
    "samkv_tokens_15": rag.SamKV(unit="tokens", query="last", max_kept=0.15),
    "samkv_tokens_15_stored": rag.SamKV(unit="tokens", query="last", max_kept=0.15, recompute=False),
    "samkv_tokens_15_lookahead": rag.SamKV(unit="tokens", query="last", max_kept=0.15, lookahead=64),
    "samkv_tokens_15_lookahead_stored": rag.SamKV(unit="tokens", query="last", max_kept=0.15, recompute=False,
                                                  lookahead=64),
    "reuse": rag.Reuse(),
    "full_recompute": rag.FullRecompute(),
}


def answer_rows(model, documents, value: str):
    """(piece index, local rows) of the value's tokens; piece 0 is the preamble when there is one."""
    first = 1 if model.preamble_ids() else 0
    for index, document in enumerate(documents):
        at = document.find(value)
        if at >= 0:
            start = len(model.encode_plain(document[:at].rstrip(" ")))
            stop = len(model.encode_plain(document[: at + len(value)]))
            return first + index, np.arange(start, stop)
    raise ValueError(f"{value!r} is in no document")


def diagnose(model, task: str, length: int, seed: int, variants: list) -> dict:
    case = evaluate.synthetic_cases(task, length, 1, seed, model.encode)[0]  # as sagekv eval --methods has it
    pieces_ids, question_ids = rag.prompt_ids(model, case.documents, case.question, case.max_tokens)
    store = MemoryStore(model.store_id)
    value = case.answer.split()[-1] if task == "multi_doc_qa_2hop" else case.answer  # the second fact's city
    piece, rows = answer_rows(model, case.documents, value)
    with model.runner.inference():
        pieces = rag.stored_pieces(model, store, pieces_ids)
        chosen = VARIANTS["samkv"].select(model, pieces, question_ids)
        capped = VARIANTS["samkv_15"].select(model, pieces, question_ids)
        tokens = VARIANTS["samkv_tokens_15"].select(model, pieces, question_ids)
        ahead = VARIANTS["samkv_tokens_15_lookahead"].select(model, pieces, question_ids)
    out = {"seed": seed, "tokens": sum(map(len, pieces_ids)) + len(question_ids), "documents": len(case.documents),
           "kept_share": rag.kept_count(chosen) / sum(map(len, pieces_ids)),
           "answer_kept_per_layer": [float(np.isin(rows, layer).mean()) for layer in chosen[piece]],
           "answer_kept": float(np.isin(rows, rag.kept_rows(chosen)[piece]).mean()),
           "answer_kept_15": float(np.isin(rows, rag.kept_rows(capped)[piece]).mean()),
           "answer_kept_tokens_15": float(np.isin(rows, rag.kept_rows(tokens)[piece]).mean()),
           "answer_kept_tokens_15_lookahead": float(np.isin(rows, rag.kept_rows(ahead)[piece]).mean())}
    for name in variants:
        method = VARIANTS[name]
        result = rag.rag_ids(model, pieces_ids, question_ids, method, store, case.max_tokens,
                             on_token=evaluate.stop_when_decided(model, case))
        out[name] = case.score(result.text)
        out[name + "_kept"] = result.rag.kept_tokens / result.rag.total_tokens
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--task", default="single_needle",
                        choices=["single_needle", "multi_key", "multi_doc_qa", "multi_doc_qa_2hop"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: all)")
    parser.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--json", default=None, help="write one JSON line per sample here")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)} (choose from: {', '.join(VARIANTS)})")
    model = sagekv.load(args.model, args.backend, args.device, args.dtype)
    rows = [diagnose(model, args.task, args.length, seed, variants) for seed in range(args.seeds)]
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    mean = lambda key: float(np.mean([row[key] for row in rows]))  # noqa: E731
    print(f"{model.name}, {model.backend}, {args.task}, {mean('tokens'):.0f} tokens on average ("
          f"{mean('documents'):.1f} documents), {len(rows)} seeds")
    layers = np.mean([row["answer_kept_per_layer"] for row in rows], axis=0)
    print(f"SamKV keeps {mean('kept_share'):.1%} of document tokens; answer tokens kept: "
          f"{mean('answer_kept'):.2f} in the union, per selection layer {', '.join(f'{x:.2f}' for x in layers)}; "
          f"capped at 15%: {mean('answer_kept_15'):.2f}; tokens at 15%: {mean('answer_kept_tokens_15'):.2f}, "
          f"with lookahead: {mean('answer_kept_tokens_15_lookahead'):.2f}")
    print("| method | score | kept |\n|---|---|---|")
    for name in variants:
        print(f"| {name} | {mean(name):.2f} | {mean(name + '_kept'):.1%} |")


if __name__ == "__main__":
    main()
