"""The ``sagekv`` command line."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from .errors import SageKVError
from .generate import DTYPES, load
from .gguf import MODELS
from .policies import DEFAULT_POLICY, NAMED, make_policy
from .rag import METHODS, make_method, prompt_ids, rag_ids
from .sampling import Sampler
from .saved_cache import cache_path, check_save_path
from .store import DocumentStore
from .tasks import DEFAULT_HAYSTACK, HAYSTACKS

MODEL_HELP = f"Checkpoint directory, GGUF file, named model ({', '.join(MODELS)}) or Hugging Face id."
PROMPT_BUDGET = 1024  # KV entries per KV head for a prompt of one's own: 1/8 of an 8K prompt, 1/32 of 32K
MAX_TOKENS = 64
DTYPE_HELP = "Default: the checkpoint's; float32 for a GGUF file (converted once per dtype)."


def sampling_options(seed_flag: str = "--seed", seed_default=None, seed_help: str = "Sampling seed: the same seed gives "
                     "the same text on one backend. Default: a fresh one (printed)."):
    """--temperature, --top-p, --top-k and the seed option, passed to the command as one ``sampler``
    (checked before the model loads)."""
    def decorate(command):
        @functools.wraps(command)
        def with_sampler(*args, temperature, top_p, top_k, sampling_seed, **kwargs):
            return command(*args, sampler=Sampler(temperature, top_p, top_k, sampling_seed), **kwargs)

        options = [
            click.option("--temperature", type=float, default=0.0, show_default=True, help="0 decodes greedily; above 0, tokens are sampled."),
            click.option("--top-p", type=float, default=1.0, show_default=True, help="Sample from the fewest most probable tokens reaching this probability (1: all)."),
            click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k most probable tokens (0: all)."),
            click.option(seed_flag, "sampling_seed", type=int, default=seed_default, show_default=seed_default is not None, help=seed_help),
        ]
        for option in reversed(options):
            with_sampler = option(with_sampler)
        return with_sampler

    return decorate


@click.group()
@click.version_option(package_name="sagekv")
def cli():
    """KV-cache eviction (SAGE-KV and baselines) for long-context inference."""


@cli.command()
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default=None, help="Default: mlx on Apple silicon, else torch.")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--policy", type=click.Choice(list(NAMED)), default=DEFAULT_POLICY, show_default=True,
              help="sagekv is the paper's setting.")
@click.option("--budget", type=int, default=None,
              help=f"KV entries kept per KV head (every policy but full). Default: {PROMPT_BUDGET}; 256 for the built-in example.")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", default=None, help="Read the prompt from this file.")
@click.option("--max-tokens", type=int, default=None, help=f"Default: {MAX_TOKENS}; 16 for the built-in example.")
@click.option("--device", default=None, help="torch device (cpu, cuda, cuda:1) or mlx device (cpu, gpu).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=DTYPE_HELP)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (instruct models; not the built-in example).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--save-cache", "save_path", default=None,
              help="Also save the prompt's full prefilled cache to this file (safetensors), for --load-cache.")
@click.option("--load-cache", "load_path", default=None,
              help="Answer the prompt as a question appended to the prompt saved in this file by --save-cache.")
@sampling_options()
def run(backend, model_path, policy, budget, prompt, prompt_file, max_tokens, device, dtype, chat, as_json, save_path,
        load_path, sampler):
    """Generate from a prompt with a KV-cache policy and report memory and timing.

    Without --prompt or --prompt-file: a built-in task example, full attention against the policy.
    """
    sampler = sampler.seeded()  # a seed drawn here is reported, so the text can be reproduced
    if prompt is not None and prompt_file is not None:
        raise SageKVError("give either --prompt or --prompt-file, not both")
    if save_path is not None and load_path is not None:
        raise SageKVError("give either --save-cache or --load-cache, not both")
    cached = save_path is not None or load_path is not None
    if prompt_file is not None:
        prompt = read_text(prompt_file, "prompt file")
    if prompt is None:
        if chat:
            raise SageKVError("--chat needs --prompt or --prompt-file (the built-in example is a plain task prompt)")
        if cached:
            raise SageKVError("--save-cache and --load-cache need --prompt or --prompt-file (the built-in example is not saved)")
        return run_example(backend, model_path, policy, budget, max_tokens, device, dtype, as_json, sampler)
    if chat and cached:
        raise SageKVError("--chat cannot be used with --save-cache or --load-cache (the chat template wraps one whole prompt)")
    if not prompt.strip():
        raise SageKVError("the prompt is empty")
    save_path = None if save_path is None else check_save_path(save_path)  # before a long prefill, not after
    max_tokens = MAX_TOKENS if max_tokens is None else max_tokens
    chosen, budget, model = policy_and_model(policy, budget, max_tokens, model_path, backend, device, dtype)
    if cached:
        prefilled, cache = cached_prompt(model, prompt, chosen, max_tokens, save_path, load_path)
        generate = functools.partial(model.decode, prefilled, chosen, max_tokens, keep_prefill=False, sampler=sampler)
    else:
        generate = functools.partial(model.generate, prompt, policy=chosen, max_tokens=max_tokens, chat=chat, sampler=sampler)
    if as_json:
        record = json_record(generate(), model, policy, budget, sampler)
        if cached:
            record["cache"] = cache
        click.echo(json.dumps(record))
        return
    stream = TextStream(model)
    result = generate(on_token=stream)
    stream.finish(result.text)
    s = result.stats
    prompt_label = f"prompt {result.prompt_tokens} tokens"
    if cached:
        prompt_label += f", saved to {save_path}" if save_path else f" ({cache['tokens']} from {cache['loaded']})"
    click.echo(
        f"[{model.backend} | {policy_label(policy, budget)}{sampler_label(sampler)} | "
        f"{prompt_label} | KV {s.full_kv_bytes / 2**20:.2f} MiB -> {s.kept_kv_bytes / 2**20:.2f} MiB | "
        f"prefill {s.prefill_s:.2f}s select {s.select_s:.3f}s decode {s.decode_tokens_per_s:.1f} tok/s]",
        err=True,
    )


def cached_prompt(model, prompt: str, policy, max_tokens: int, save_path, load_path) -> tuple:
    """The prompt prefilled after the prompt saved in ``load_path`` (its tokens appended, as a question
    after a document), or alone and saved to ``save_path`` with the last queries any named policy needs,
    so a later question may use any of them; and what the JSON record says of the cache file."""
    if load_path is not None:
        saved = model.load_cache(load_path)
        if saved.selected_by is not None:
            raise SageKVError(f"cache file {load_path} holds a cache selected by {saved.selected_by}; "
                              "--load-cache takes a prompt's full cache, as --save-cache writes it")
        question = model.encode_plain(prompt)
        model.check_length(saved.prompt_tokens + len(question) + max_tokens)
        return model.extend(saved, question, keep_prefill=False), {"loaded": cache_path(load_path), "tokens": saved.prompt_tokens}
    ids = model.encode(prompt)
    model.check_length(len(ids) + max_tokens)
    observed = max(make_policy(name, PROMPT_BUDGET).observed_queries for name in NAMED)
    prefilled = model.prefill(ids, max(policy.observed_queries, observed))
    return prefilled, {"saved": model.save_cache(prefilled, save_path)}


def policy_and_model(policy: str, budget, max_tokens: int, model_path, backend, device, dtype,
                     default_budget: int = PROMPT_BUDGET) -> tuple:
    """The policy, its budget (``default_budget`` where none is given) and the loaded model, once the
    cheap checks have passed (loading takes seconds)."""
    if max_tokens < 0:
        raise SageKVError(f"--max-tokens must be >= 0, got {max_tokens}")
    budget = default_budget if budget is None and policy != "full" else budget
    return make_policy(policy, budget), budget, load(model_path, backend=backend, device=device, dtype=dtype)


def json_record(result, model, policy: str, budget, sampler) -> dict:
    s = result.stats
    return {
        "text": result.text,
        "tokens": result.tokens,
        "prompt_tokens": result.prompt_tokens,
        "policy": policy_record(policy, budget),
        "backend": model.backend,
        "model": model.name,
        "kv": {"full_bytes": s.full_kv_bytes, "kept_bytes": s.kept_kv_bytes},
        "timing": rounded_timing(s.decode_tokens_per_s, prefill_s=s.prefill_s, select_s=s.select_s, decode_s=s.decode_s),
        **sampling_record(sampler),
    }


def sampling_record(sampler) -> dict:
    """A JSON record's sampling settings; none for greedy decoding."""
    return {"sampling": sampler.record()} if sampler.record() else {}


