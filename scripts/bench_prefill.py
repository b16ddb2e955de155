"""Prefill speed and peak memory: sagekv's layer-wise prefill against the library's own prefills.

On a random model of a named shape (:data:`sagekv.checkpoints.SHAPES`), or a checkpoint (``--model``; with no
value the bundled reference model), and random prompts of each ``--lengths``, each configuration prefills the
prompt and gives the first token's logits:

- torch: ``hf-one-shot`` (transformers' forward over the whole prompt, SDPA, a DynamicCache),
  ``hf-chunked`` (the same in chunks of ``--hf-chunk``, as generate's ``prefill_chunk_size``),
  ``sagekv-full`` (sagekv's full-cache prefill, then selection) and ``sagekv-layerwise`` (layer by
  layer, each layer compacted as soon as it is computed);
- MLX: ``mlx-lm`` (mlx-lm's generate_step, its prefill_step_size loop) and the two sagekv ones.

Tokens/s is the prompt length over the median time of ``--repeats`` runs after a warm-up. Peak
memory: on CUDA the peak allocated during a run (``torch.cuda.max_memory_allocated``) and its excess
over what was allocated before; elsewhere each configuration runs alone in a subprocess and its peak
resident set (``ru_maxrss``) is read, with the resident set after loading the model for reference.

    python scripts/bench_prefill.py --shape llama3-8b --device cuda --dtype bfloat16 --lengths 32768,131072
    python scripts/bench_prefill.py --backend mlx --model --lengths 8192
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from sagekv.policies import DEFAULT_POLICY, make_policy
from sagekv.checkpoints import SHAPES, add_model_option, bench_model, device_name

TORCH_CONFIGS = ["hf-one-shot", "hf-chunked", "sagekv-full", "sagekv-layerwise"]
MLX_CONFIGS = ["mlx-lm", "sagekv-full", "sagekv-layerwise"]


def prefill_fn(model, name: str, ids: list, args):
    """A function running configuration ``name`` once over ``ids``, its result computed on the device."""
    run = model.runner
    policy = make_policy(args.policy, args.budget)
    if name == "sagekv-full":
        def full():
            prefilled = model.prefill(ids, policy.observed_queries)
            run.compress(prefilled.cache, policy)
        return full
    if name == "sagekv-layerwise":
        return lambda: model.prefill_layerwise(ids, policy, args.layer_rows)
    if name == "mlx-lm":
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        def mlx_lm():
            step = generate_step(mx.array(ids), run.model, max_tokens=1, prompt_cache=make_prompt_cache(run.model))
            mx.eval(next(step)[1])
        return mlx_lm
    import torch
    from transformers import DynamicCache

    chunk = len(ids) if name == "hf-one-shot" else args.hf_chunk
    tokens = torch.tensor([ids], device=run.device)

    @torch.inference_mode()
    def transformers_prefill():
        cache = DynamicCache(config=run.model.config)
        for first in range(0, len(ids), chunk):
            logits = run.model(input_ids=tokens[:, first : first + chunk], use_cache=True, logits_to_keep=1,
                               **{run.cache_argument: cache}).logits
        return logits
    return transformers_prefill


def measure(model, name: str, length: int, args) -> dict:
    """Median seconds of ``--repeats`` runs after a warm-up, and the peak memory of the runs."""
    run = model.runner
    ids = np.random.default_rng(length).integers(0, 256, length).tolist()
    fn = prefill_fn(model, name, ids, args)
    cuda = run.name == "torch" and run.device.type == "cuda"
    if cuda:
        import torch
    fn()
    run.sync()
    times, peak, before = [], 0, 0
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        fn()
        run.sync()
        times.append(time.perf_counter() - start)
        if cuda:
            peak = max(peak, torch.cuda.max_memory_allocated())
    seconds = statistics.median(times)
    row = {"config": name, "tokens": length, "seconds": seconds, "tokens_per_s": length / seconds, "dtype": model.dtype}
    if cuda:
        row.update(peak_bytes=peak, above_start_bytes=peak - before)
    else:
        row.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
                   loaded_bytes=args.loaded_bytes)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    parser.add_argument("--device", default="cpu")
    add_model_option(parser)
    parser.add_argument("--dtype", default=None, help="default: float32 for a --shape, a --model's own")
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--configs", default=None, help="comma-separated (default: every one of the backend)")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--hf-chunk", type=int, default=4096)
    parser.add_argument("--layer-rows", type=int, default=None, help="rows per layer call (default: from free memory)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one configuration, one length
    args = parser.parse_args()
    configs = args.configs.split(",") if args.configs else TORCH_CONFIGS if args.backend == "torch" else MLX_CONFIGS
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.worker:
        model = load(args)
        args.loaded_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        print(json.dumps(measure(model, configs[0], lengths[0], args)))
        return
    alone = args.backend == "mlx" or not args.device.startswith("cuda")  # peak RSS needs a process per run
    model = None if alone else load(args)
    rows = []
    for length in lengths:
        for name in configs:
            rows.append(in_subprocess(name, length) if alone else measure(model, name, length, args))
    report(args, rows, model)


def load(args):
    model = bench_model(args.model, args.shape, args.device, args.dtype, args.backend)
    model.runner.eos_ids = set()
    return model


def in_subprocess(name: str, length: int) -> dict:
    done = subprocess.run([sys.executable, sys.argv[0], *sys.argv[1:], "--worker", "--configs", name, "--lengths",
                           str(length)], capture_output=True, text=True)  # the later options win
    if done.returncode:
        raise SystemExit(f"{name} at {length} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(args, rows: list, model):
    import importlib.metadata as metadata

    versions = ", ".join(f"{p} {metadata.version(p)}" for p in (("torch", "transformers") if args.backend == "torch"
                                                               else ("mlx", "mlx-lm")))
    if args.model is None:
        subject = f"{args.shape} ({SHAPES[args.shape].get('num_hidden_layers')} layers)"
    else:
        subject = args.model or "sagekv reference model"
    print(f"{subject}, {rows[0]['dtype']} on {device_name(args.device)}; {versions}; "
          f"policy {args.policy} budget {args.budget}; median of {args.repeats}")
    cuda = "above_start_bytes" in rows[0]
    print("| tokens | config | tokens/s | x first | peak GiB | " + ("above start GiB |" if cuda else "after load GiB |"))
    print("|---|---|---|---|---|---|")
    for row in rows:
        first = next(r for r in rows if r["tokens"] == row["tokens"])
        extra = row["above_start_bytes"] if cuda else row["loaded_bytes"]
        print(f"| {row['tokens']} | {row['config']} | {row['tokens_per_s']:.0f} | "
              f"{row['tokens_per_s'] / first['tokens_per_s']:.2f} | {row['peak_bytes'] / 2**30:.3f} | {extra / 2**30:.3f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "device": device_name(args.device),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
