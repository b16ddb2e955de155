"""Benchmark prefill, selection and decode speed and KV memory: full attention vs eviction.

Builds a random Llama-shaped checkpoint (no download), runs each policy on random prompts and
prints one table per backend with medians over repeats and speed ratios to full attention.

    python scripts/bench_decode.py --backend torch --device cuda --dtype bfloat16
"""

import argparse
import statistics
import tempfile

import numpy as np

import sagekv
from sagekv.checkpoints import make_tiny_checkpoint


def median_stats(model, ids, policy, decode_tokens, repeats):
    runs = [model.generate_ids(ids, policy, decode_tokens) for _ in range(repeats + 1)][1:]  # first run warms up
    pick = lambda f: statistics.median(f(r.stats) for r in runs)  # noqa: E731
    return {
        "full_mib": runs[0].stats.full_kv_bytes / 2**20,
        "kept_mib": runs[0].stats.kept_kv_bytes / 2**20,
        "prefill_s": pick(lambda s: s.prefill_s),
        "select_ms": pick(lambda s: s.select_s) * 1e3,
        "tok_s": pick(lambda s: s.decode_tokens_per_s),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["mlx", "torch"], default="torch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--budgets", default="512,2048")
    parser.add_argument("--policies", default="sagekv,sagekv_kv,streaming", help="compared with full attention")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as path:
        make_tiny_checkpoint(
            path, "llama", num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
            max_position_embeddings=1 << 20, initializer_range=0.02,
        )
        model = sagekv.load(path, backend=args.backend, device=args.device, dtype=args.dtype)
        model.runner.eos_ids = set()  # fixed decode length
        rng = np.random.default_rng(0)
        print(f"backend {args.backend} device {args.device} dtype {args.dtype}: {args.layers} layers, hidden "
              f"{args.hidden}, {args.heads} query / {args.kv_heads} KV heads; {args.decode_tokens} decoded tokens, "
              f"median of {args.repeats}")
        print("| prompt | policy | budget | KV full MiB | KV kept MiB | prefill s | select ms | decode tok/s | x full |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in map(int, args.lengths.split(",")):
            ids = [256] + rng.integers(32, 127, n - 1).tolist()
            policies = [("full", None, sagekv.Full())]
            for b in map(int, args.budgets.split(",")):
                policies += [(name, b, sagekv.make_policy(name, b)) for name in args.policies.split(",")]
            base = None
            for name, budget, policy in policies:
                s = median_stats(model, ids, policy, args.decode_tokens, args.repeats)
                base = base or s["tok_s"]
                print(f"| {n} | {name} | {budget or '-'} | {s['full_mib']:.1f} | {s['kept_mib']:.1f} | "
                      f"{s['prefill_s']:.3f} | {s['select_ms']:.2f} | {s['tok_s']:.1f} | {s['tok_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
