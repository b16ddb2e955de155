"""Train the small byte-level Llama reference model on the sagekv.tasks suite.

    python scripts/train_reference_model.py --out runs/ref --minutes 20
    python scripts/train_reference_model.py --out runs/ref --resume              # continue an interrupted run
    python scripts/train_reference_model.py --out runs/ref --resume --minutes 30  # extend a finished one
    python scripts/train_reference_model.py --out runs/more --init-from sagekv/reference_model --warmup-tasks '' \
        --stages 8192 --minutes 10                                                   # train a saved model further

Trains first on the --warmup-tasks alone (the magic-number tasks: retrieving digits needs a circuit that a
mixture of all tasks may never form), then on a mixture of all tasks, with an adaptive length curriculum (512
-> ... -> 8192 tokens). Each stage ends when the moving average of its answer loss falls under --threshold, or
when it has used --stage-share of the budget (--first-stage-share for the first, where retrieval has to form);
about a third of the batches repeat shorter lengths so that short contexts are not forgotten. A --focus share
of each batch's samples goes to tasks in proportion to their answer loss over the last log interval (the rest
is spread evenly), so the tasks not yet learned get more of the time. The loss is the mean cross-entropy over
answer tokens (the answer and </s>) plus --context-weight x the mean over prompt tokens. The learning rate
warms up over --warmup-steps, then follows a cosine over the training time, so it reaches --min-lr when the
budget is spent.

--out DIR gets checkpoint.pt (every --save-every seconds and at the end), train_log.jsonl, model/ (bf16
weights + byte tokenizer, loadable by transformers and mlx-lm) and final_eval.json (greedy decoding with
full attention on EVAL seeds). --resume takes the model shape, curriculum and optimiser settings from the
checkpoint; the budget is the checkpoint's unless --minutes is given, and counts training time across runs.
Ctrl-C or SIGTERM saves checkpoint.pt and exits, so the run can be done in slices where commands are time
limited: repeat `timeout 540 python scripts/train_reference_model.py --out runs/ref --resume` (after a first
slice without --resume) until final_eval.json appears.
"""

import argparse
import json
import math
import os
import random
import re
import signal
import threading
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from sagekv.analysis import SOLVED_SCORE
from sagekv.checkpoints import byte_tokenizer
from sagekv.tasks import EVAL_SEEDS, MIN_LENGTH, TASKS, TRAIN_SEEDS, generate, score

BOS, EOS, VOCAB = 256, 257, 258
PAD, CONTEXT, ANSWER = 0, 1, 2  # what each target position counts for in the loss
TASK_NAMES = list(TASKS)  # a batch's task ids index this
MAX_BATCH = 4096  # batch index b draws its samples' seeds from TRAIN_SEEDS[b * MAX_BATCH:][:batch size]
MONITOR_SEED = EVAL_SEEDS.stop - 1000  # held-out samples for the log, away from the final eval's seeds
MONITOR_PER_TASK = 2
SYNC_EVERY = 10  # steps between reading losses back from the GPU (each read waits for the GPU)
RUNS_HEADING = "### Training runs, in order"  # the model card's run list, which --init-from extends
RUN_ITEM = re.compile(r"^\d+\. ")
# Settings that define the run; --resume takes them from the checkpoint so the run stays one run.
FIXED_BY_CHECKPOINT = ("hidden", "layers", "heads", "kv_heads", "intermediate", "rope_theta", "stages",
                       "tokens_per_step", "tasks", "warmup_tasks", "init_from", "earlier_training",
                       "current_share", "threshold", "average_steps", "stage_share", "first_stage_share", "focus",
                       "lr", "min_lr", "warmup_steps", "weight_decay", "context_weight")


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--minutes", type=float, default=None, help="training time budget (default 20)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--workers", type=int, default=8 if cuda else 0, help="data loader processes")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed")
    p.add_argument("--init-from", default=None,
                   help="start from this saved model's weights and shape (its card's training record is kept)")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=960)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--stages", default="512,1024,2048,4096,8192", help="curriculum lengths in tokens")
    p.add_argument("--tokens-per-step", type=int, default=32768, help="batch size = this // length")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--warmup-tasks", default="single_needle,multi_key",
                   help="those of --tasks trained alone in an extra first stage at the first length ('' for none)")
    p.add_argument("--current-share", type=float, default=0.65, help="share of batches at the stage's length")
    p.add_argument("--threshold", type=float, default=0.3, help="answer-loss average that ends a stage")
    p.add_argument("--average-steps", type=int, default=50, help="window of that moving average")
    p.add_argument("--stage-share", type=float, default=0.1, help="most of the budget one later stage may use")
    p.add_argument("--first-stage-share", type=float, default=0.3, help="most of the budget the first stage may use")
    p.add_argument("--focus", type=float, default=0.5,
                   help="share of samples drawn by task answer loss rather than evenly (0: evenly)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--context-weight", type=float, default=0.1, help="weight of the prompt tokens' loss")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between log records")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--eval-samples", type=int, default=20, help="EVAL seeds per task and length at the end")
    p.add_argument("--eval-lengths", default="2048,4096,8192")
    p.set_defaults(earlier_training=[])  # the --init-from model's training runs, for the card
    return p.parse_args(argv)