def sampler_label(sampler) -> str:
    """What a report line adds for sampled text."""
    return "" if sampler.greedy else f" | sampled: {sampler.describe()}"


def policy_record(policy: str, budget) -> dict:
    return {"name": policy, **({} if policy == "full" else {"budget": budget})}


def policy_label(policy: str, budget) -> str:
    return policy if policy == "full" else f"{policy} budget {budget}"


def rounded_timing(decode_tokens_per_s: float, **seconds) -> dict:
    """Milliseconds and tenths of a token per second: finer digits are noise."""
    return {**{name: round(value, 3) for name, value in seconds.items()}, "decode_tokens_per_s": round(decode_tokens_per_s, 1)}


class TextStream:
    """An ``on_token`` that prints the text as it grows, holding back a character cut mid-sequence."""

    def __init__(self, model):
        self.model, self.shown = model, ""

    def __call__(self, tokens) -> None:
        text = self.model.decode_text(tokens)
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            click.echo(text[len(self.shown):], nl=False)
            self.shown = text

    def finish(self, text: str) -> None:
        """The rest of the final text and a newline (all of it again if decoding changed what was shown)."""
        click.echo(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)


def read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as error:
        raise SageKVError(f"cannot read {what} {path}: {error.strerror if isinstance(error, OSError) else error}") from None


