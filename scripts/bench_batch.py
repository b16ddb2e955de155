"""Decode throughput over a batch: a compact cache against the full cache, each at every batch that fits.

One random prompt of ``--length`` tokens is prefilled once and selected once per policy; the batch decodes
B copies of that selected cache together (SageModel.decode_batch), so a batch costs the copies, not B
prefills. Batches double from 1 until one runs out of device memory (or reaches ``--max-batch``); the
table gives, per policy and batch, tokens/s over the batch (steady steps), the floor (copy bandwidth /
(weight bytes + B caches) per step, B tokens) and the peak device memory, then the best throughput of each
policy and its ratio to full attention's best, all from one run.

    python scripts/bench_batch.py --shape llama3-8b --device cuda --dtype bfloat16 --length 32768 --budget 2048
"""

import argparse
import json
import os
import sys

import numpy as np

import sagekv
from sagekv.checkpoints import SHAPES, add_model_option

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import PREFILL_CHUNK, STEADY_FROM, TorchBench, load, steady_decode  # noqa: E402


def out_of_memory(error: Exception) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def sweep(model, bench, selected, tokens: int, max_batch: int):
    """(batch, tok/s over the batch, peak bytes) for batches 1, 2, 4, ... until memory runs out."""
    rows, batch = [], 1
    while batch <= max_batch:
        bench.free()
        if bench.cuda:
            bench.torch.cuda.reset_peak_memory_stats()
        try:
            _, tok_s = steady_decode(model, selected, None, tokens, batch)
        except Exception as error:  # noqa: BLE001  the first batch that does not fit ends the sweep
            if not out_of_memory(error):
                raise
            bench.free()
            print(f"  batch {batch}: out of memory", flush=True)
            break
        rows.append((batch, tok_s, bench.peak_bytes()))
        batch *= 2
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default=None)
    add_model_option(parser)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--policies", default="sagekv_kv_follow", help="besides full attention")
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--copy-mib", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.decode_tokens < STEADY_FROM + 2:
        parser.error(f"--decode-tokens must be at least {STEADY_FROM + 2}")
    args.backend = "torch"
    model = load(args)
    model.runner.eos_ids = set()  # a fixed decode length
    bench = TorchBench(model.runner)
    bandwidth = bench.copy_bandwidth((args.copy_mib or (2048 if bench.cuda else 256)) << 20)
    ids = [256] + np.random.default_rng(0).integers(0, 256, args.length - 1).tolist()
    policies = [("full", sagekv.Full())] + [(name, sagekv.make_policy(name, args.budget)) for name in args.policies.split(",")]
    prefilled = model.prefill(ids, max(p.observed_queries for _, p in policies), PREFILL_CHUNK)
    print(f"{args.shape if args.model is None else model.name}, {model.dtype} on {bench.device}; {bench.versions}; "
          f"prompt {args.length} tokens, budget {args.budget}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{args.decode_tokens} decoded tokens per sequence")
    print("| policy | batch | KV per sequence MiB | decode tok/s (batch) | floor tok/s | x floor | peak GiB |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    rows, best = [], {}
    for name, policy in policies:
        selected = model.select(prefilled, policy)
        kept_bytes = model.runner.kv_bytes(selected.cache)
        for batch, tok_s, peak in sweep(model, bench, selected, args.decode_tokens, args.max_batch):
            floor = batch * bandwidth / (bench.weight_bytes + batch * kept_bytes)
            rows.append({"policy": name, "batch": batch, "kv_bytes_per_sequence": kept_bytes, "decode_tok_s": tok_s,
                         "floor_tok_s": floor, "peak_bytes": peak})
            best[name] = max(best.get(name, (0, 0)), (tok_s, batch))
            peak_text = f"{peak / 2**30:.1f}" if peak is not None else "-"
            print(f"| {name} | {batch} | {kept_bytes / 2**20:.1f} | {tok_s:.1f} | {floor:.1f} | {floor / tok_s:.2f} | "
                  f"{peak_text} |", flush=True)
        del selected
    print("\n| policy | best tok/s | at batch | x full's best |\n|---|---|---|---|")
    for name, (tok_s, batch) in best.items():
        print(f"| {name} | {tok_s:.1f} | {batch} | {tok_s / best['full'][0]:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "device": bench.device, "versions": bench.versions,
                       "copy_bandwidth_bytes_per_s": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
