"""LongBench-format JSONL tasks and LongBench's metrics (Bai et al., arXiv 2308.14508).

A line holds ``context``, ``input`` (the question, may be empty), ``answers`` (list),
``dataset`` and, for classification, ``all_classes``. Metrics follow LongBench's definitions;
code similarity uses difflib's ratio where LongBench uses fuzzywuzzy's (the same ratio).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from difflib import SequenceMatcher

from .errors import SageKVError


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (as in SQuAD and LongBench)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, truth: str, **_) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, truth: str, **_) -> float:
    """ROUGE-L F1 over whitespace tokens (longest common subsequence)."""
    pred, gold = prediction.split(), truth.split()
    if not pred or not gold:
        return 0.0
    previous = [0] * (len(gold) + 1)
    for p in pred:
        current = [0]
        for j, g in enumerate(gold):
            current.append(previous[j] + 1 if p == g else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(gold)
    return 2 * precision * recall / (precision + recall)


def classification(prediction: str, truth: str, all_classes=(), **_) -> float:
    matches = [c for c in all_classes if c in prediction]
    matches = [m for m in matches if not (m in truth and m != truth)]
    return 1.0 / len(matches) if truth in matches else 0.0


def retrieval(prediction: str, truth: str, **_) -> float:
    wanted = re.findall(r"Paragraph (\d+)", truth)
    numbers = re.findall(r"\d+", prediction)
    if not wanted or not numbers:
        return 0.0
    return sum(n == wanted[0] for n in numbers) / len(numbers)


def count(prediction: str, truth: str, **_) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(truth) for n in numbers) / len(numbers) if numbers else 0.0


def code_similarity(prediction: str, truth: str, **_) -> float:
    lines = [line for line in prediction.lstrip("\n").split("\n") if not any(m in line for m in ("`", "#", "//"))]
    return SequenceMatcher(None, lines[0] if lines else "", truth).ratio()


METRICS = {"qa_f1": qa_f1, "rouge": rouge_l, "classification": classification,
           "retrieval": retrieval, "count": count, "code_sim": code_similarity}
# English LongBench datasets: (metric, maximum new tokens as in LongBench)
DATASETS = {
    "narrativeqa": ("qa_f1", 128), "qasper": ("qa_f1", 128), "multifieldqa_en": ("qa_f1", 64),
    "hotpotqa": ("qa_f1", 32), "2wikimqa": ("qa_f1", 32), "musique": ("qa_f1", 32), "triviaqa": ("qa_f1", 32),
    "gov_report": ("rouge", 512), "qmsum": ("rouge", 512), "multi_news": ("rouge", 512), "samsum": ("rouge", 128),
    "trec": ("classification", 64), "passage_retrieval_en": ("retrieval", 32), "passage_count": ("count", 32),
    "lcc": ("code_sim", 64), "repobench-p": ("code_sim", 64),
}
FIRST_LINE_ONLY = {"trec", "triviaqa", "samsum"}  # LongBench scores only the first generated line
PASSAGE_DATASETS = ("hotpotqa", "2wikimqa", "musique")  # contexts of "Passage N:" sections, one retrieved passage each
PASSAGE_HEADING = re.compile(r"^(?=Passage \d+:)", re.MULTILINE)


def prompt_for(dataset: str, context: str, question: str) -> str:
    metric = DATASETS[dataset][0]
    if metric == "code_sim":
        return f"Complete the code below.\n{context}Next line of code:\n"
    if metric == "rouge" and not question.strip():
        return f"{context.strip()}\n\nWrite a summary of the text above.\nSummary: "
    return context.strip() + question_part(question)


def question_part(question: str) -> str:
    """What follows the context in a question-answering prompt."""
    return f"\n\nAnswer based on the text above.\nQuestion: {question.strip()}\nAnswer: "


def passages(dataset: str, context: str, question: str) -> tuple:
    """The prompt of a multi-document dataset as documents, one per "Passage N:" section, and the
    question part after them: ``"".join(documents) + question == prompt_for(dataset, context, question)``."""
    if dataset not in PASSAGE_DATASETS:
        raise SageKVError(f"{dataset} has no passages to store as documents (RAG methods take LongBench "
                          f"{', '.join(PASSAGE_DATASETS)})")
    documents = [text for text in PASSAGE_HEADING.split(context.strip()) if text]
    return documents, question_part(question)


def score(dataset: str, prediction: str, answers, all_classes=()) -> float:
    if dataset in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[DATASETS[dataset][0]]
    return max((metric(prediction, truth, all_classes=all_classes or ()) for truth in answers), default=0.0)


def read(path: str, limit=None) -> list:
    """Records of a LongBench JSONL file, checked line by line."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if limit is not None and len(records) >= limit:
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SageKVError(f"{path}:{number}: not JSON ({error.msg})") from None
                missing = [k for k in ("context", "input", "answers", "dataset") if k not in record]
                if missing:
                    raise SageKVError(f"{path}:{number}: missing field(s) {', '.join(missing)}")
                if record["dataset"] not in DATASETS:
                    raise SageKVError(f"{path}:{number}: unknown LongBench dataset {record['dataset']!r}")
                records.append(record)
    except OSError as error:
        raise SageKVError(f"cannot read {path}: {error.strerror}") from None
    if not records:
        raise SageKVError(f"{path} holds no records")
    return records