def run_example(backend, model_path, policy, budget, max_tokens, device, dtype, as_json, sampler):
    """No prompt: a built-in task sample, answered with full attention and with the policy."""
    from . import demo

    max_tokens = demo.MAX_TOKENS if max_tokens is None else max_tokens
    chosen, budget, model = policy_and_model(policy, budget, max_tokens, model_path, backend, device, dtype, demo.BUDGET)
    example = demo.run_example(model, chosen, max_tokens, sampler)
    if as_json:
        record = json_record(example.evicted, model, policy, budget, sampler)
        record.update(expected=example.sample.answer, full_text=example.full.text, task=example.sample.task)
        click.echo(json.dumps(record))
        return
    label = policy if policy == "full" else f"{policy} B={budget}"
    click.echo(demo.report(example, label, model.runner.num_layers) + ("" if sampler.greedy else f"\nsampled: {sampler.describe()}"))


@cli.command()
@click.option("--doc", "doc_files", multiple=True, help="A document file; repeat for each document, in prompt order.")
@click.option("--question", default=None, help="The question, placed after the documents.")
@click.option("--method", type=click.Choice(list(METHODS)), default="samkv", show_default=True)
@click.option("--store", "store_dir", default=None,
              help="Directory of stored document caches (created if missing, reused). Default: prefill in memory.")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default=None, help="Default: mlx on Apple silicon, else torch.")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--policy", type=click.Choice(list(NAMED)), default="full", show_default=True,
              help="Eviction policy applied to the method's cache before decoding.")
