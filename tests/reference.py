"""Plain float64 numpy references, written as directly from the spec as possible."""

import numpy as np


def sagekv_split(budget, group_size, sink=None, topk=None, recent=None):
    sink = budget // 4 if sink is None else sink
    topk = budget // (2 * group_size) if topk is None else topk
    recent = budget - sink - group_size * topk if recent is None else recent
    return sink, topk, recent


def select_reference(query, keys, budget, group="query_head", sink=None, topk=None, recent=None):
    """Kept positions per row (list of sorted int arrays) for SAGE-KV, one head at a time."""
    query, keys = np.asarray(query, np.float64), np.asarray(keys, np.float64)
    hq, d = query.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    s, k, r = sagekv_split(budget, g, sink, topk, recent)
    if n <= s + g * k + r + 1:
        rows = hq if group == "query_head" else hkv
        return [np.arange(n) for _ in range(rows)], None
    candidates = np.arange(s, n - 1 - r)
    fixed = list(range(s)) + list(range(n - 1 - r, n))
    rows, scores = [], []
    if group == "query_head":
        for h in range(hq):
            score = keys[h // g, candidates] @ query[h] / np.sqrt(d)
            top = candidates[np.argsort(-score, kind="stable")[:k]]
            rows.append(np.sort(np.array(fixed + list(top))))
            scores.append(score)
    else:
        for kv in range(hkv):
            total = np.zeros(n)
            for h in range(kv * g, (kv + 1) * g):
                logits = keys[kv] @ query[h] / np.sqrt(d)
                p = np.exp(logits - logits.max())
                total += p / p.sum()
            score = total[candidates]
            top = candidates[np.argsort(-score, kind="stable")[: g * k]]
            rows.append(np.sort(np.array(fixed + list(top))))
            scores.append(score)
    return rows, (candidates, scores)


def masked_attention(query, keys, values, kept, scale):
    """One query head attending to the positions in ``kept`` only."""
    logits = keys[kept] @ query * scale
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ values[kept]
