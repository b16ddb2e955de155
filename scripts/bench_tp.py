"""Tensor parallelism: one generation on one process and sharded by heads over N (torchrun), side by side.

The launcher starts ``torchrun --nproc_per_node 1`` and ``--nproc_per_node N`` on this script (``--worker``);
each process loads the checkpoint (sharded by transformers' ``tp_plan="auto"`` when there are several, one
per GPU, or gloo processes on the CPU), generates greedily from one random prompt under each policy (a
warm-up, then a measured run) and the first process writes the tokens and decode tok/s. One table then gives,
per policy, whether the sharded tokens equal the single process's, and both decode speeds.

    python scripts/bench_tp.py --shape small --gpus 2 --length 8192 --budget 1024
    python scripts/bench_tp.py --model PATH --gpus 2 --dtype bfloat16
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import sagekv
from sagekv.checkpoints import SHAPES, make_tiny_checkpoint


def worker(args):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = sagekv.load(args.model, backend="torch", device=args.device, dtype=args.dtype, tensor_parallel=world > 1)
    model.runner.eos_ids = set()  # a fixed decode length
    ids = [1] + np.random.default_rng(0).integers(2, 250, args.length - 1).tolist()
    rows = []
    for name in args.policies.split(","):
        policy = sagekv.make_policy(name, None if name == "full" else args.budget)
        model.generate_ids(ids, policy, args.max_tokens)  # warm-up
        result = model.generate_ids(ids, policy, args.max_tokens)
        rows.append({"policy": name, "tokens": result.tokens, "decode_tok_s": result.stats.decode_tokens_per_s,
                     "kept_kv_bytes": result.stats.kept_kv_bytes})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"processes": world, "device": str(model.runner.device), "rows": rows}, f)


def launch(args, processes: int, out: str):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", __file__,
               "--worker", "--model", args.model, "--out", out, "--length", str(args.length), "--budget", str(args.budget),
               "--max-tokens", str(args.max_tokens), "--policies", args.policies]
    command += [f"--{name}={value}" for name, value in (("device", args.device), ("dtype", args.dtype)) if value]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: one of --shape, random weights)")
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--gpus", type=int, default=2, help="processes of the sharded run (GPUs, or CPU processes)")
    parser.add_argument("--device", default=None, help="cpu to stay on the CPU where there are GPUs")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--policies", default="full,sagekv_kv_follow,sagekv,streaming,snapkv")
    parser.add_argument("--json", default=None, help="also write both runs here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    name = args.model or args.shape
    with tempfile.TemporaryDirectory() as folder:
        if args.model is None:
            args.model = make_tiny_checkpoint(os.path.join(folder, args.shape), "llama", dtype=args.dtype or "float32",
                                              **SHAPES[args.shape])
        runs = [launch(args, n, os.path.join(folder, f"run{n}.json")) for n in (1, args.gpus)]
    one, sharded = runs
    print(f"{name}: prompt {args.length} tokens, budget {args.budget}, "
          f"{args.max_tokens} tokens; 1 process ({one['device']}) against {args.gpus} (the first on {sharded['device']})")
    print(f"| policy | same tokens | decode tok/s, 1 process | decode tok/s, {args.gpus} processes | KV per process MiB |")
    print("|---|---|---|---|---|")
    for a, b in zip(one["rows"], sharded["rows"]):
        print(f"| {a['policy']} | {'yes' if a['tokens'] == b['tokens'] else 'NO'} | {a['decode_tok_s']:.1f} | "
              f"{b['decode_tok_s']:.1f} | {a['kept_kv_bytes'] / 2**20:.2f} / {b['kept_kv_bytes'] / 2**20:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0 if all(a["tokens"] == b["tokens"] for a, b in zip(one["rows"], sharded["rows"])) else 1


if __name__ == "__main__":
    sys.exit(main())