def encode_batch(samples):
    """Token ids right-padded to a multiple of 64, and each position's PAD/CONTEXT/ANSWER kind."""
    rows = [([BOS, *s.prompt.encode()], [*s.answer.encode(), EOS]) for s in samples]
    width = -(-max(len(p) + len(a) for p, a in rows) // 64) * 64  # nearly always length + 64: one shape per stage
    ids = torch.full((len(rows), width), EOS, dtype=torch.long)
    kinds = torch.full((len(rows), width), PAD, dtype=torch.uint8)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        kinds[row, 1:len(prompt)] = CONTEXT  # position 0 (<s>) is never a target
        kinds[row, len(prompt):len(prompt) + len(answer)] = ANSWER
    return ids, kinds


class TrainBatches(IterableDataset):
    """Batches first_batch, first_batch + 1, ... for one curriculum stage; batch b depends only on b, the stage
    and the task weights.

    The DataLoader takes batches from its workers in turn, so worker w of n makes batches w, w + n, ...
    and the training loop receives them in order; a resumed run starts at the first batch not trained on.
    """

    def __init__(self, plan, stage, tokens_per_step, current_share, first_batch, task_weights):
        self.length, self.tasks = plan[stage]
        self.task_weights = task_weights
        self.shorter = sorted({length for length, _ in plan[:stage] if length < self.length})
        self.tokens_per_step, self.current_share, self.first_batch = tokens_per_step, current_share, first_batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.first_batch + worker
        while True:
            yield self.batch(index)
            index += workers

    def batch(self, index):
        rng = random.Random(f"train-batch:{index}")
        at_stage = not self.shorter or rng.random() < self.current_share
        length = self.length if at_stage else rng.choice(self.shorter)
        size = min(MAX_BATCH, max(1, self.tokens_per_step // length))
        first_seed = TRAIN_SEEDS.start + index * MAX_BATCH
        names = rng.choices(self.tasks, self.task_weights, k=size)
        samples = [generate(name, length, first_seed + i) for i, name in enumerate(names)]
        return (length, *encode_batch(samples), torch.tensor([TASK_NAMES.index(name) for name in names]))


def ignore_stop_signals(_worker):
    """Workers leave Ctrl-C and SIGTERM (which reach the whole process group) to the main process."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def batches(args, state, device):
    dataset = TrainBatches(stage_plan(args), state["stage"], args.tokens_per_step, args.current_share,
                           state["batches"], state["task_weights"])
    return iter(DataLoader(dataset, batch_size=None, num_workers=args.workers, pin_memory=device.type == "cuda",
                           prefetch_factor=4 if args.workers else None, worker_init_fn=ignore_stop_signals))


def stage_lengths(args):
    return [int(length) for length in args.stages.split(",")]


def stage_plan(args):
    """(length, tasks) of each curriculum stage: the warm-up tasks alone first, then every task at each length."""
    lengths, tasks = stage_lengths(args), args.tasks.split(",")
    warmup_tasks = [task for task in args.warmup_tasks.split(",") if task in tasks]
    warmup = [(lengths[0], warmup_tasks)] if warmup_tasks else []
    return warmup + [(length, tasks) for length in lengths]


def task_weights(tasks, answer_losses, focus):
    """Sampling weights of the stage's tasks: even, plus a `focus` share in proportion to each task's answer loss
    (even until every task has one)."""
    even = [1 / len(tasks)] * len(tasks)
    known = [answer_losses.get(task) for task in tasks]
    if None in known or sum(known) <= 0:
        return even
    return [(1 - focus) * e + focus * loss / sum(known) for e, loss in zip(even, known)]


def build_model(args):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=16384, rope_theta=args.rope_theta,
        initializer_range=0.02, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
    )
    config.rope_theta = args.rope_theta  # transformers 5 nests it in rope_parameters; mlx-lm's llama reads only this
    torch.manual_seed(args.seed)
    # float32 master weights, bf16 autocast; saved as bf16 at the end.
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def take_shape(args):
    """Set the model shape from --init-from's config, and keep its card's training record for the new card."""
    path = Path(args.init_from)
    try:
        config = json.loads((path / "config.json").read_text())
        args.hidden, args.layers = config["hidden_size"], config["num_hidden_layers"]
        args.heads, args.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        args.intermediate = config["intermediate_size"]
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"--init-from {path}: cannot read config.json ({error!r})")
    args.rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    card = path / "README.md"
    text = card.read_text() if card.exists() else ""
    runs = text.split(RUNS_HEADING, 1)[1].split("\n#", 1)[0] if RUNS_HEADING in text else ""
    args.earlier_training = [line.split(". ", 1)[1] for line in runs.splitlines() if RUN_ITEM.match(line)] or [
        f"(no record: {path} has no list of training runs in a model card)"]


def make_optimizer(model, args, device):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # no decay on norm gains
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def learning_rate(args, step, elapsed):
    """Linear warmup over steps, then a cosine over training time: resuming continues the same curve."""
    progress = min(1.0, elapsed / (args.minutes * 60))
    floor = args.min_lr / args.lr
    cosine = floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2
    return args.lr * min(1.0, (step + 1) / args.warmup_steps) * cosine


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def losses(logits, ids, kinds, context_weight):
    """(total loss, answer loss, [2, batch] answer-token loss sums and counts per row).

    Answer and context token losses are averaged separately, then weighted.
    """
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    kinds = kinds[:, 1:]
    answer, context = (kinds == ANSWER).float(), (kinds == CONTEXT).float()
    rows = torch.stack([(ce * answer).sum(1), answer.sum(1)])  # masked sums: boolean indexing would wait for the GPU
    answer_loss = rows[0].sum() / rows[1].sum()
    context_loss = (ce * context).sum() / context.sum().clamp(min=1)
    return answer_loss + context_weight * context_loss, answer_loss, rows


def monitor_samples(tasks, length, per_task):
    return [generate(task, length, MONITOR_SEED + i) for task in tasks for i in range(per_task)]


@torch.no_grad()
def teacher_forced_accuracy(model, samples, device):
    """Share of answer tokens predicted right given the true prefix, and share of samples with all of them right."""
    ids, kinds = (t.to(device) for t in encode_batch(samples))
    with autocast(device):
        right = model(input_ids=ids).logits[:, :-1].argmax(-1) == ids[:, 1:]
    answer = kinds[:, 1:] == ANSWER
    token_acc = (right & answer).sum().item() / answer.sum().item()
    return token_acc, (right | ~answer).all(dim=1).float().mean().item()


@torch.no_grad()
def greedy_texts(model, samples, device):
    """Greedy answers, batched with left padding; each ends at </s> or after its answer's length + 2 tokens."""
    prompts = [[BOS, *s.prompt.encode()] for s in samples]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    limits = [len(s.answer.encode()) + 2 for s in samples]
    with autocast(device):
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max(limits),
                             pad_token_id=EOS, eos_token_id=EOS)
    texts = []
    for row, limit in zip(out[:, width:].tolist(), limits):
        row = row[:limit]
        end = next((i for i, token in enumerate(row) if token >= BOS), len(row))  # </s> ends the answer
        texts.append(bytes(row[:end]).decode("utf-8", errors="replace"))
    return texts


def greedy_scores(model, samples, device):
    texts = greedy_texts(model, samples, device)
    count = len(samples)
    return (sum(score(s, t) for s, t in zip(samples, texts)) / count,
            sum(t == s.answer for s, t in zip(samples, texts)) / count)


def save_checkpoint(path, model, optimizer, state, args):
    temporary = path.with_suffix(".tmp")  # write then rename: an interrupted save keeps the previous checkpoint
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "args": vars(args)}, temporary)
    os.replace(temporary, path)


