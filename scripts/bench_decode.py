"""Decode speed of eviction policies against their memory-bandwidth floor and the framework's own decode.

Builds a random model of a named shape (torch: directly on the device, no checkpoint written) or loads a
checkpoint (``--model``; with no value the bundled reference model), prefills
one random prompt per length, then for each policy and budget selects and decodes (medians of
``--repeats`` after a warm-up) and prints one markdown table: KV kept, selection ms, decode tok/s (from the
STEADY_FROM-th token read to the last: the first steps warm up and capture), the floor = copy bandwidth /
(weight bytes read per step + kept KV bytes) with the bandwidth measured in this run, x floor = floor / measured (1.0 is perfect), and the framework's own greedy decode
(transformers with a DynamicCache under SDPA, or mlx-lm's generate_step) at the prompt length N and at
the kept length: what one would otherwise run. On torch with CUDA each evicting policy but Quest decodes
twice, with its step eager and captured as a CUDA graph (column "step"). ``--batch B`` decodes B copies of
each prompt together (SageModel.decode_batch; full attention too, so B full caches must fit): decode tok/s
and the floor count the batch's tokens (B per step, the floor's KV bytes B times), while the framework's
columns stay one sequence's.

    python scripts/bench_decode.py --shape llama3-8b --device cuda --dtype bfloat16 --lengths 32768,131072
    python scripts/bench_decode.py --backend mlx --model --lengths 8192 --budgets 256,1024
    python scripts/bench_decode.py --shape llama3-8b --device cuda --dtype bfloat16 --lengths 32768 --budgets 2048 --batch 8
"""

import argparse
import gc
import json
import os
import statistics
import time

import numpy as np

import sagekv
from sagekv.checkpoints import SHAPES, add_model_option, bench_model, device_name

WARMUP_STEPS = 2
STEADY_FROM = 3  # tokens read before decode is steady: the first steps run eagerly, then one is captured
GROWING = ("full", "quest")  # policies whose decode cache grows: their step stays eager
PREFILL_CHUNK = 2048  # bounds prefill memory at long prompts, for both sagekv and the reference