@click.option("--budget", type=int, default=None, help=f"KV entries kept per KV head (every policy but full). Default: {PROMPT_BUDGET}.")
@click.option("--max-tokens", type=int, default=64, show_default=True)
@click.option("--device", default=None, help="torch device (cpu, cuda, cuda:1) or mlx device (cpu, gpu).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=DTYPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@sampling_options()
def rag(doc_files, question, method, store_dir, backend, model_path, policy, budget, max_tokens, device, dtype, as_json, sampler):
    """Answer a question over documents, each prefilled alone and stored (SamKV and its baselines)."""
    if not doc_files:
        raise SageKVError("give at least one --doc FILE")
    sampler = sampler.seeded()
    documents = [read_text(path, "document file") for path in doc_files]
    empty = next((path for path, text in zip(doc_files, documents) if not text.strip()), None)
    if empty is not None:
        raise SageKVError(f"document file {empty} is empty")
    if question is None:
        raise SageKVError("give --question TEXT")
    if not question.strip():
        raise SageKVError("the question is empty")
    chosen, budget, model = policy_and_model(policy, budget, max_tokens, model_path, backend, device, dtype)
    pieces_ids, question_ids = prompt_ids(model, documents, question, max_tokens)  # before the store is touched
    store = None if store_dir is None else DocumentStore(store_dir, model.store_id)
    stream = None if as_json else TextStream(model)
    result = rag_ids(model, pieces_ids, question_ids, make_method(method), store, max_tokens, chosen, on_token=stream,
                     sampler=sampler)
    r = result.rag
    if as_json:
        click.echo(json.dumps({
            "text": result.text, "tokens": result.tokens, "method": r.method, "kept_tokens": r.kept_tokens,
            "total_tokens": r.total_tokens, "kv_bytes": r.kv_bytes, "policy": policy_record(policy, budget),
            "backend": model.backend, "model": model.name,
            **rounded_timing(result.stats.decode_tokens_per_s, ttft_s=r.ttft_s, store_s=r.store_s, decode_s=result.stats.decode_s),
            **sampling_record(sampler),
        }))
        return
    stream.finish(result.text)
    click.echo(
        f"[{model.backend} | {r.method}{'' if policy == 'full' else f' + {policy_label(policy, budget)}'}{sampler_label(sampler)} | "
        f"kept {r.kept_tokens} of {r.total_tokens} document tokens ({100 * r.kept_tokens / r.total_tokens:.1f}%) | "
        f"KV {r.kv_bytes / 2**20:.2f} MiB | TTFT {r.ttft_s:.3f} s | stored docs {r.store_s:.2f} s | "
        f"decode {result.stats.decode_tokens_per_s:.1f} tok/s]",
        err=True,
    )


DEFAULT_POLICIES = f"full,sagekv,{DEFAULT_POLICY},streaming,snapkv,quest"


@cli.command("eval")
@click.option("--backend", type=click.Choice(["mlx", "torch"]), default=None, help="Default: mlx on Apple silicon, else torch.")
@click.option("--model", "model_path", default=None, help=MODEL_HELP)
@click.option("--tasks", "task_list", default="single_needle,multi_key", show_default=True,
              help="Comma-separated task names, or longbench:FILE.jsonl.")
@click.option("--lengths", default="2048,4096,8192", show_default=True, help="Prompt lengths in tokens (synthetic tasks).")
@click.option("--policies", default=None, help=f"From: {', '.join(NAMED)}. Default: {DEFAULT_POLICIES}; none with --methods.")
@click.option("--methods", default=None, help=f"RAG methods over stored documents, from: {', '.join(METHODS)} "
              "(a task without documents has its context cut into documents).")
@click.option("--budgets", default="64,128,256,512,1024,2048", show_default=True, help="KV entries per KV head.")
@click.option("--haystack", type=click.Choice(HAYSTACKS), default=DEFAULT_HAYSTACK, show_default=True,
              help="The synthetic tasks' filler: invented syllable words (the reference model's) or sentences of "
              "Python's documentation (pydoc_data).")
@click.option("--samples", type=int, default=20, show_default=True, help="Samples per task and length.")
@click.option("--seed", type=int, default=0, show_default=True, help="First evaluation seed.")
@click.option("--out", required=True, help="Results directory (re-running skips cells already done).")
@click.option("--device", default=None, help="A device, or with --workers a comma-separated list used in turn.")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=DTYPE_HELP)
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes side by side, each with its own copy of the model (a small model's decode is bound by Python).")
@click.option("--batch", type=int, default=1, show_default=True,
              help="Samples whose answers under a policy are decoded together, one model call per step for all (the same "
              "answers; their full prefilled caches are held at once; decode rates become shares of the batch's time).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@sampling_options("--sampling-seed", 0, "Sampling seed (--seed is the evaluation seed), restarted for every answer.")
def eval_command(backend, model_path, task_list, lengths, policies, methods, budgets, haystack, samples, seed, out, device, dtype,
                 workers, batch, quiet, sampler):
    """Accuracy against KV budget for several policies, tasks and lengths; and RAG methods over stored documents."""
    from .evaluate import (POLICY_PLOT, RAG_PLOT, cells, check_tasks, evaluate, evaluate_in_workers, parse_list, rag_cells,
                           read_predictions, split_cells)
    from .tasks import EVAL_SEEDS

    if samples < 1:
        raise SageKVError(f"--samples must be >= 1, got {samples}")
    if workers < 1:
        raise SageKVError(f"--workers must be >= 1, got {workers}")
    if batch < 1:
        raise SageKVError(f"--batch must be >= 1, got {batch}")
    devices = parse_list(device, str, "device") if device else [None]
    if len(devices) > 1 and workers == 1:
        raise SageKVError("several devices need --workers")
    if seed not in EVAL_SEEDS or seed + samples - 1 not in EVAL_SEEDS:
        raise SageKVError(f"evaluation seeds must lie in {EVAL_SEEDS.start}..{EVAL_SEEDS.stop - 1}")
    task_specs = parse_list(task_list, str, "tasks")
    length_list = parse_list(lengths, int, "lengths")
    if policies is None:
        policies = "" if methods else DEFAULT_POLICIES
    policy_names = parse_list(policies, str, "policies") if policies.strip() else []  # --policies "": RAG methods only
    method_names = parse_list(methods, str, "methods") if methods is not None else []
    if not policy_names and not method_names:
        raise SageKVError("nothing to evaluate: --policies is empty and no --methods given")
    budget_list = parse_list(budgets, int, "budgets")
    check_tasks(task_specs, length_list)
    cells(policy_names, budget_list)  # every policy valid at every budget, before loading
    rag_cells(method_names)
    model = load(model_path, backend=backend, device=devices[0], dtype=dtype)
    grid = (task_specs, length_list, policy_names, budget_list, samples, seed)
    predictions = os.path.join(out, "predictions.jsonl")
    before = len(read_predictions(predictions))
    if workers > 1:
        metrics = evaluate_in_workers(model, dict(model=model_path, backend=backend, dtype=dtype), devices, workers, *grid,
                                      out=out, progress=not quiet, methods=method_names, haystack=haystack, sampler=sampler,
                                      batch=batch)
    else:
        metrics = evaluate(model, *grid, out, progress=not quiet, methods=method_names, haystack=haystack, sampler=sampler,
                           batch=batch)
    plots = [name for name, cells_of_kind in zip((POLICY_PLOT, RAG_PLOT), split_cells(metrics)) if cells_of_kind]
    new = len(read_predictions(predictions)) - before
    click.echo(f"{new} new records; {len(metrics)} cells in {out}/ (metrics.json, predictions.jsonl, summary.md, {', '.join(plots)})")


def main(argv=None) -> int:
    """Entry point: bad input ends with one ``error:`` line and a non-zero exit, no traceback."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no loader bars in our output
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # nor download retry warnings: the error line says it
    try:
        cli.main(args=argv, prog_name="sagekv", standalone_mode=False)
    except SageKVError as error:
        click.echo(f"error: {error}", err=True)
        return 1
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        return error.exit_code
    except (KeyboardInterrupt, click.Abort):  # click turns Ctrl-C into Abort
        click.echo("error: interrupted", err=True)
        return 130  # 128 + SIGINT, as shells report it
    except OSError as error:  # the file system refused (a path that is a file, no permission, disk full)
        click.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