def train(args, model, optimizer, state, out, device, stop):
    plan, budget = stage_plan(args), args.minutes * 60
    forward = torch.compile(model) if args.compile else model
    recent = deque(state["recent"], maxlen=args.average_steps)  # answer losses of batches at the stage's length
    loader = batches(args, state, device)
    log = open(out / "train_log.jsonl", "a")
    clock_start = time.perf_counter() - state["elapsed"]
    last_log = last_save = state["elapsed"]
    interval = []  # (loss, answer loss) since the last log record
    by_task = torch.zeros(2, len(TASKS), device=device)  # answer-token loss sums and counts since the last log record
    pending = []  # (length, loss tensors) not yet read back from the GPU
    steps_at_log = steps_at_flush = state["step"]
    last_flush = state["elapsed"]
    bar = tqdm(total=budget, initial=state["elapsed"], bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s{postfix}")

    def write(record):
        log.write(json.dumps(record) + "\n")
        log.flush()

    while state["elapsed"] < budget and not stop.is_set():
        length, *tensors = next(loader)
        ids, kinds, task_ids = (t.to(device, non_blocking=True) for t in tensors)
        lr = learning_rate(args, state["step"], time.perf_counter() - clock_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device):
            loss, answer_loss, rows = losses(forward(input_ids=ids).logits, ids, kinds, args.context_weight)
        by_task.index_add_(1, task_ids, rows.detach())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["step"] += 1
        state["batches"] += 1
        pending.append((length, torch.stack([loss.detach(), answer_loss.detach()])))
        state["elapsed"] = time.perf_counter() - clock_start
        if len(pending) < SYNC_EVERY and state["elapsed"] < budget and not stop.is_set():
            continue

        values = torch.stack([v for _, v in pending]).tolist()
        interval += values
        stage_length, stage_tasks = plan[state["stage"]]
        recent.extend(a for (batch_length, _), (_, a) in zip(pending, values) if batch_length == stage_length)
        pending = []
        state["recent"] = list(recent)
        average = sum(recent) / len(recent) if recent else float("nan")
        bar.n = min(state["elapsed"], budget)
        bar.set_postfix({"stage": f"{state['stage'] + 1}/{len(plan)}", "len": stage_length,
                         "loss": f"{values[-1][0]:.3f}", "ans_avg": f"{average:.3f}", "step": state["step"],
                         "step/s": f"{(state['step'] - steps_at_flush) / (state['elapsed'] - last_flush):.1f}"})
        steps_at_flush, last_flush = state["step"], state["elapsed"]

        learned = len(recent) == recent.maxlen and average < args.threshold
        share = args.first_stage_share if state["stage"] == 0 else args.stage_share
        out_of_time = state["elapsed"] - state["stage_started"] > share * budget
        if state["stage"] < len(plan) - 1 and (learned or out_of_time):
            samples = monitor_samples(stage_tasks, stage_length, 1)
            greedy_score, greedy_exact = greedy_scores(model, samples, device)
            write({"event": "stage", "step": state["step"], "elapsed": round(state["elapsed"], 1),
                   "from_length": stage_length, "to_length": plan[state["stage"] + 1][0],
                   "from_tasks": stage_tasks, "to_tasks": plan[state["stage"] + 1][1],
                   "reason": "threshold" if learned else "time", "answer_loss_avg": average,
                   "greedy_score": greedy_score, "greedy_exact": greedy_exact})
            state.update(stage=state["stage"] + 1, stage_started=state["elapsed"], recent=[],
                         task_weights=task_weights(plan[state["stage"] + 1][1], state["task_losses"], args.focus))
            recent.clear()
            loader = batches(args, state, device)  # the old loader's prefetched batches are dropped, not trained on

        if state["elapsed"] - last_log >= args.log_every or state["elapsed"] >= budget:
            stage_length, stage_tasks = plan[state["stage"]]
            token_acc, exact = teacher_forced_accuracy(
                model, monitor_samples(stage_tasks, stage_length, MONITOR_PER_TASK), device)
            state["task_losses"] = {task: total / count for task, (total, count)
                                    in zip(TASK_NAMES, by_task.T.tolist()) if count}
            write({"event": "log", "step": state["step"], "elapsed": round(state["elapsed"], 1),
                   "stage": state["stage"], "length": stage_length, "lr": lr,
                   "loss": sum(v[0] for v in interval) / len(interval),
                   "answer_loss": sum(v[1] for v in interval) / len(interval), "answer_loss_avg": average,
                   "steps_per_s": (state["step"] - steps_at_log) / (state["elapsed"] - last_log),
                   "heldout_token_acc": token_acc, "heldout_exact": exact,
                   "answer_loss_by_task": state["task_losses"],
                   "task_weights": dict(zip(stage_tasks, state["task_weights"]))})
            interval, steps_at_log, last_log = [], state["step"], state["elapsed"]
            by_task.zero_()
            weights = task_weights(stage_tasks, state["task_losses"], args.focus)
            if weights != state["task_weights"]:
                state["task_weights"] = weights
                loader = batches(args, state, device)  # prefetched batches are dropped and redrawn with the new weights
        if state["elapsed"] - last_save >= args.save_every:
            save_checkpoint(out / "checkpoint.pt", model, optimizer, state, args)
            last_save = state["elapsed"]
    bar.close()
    log.close()


def final_eval(path, tasks, lengths, count, device):
    """Greedy score and exact match per task and length on the first `count` EVAL seeds, with the saved model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    results = {task: {} for task in tasks}
    for task in tasks:
        for length in lengths:
            samples = [generate(task, length, seed) for seed in EVAL_SEEDS[:count]]
            mean_score, exact = greedy_scores(model, samples, device)
            results[task][str(length)] = {"score": mean_score, "exact": exact}
    return results


def markdown_table(results, lengths):
    lines = ["| task | " + " | ".join(f"{n} score (exact)" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths)]
    for task, row in results.items():
        cells = (f"{row[str(n)]['score']:.2f} ({row[str(n)]['exact']:.2f})" for n in lengths)
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out, device = Path(args.out), torch.device(args.device)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    if checkpoint_path.exists() != args.resume:
        raise SystemExit(f"{checkpoint_path} {'does not exist' if args.resume else 'exists; pass --resume'}")
    checkpoint = torch.load(checkpoint_path, map_location="cpu") if args.resume else None
    if checkpoint:
        missing = [name for name in FIXED_BY_CHECKPOINT if name not in checkpoint["args"]]
        if missing:
            raise SystemExit(f"{checkpoint_path} was written by an older version of this script "
                             f"(no {', '.join(missing)}); start a new run")
        for name in FIXED_BY_CHECKPOINT:
            setattr(args, name, checkpoint["args"][name])
        args.minutes = args.minutes if args.minutes is not None else checkpoint["args"]["minutes"]
    args.minutes = args.minutes if args.minutes is not None else 20.0
    if args.init_from and not checkpoint:
        take_shape(args)
    if not 0 <= args.focus <= 1:
        raise SystemExit(f"--focus {args.focus}: must be between 0 and 1")
    tasks, eval_lengths = args.tasks.split(","), [int(n) for n in args.eval_lengths.split(",")]
    for task in set(tasks + args.warmup_tasks.split(",")) - {""}:
        if task not in TASKS:
            raise SystemExit(f"unknown task {task}; tasks: {', '.join(TASKS)}")
        if min(stage_lengths(args) + eval_lengths) < MIN_LENGTH[task]:
            raise SystemExit(f"task {task} needs lengths >= {MIN_LENGTH[task]}")

    model = build_model(args)
    if args.init_from and not checkpoint:
        earlier = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        model.load_state_dict(earlier.state_dict())
        del earlier
    model = model.to(device)
    optimizer = make_optimizer(model, args, device)
    state = {"step": 0, "batches": 0, "stage": 0, "stage_started": 0.0, "elapsed": 0.0, "recent": [],
             "task_losses": {}, "task_weights": task_weights(stage_plan(args)[0][1], {}, args.focus)}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["state"]
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f}M parameters ({params * 2 / 1e6:.1f} MB in bf16); step {state['step']}, "
          f"{state['elapsed']:.0f}/{args.minutes * 60:.0f}s trained, stage {state['stage'] + 1}")

    stop = threading.Event()  # SIGINT/SIGTERM (Ctrl-C, `timeout`): finish the step, save, exit
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(args, model, optimizer, state, out, device, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    save_checkpoint(checkpoint_path, model, optimizer, state, args)
    if stop.is_set():
        raise SystemExit(f"stopped at {state['elapsed']:.0f}s of training; continue with --resume")
    model.to(torch.bfloat16).save_pretrained(out / "model")
    byte_tokenizer().save_pretrained(out / "model")
    del model, optimizer

    results = final_eval(out / "model", tasks, eval_lengths, args.eval_samples, device)
    summary = {"step": state["step"], "elapsed": state["elapsed"], "samples": args.eval_samples, "results": results}
    (out / "final_eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "model" / "README.md").write_text(model_card(args, state, params, results, eval_lengths, device))
    print(markdown_table(results, eval_lengths))


def model_card(args, state, params, results, lengths, device):
    """The model card, written from this run's settings and measured scores."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    stage_log = [json.loads(line) for line in open(Path(args.out) / "train_log.jsonl") if '"event": "stage"' in line]
    stages = ", ".join(f"{r['from_length']} -> {r['to_length']} at step {r['step']} ({r['reason']})" for r in stage_log)
    plan = stage_plan(args)
    warmup = (f"first {', '.join(plan[0][1])} alone at {plan[0][0]} tokens, then all tasks; "
              if len(plan) > len(stage_lengths(args)) else "")
    start = f"from run {len(args.earlier_training)}'s weights" if args.init_from else f"from random weights (seed {args.seed})"
    this_run = (f"{state['step']} optimizer steps in {state['elapsed'] / 60:.1f} minutes on one {hardware}, {start}; "
                f"tasks {', '.join(args.tasks.split(','))}; {warmup}lengths {args.stages} tokens by an adaptive "
                f"curriculum ({stages or 'no stage change'}); {args.focus:g} of the samples drawn by task answer loss, "
                f"the rest evenly; {args.tokens_per_step} tokens per step; loss = answer "
                f"cross-entropy + {args.context_weight} x prompt cross-entropy; AdamW lr {args.lr:g} -> {args.min_lr:g} "
                f"(cosine over training time), weight decay {args.weight_decay}, bf16 autocast.")
    runs = [*args.earlier_training, this_run]
    done = [re.search(r"(\d+) optimizer steps in ([\d.]+) minutes", run) for run in runs]
    total = (f"{sum(int(m[1]) for m in done)} optimizer steps in {sum(float(m[2]) for m in done):.1f} minutes of training"
             if all(done) else "see the runs below")
    run_list = "\n".join(f"{number}. {run}" for number, run in enumerate(runs, 1))
    history = f", in {len(runs)} runs, each from the weights of the one before (`--init-from`)" if len(runs) > 1 else ""
    weak = [task for task, cells in results.items() if min(cell["score"] for cell in cells.values()) < SOLVED_SCORE]
    weak_line = (f"- Weak on {', '.join(weak)} (a score under {SOLVED_SCORE} at some length above): eviction results "
                 "on these tasks say little.\n" if weak else "")
    return f"""# sagekv reference model

A small byte-level Llama trained from scratch to retrieve facts from long synthetic contexts, so that
KV-cache eviction can be judged on a model whose attention really finds things. It is a retrieval
model for `sagekv.tasks`, not a chat or general language model.

## Model
- Llama architecture, {params / 1e6:.2f}M parameters, saved in bfloat16: hidden {args.hidden}, {args.layers} layers,
  {args.heads} query heads and {args.kv_heads} KV heads (grouped-query attention, group size {args.heads // args.kv_heads}),
  SwiGLU width {args.intermediate}, RoPE base {args.rope_theta:g}, untied embeddings.
- Tokenizer: UTF-8 bytes (ids 0-255), `<s>` = 256 (prepended), `</s>` = 257 (ends an answer).
- Loads unmodified with transformers (`AutoModelForCausalLM`) and mlx-lm (`mlx_lm.load`).

## Training
- Data: prompts generated by `sagekv.tasks` from training seeds {TRAIN_SEEDS.start} and up only; the evaluation below
  uses seeds from {EVAL_SEEDS.start}, which training never sees. All text is synthetic (invented words from
  templates); no third-party text.
- `scripts/train_reference_model.py`{history}: {total} in all.

{RUNS_HEADING}
{run_list}

## Scores with full attention
Greedy decoding, {args.eval_samples} evaluation seeds per task and length; task score (exact match for
single answers, fraction of items for multi-answer tasks) and, in brackets, exact match of the whole answer.

{markdown_table(results, lengths)}

## Limits
- Only the task formats of `sagekv.tasks` are in its training distribution; on other text it produces noise.
- Trained up to {max(int(n) for n in args.stages.split(","))} tokens; longer prompts are outside what it has seen.
- Its answers need the prompt to end with the task's answer prefix.
{weak_line}"""


if __name__ == "__main__":
    main()