class TorchBench:
    def __init__(self, runner):
        import torch
        import transformers

        self.torch, self.runner, self.model = torch, runner, runner.model
        self.cuda = runner.device.type == "cuda"
        self.device = device_name(runner.device)
        self.versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
        embed, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # a step reads one row of an untied embedding table; everything else is read whole (logits of one token)
        self.weight_bytes = total - (0 if embed is head else embed.numel() * embed.element_size())

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.runner.device)

    def copy_bandwidth(self, nbytes: int) -> float:
        src = self.torch.empty(nbytes // 4, dtype=self.torch.float32, device=self.runner.device).uniform_()
        dst = self.torch.empty_like(src)
        return best_bandwidth(lambda: dst.copy_(src), self.sync, 2 * nbytes)

    def reference(self, ids, steps: int, repeats: int) -> float:
        """transformers' own greedy decode after a prompt of ``ids``: tokens/s, median of ``repeats``."""
        attention = self.model.config._attn_implementation
        self.model.set_attn_implementation("sdpa")  # plain transformers, not sagekv's routed attention
        try:
            with self.torch.inference_mode():
                return self.decode_speed(ids, steps, repeats)
        finally:
            self.model.set_attn_implementation(attention)
            self.free()  # the DynamicCache went with decode_speed's frame

    def decode_speed(self, ids, steps: int, repeats: int) -> float:
        from transformers import DynamicCache

        model, cache = self.model, {self.runner.cache_argument: DynamicCache(config=self.model.config)}
        ids = self.torch.tensor([ids], device=self.runner.device)
        for i in range(0, ids.shape[1], PREFILL_CHUNK):
            logits = model(input_ids=ids[:, i:i + PREFILL_CHUNK], logits_to_keep=1, use_cache=True, **cache).logits
        token = logits[:, -1].argmax(-1, keepdim=True)

        length = ids.shape[1]

        def decode(n):
            nonlocal token, length
            for _ in range(n):
                # an all-ones mask, as generate passes: without one SDPA picked cuDNN's kernel on an H200 (torch
                # 2.11), which plans anew for every key length (9.8 tok/s against 35.4 at 4096 tokens)
                length += 1
                mask = self.torch.ones(1, length, dtype=self.torch.long, device=self.runner.device)
                token = model(input_ids=token, attention_mask=mask, use_cache=True, **cache).logits[:, -1].argmax(-1, keepdim=True)
            self.sync()  # only here: the argmax stays on the device between steps

        decode(WARMUP_STEPS)
        return statistics.median(steps / timed(decode, steps) for _ in range(repeats))

    def free(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def peak_bytes(self):
        """Peak device memory since the last call (CUDA), else None."""
        if not self.cuda:
            return None
        peak = self.torch.cuda.max_memory_allocated(self.runner.device)
        self.torch.cuda.reset_peak_memory_stats(self.runner.device)
        return peak


class MlxBench:
    def __init__(self, runner):
        import mlx.core as mx
        import mlx_lm
        from mlx.utils import tree_flatten

        self.mx, self.runner, self.model = mx, runner, runner.model
        gpu = mx.default_device() == mx.gpu
        self.device = device_name("gpu" if gpu else "cpu")
        self.versions = f"mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"
        total = sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))
        tied = getattr(self.model.args, "tie_word_embeddings", True)
        self.weight_bytes = total - (0 if tied else self.model.model.embed_tokens.weight.nbytes)

    def sync(self):
        self.mx.synchronize()

    def copy_bandwidth(self, nbytes: int) -> float:
        mx = self.mx
        src = mx.random.uniform(shape=(nbytes // 4,))
        mx.eval(src)
        return best_bandwidth(lambda: mx.eval(src + 1), self.sync, 2 * nbytes)

    def reference(self, ids, steps: int, repeats: int) -> float:
        """mlx-lm's own greedy generate_step after a prompt of ``ids``: tokens/s, median of ``repeats``."""
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        loop = generate_step(self.mx.array(ids), self.model, max_tokens=WARMUP_STEPS + steps * repeats,
                             prompt_cache=make_prompt_cache(self.model), prefill_step_size=PREFILL_CHUNK)
        for _ in range(WARMUP_STEPS):
            next(loop)

        def decode(n):
            for _ in range(n):
                next(loop)

        return statistics.median(steps / timed(decode, steps) for _ in range(repeats))

    def free(self):
        gc.collect()
        self.mx.clear_cache()

    def peak_bytes(self):
        return None


def steady_decode(model, prefilled, policy, tokens: int, batch: int = 1):
    """Decode ``tokens`` tokens for each of ``batch`` copies of the prompt: (the first one's stats, tokens/s over
    the batch between the STEADY_FROM-th step's tokens read and the last's)."""
    read = []
    on_token = lambda index, _: read.append(time.perf_counter()) if index == 0 else None  # noqa: E731  once per step
    results = model.decode_batch([prefilled] * batch, policy, tokens, on_token=on_token)
    return results[0].stats, batch * (len(read) - 1 - STEADY_FROM) / (read[-1] - read[STEADY_FROM])


def timed(f, *args) -> float:
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


def best_bandwidth(copy, sync, moved: int, repeats: int = 10) -> float:
    """Bytes read + written per second by ``copy``, the best of ``repeats`` after a warm-up."""
    copy()
    sync()
    return max(moved / timed(lambda: (copy(), sync())) for _ in range(repeats))


def load(args):
    if args.model is None and args.backend == "mlx" and args.shape == "llama3-8b":  # mlx-lm loads weights from files only
        raise SystemExit("--backend mlx builds the small shapes only (a 16 GB checkpoint would be written)")
    return bench_model(args.model, args.shape, args.device, args.dtype, args.backend)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    parser.add_argument("--shape", choices=SHAPES, default="small")
    parser.add_argument("--device", default=None)
    add_model_option(parser)
    parser.add_argument("--dtype", default=None, help="default: float32 for a --shape, a --model's own")
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--budgets", default="512,2048")
    parser.add_argument("--policies", default="sagekv_kv_follow,sagekv,streaming", help="besides full attention")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="copies of each prompt decoded together")
    parser.add_argument("--copy-mib", type=int, default=None, help="copy bandwidth buffer (default 2048 on CUDA, 256)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--json", default=None, help="rows as JSON (default: --out with .json)")
    args = parser.parse_args()
    if args.decode_tokens < STEADY_FROM + 2:
        parser.error(f"--decode-tokens must be at least {STEADY_FROM + 2}")
    if args.batch < 1:
        parser.error("--batch must be at least 1")

    model = load(args)
    model.runner.eos_ids = set()  # a fixed decode length
    bench = (TorchBench if args.backend == "torch" else MlxBench)(model.runner)
    graphs = getattr(model.runner, "graphs", None)  # torch on CUDA: how decode steps are captured
    copy_mib = args.copy_mib or (2048 if getattr(bench, "cuda", False) else 256)
    bandwidth = bench.copy_bandwidth(copy_mib << 20)
    config = model.runner.config
    reference = "transformers" if args.backend == "torch" else "mlx-lm"
    lines = [
        f"{model.name if args.model is not None else args.shape} ({config['num_hidden_layers']} layers, {config['num_attention_heads']} query / "
        f"{config['num_key_value_heads']} KV heads, {bench.weight_bytes / 2**30:.3g} GiB of weights read per step), "
        f"{model.dtype} on {bench.device}; {bench.versions}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (bytes read + "
        f"written by a {copy_mib} MiB copy); {args.decode_tokens} decoded tokens, median of {args.repeats}"
        + (f"; batches of {args.batch} sequences (decode tok/s and floor over the batch)" if args.batch > 1 else ""),
        f"| N | policy | budget | step | kept positions | KV kept MiB | select ms | decode tok/s | floor tok/s | x floor | "
        f"{reference} tok/s at N | at kept | x {reference} at N | x at kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    rows = []
    rng = np.random.default_rng(0)
    for n in map(int, args.lengths.split(",")):
        ids = [256] + rng.integers(0, 256, n - 1).tolist()
        at_length = {n: bench.reference(ids, args.decode_tokens, args.repeats)}  # tok/s by prompt length
        policies = [("full", None, sagekv.Full())] + [
            (name, b, sagekv.make_policy(name, b)) for b in map(int, args.budgets.split(",")) for name in args.policies.split(",")]
        prefilled = model.prefill(ids, max(p.observed_queries for _, _, p in policies), PREFILL_CHUNK)
        measured, _ = [], bench.peak_bytes()  # each policy's peak from here: prefilled cache included
        for name, budget, policy in policies:
            for step in ["eager", "graph"] if graphs is not None and name not in GROWING else ["eager"]:
                if graphs is not None:
                    model.runner.graphs = graphs if step == "graph" else None
                runs = [steady_decode(model, prefilled, policy, args.decode_tokens, args.batch) for _ in range(args.repeats + 1)][1:]
                measured.append((name, budget, step, runs, bench.peak_bytes()))
        if graphs is not None:
            model.runner.graphs = graphs
        per_position = prefilled.full_kv_bytes / n
        del prefilled
        bench.free()
        for name, budget, step, runs, peak in measured:
            stats = [s for s, _ in runs]
            kept_bytes = stats[0].kept_kv_bytes
            kept = round(kept_bytes / per_position)  # positions of a full cache holding as many bytes
            if kept not in at_length:
                at_length[kept] = bench.reference(ids[:kept], args.decode_tokens, args.repeats)
            tok_s = statistics.median(steady for _, steady in runs)
            floor = args.batch * bandwidth / (bench.weight_bytes + args.batch * kept_bytes)  # a step reads B caches
            row = {"n": n, "policy": name, "budget": budget, "step": step, "batch": args.batch, "kept_positions": kept,
                   "kept_kv_bytes": kept_bytes, "full_kv_bytes": stats[0].full_kv_bytes,
                   "select_ms": statistics.median(s.select_s for s in stats) * 1e3, "decode_tok_s": tok_s,
                   "decode_tok_s_whole": args.batch * statistics.median(s.decode_tokens_per_s for s in stats),  # first steps included
                   "floor_tok_s": floor, "x_floor": floor / tok_s,
                   "reference_tok_s_at_n": at_length[n], "reference_tok_s_at_kept": at_length[kept], "peak_bytes": peak}
            rows.append(row)
            line = (f"| {n} | {name} | {budget or '-'} | {step} | {kept} | {kept_bytes / 2**20:.1f} | {row['select_ms']:.2f} | "
                    f"{tok_s:.1f} | {floor:.1f} | {floor / tok_s:.2f} | {at_length[n]:.1f} | {at_length[kept]:.1f} | "
                    f"{tok_s / at_length[n]:.2f} | {tok_s / at_length[kept]:.2f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    json_path = args.json or (os.path.splitext(args.out)[0] + ".json" if args.out else None)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "device": bench.device, "dtype": model.dtype, "versions": bench.versions,
                       "copy_bandwidth_bytes_per_s": bandwidth, "bandwidth_counts": "bytes read + written",
                       "weight_bytes_per_step": bench.weight_bytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
