"""Plain float64 numpy references, written as directly from each paper's rule as possible."""

import numpy as np

import sagekv


def sagekv_split(budget, group_size, sink=None, topk=None, recent=None):
    sink = budget // 4 if sink is None else sink
    topk = budget // (2 * group_size) if topk is None else topk
    recent = budget - sink - group_size * topk if recent is None else recent
    return sink, topk, recent


def softmax(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


def attention_row(query, keys, position):
    """Softmax attention of one query at ``position`` over keys[0..position]."""
    d = query.shape[-1]
    probs = np.zeros(len(keys))
    probs[: position + 1] = softmax(keys[: position + 1] @ query / np.sqrt(d))
    return probs


def pool1d(x, kernel, mode, follow=1, decay=1.0):
    """Max or average over ``kernel`` neighbours (zero padding counts for the average), then the
    max over each position and the ``follow`` - 1 before it, discounted by ``decay`` per step."""
    half = kernel // 2
    out = np.empty_like(x)
    for i in range(len(x)):
        window = x[max(i - half, 0) : i + half + 1]
        out[i] = window.max() if mode == "max" else window.sum() / kernel
    return np.array([max(out[i - t] * decay**t for t in range(min(follow, i + 1))) for i in range(len(x))])


def policy_reference(policy, queries, keys):
    """Kept positions per row, plus (candidates, per-row scores) for checking near-ties.

    ``queries``: [Hq, W, D], the last W prompt queries; ``keys``: [Hkv, N, D].
    """
    queries, keys = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
    hq, w, d = queries.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    last = queries[:, -1]
    if isinstance(policy, sagekv.SageKV):
        sink, k, recent = sagekv_split(policy.budget, g, policy.sink, policy.topk, policy.recent)
        per_row = k if policy.group == "query_head" else g * k
        rows = hq if policy.group == "query_head" else hkv
    elif isinstance(policy, sagekv.StreamingLLM):
        sink, recent, per_row, rows = policy.sink, policy.budget - policy.sink, 0, hkv
    elif isinstance(policy, sagekv.SnapKV):
        sink, recent, rows = 0, policy.window - 1, hkv
        per_row = policy.budget - recent
    elif isinstance(policy, (sagekv.Full, sagekv.Quest)):
        return [np.arange(n) for _ in range(hkv)], None
    else:  # TOVA, Knorm, Random
        sink, recent, per_row, rows = 0, 0, policy.budget, hkv
    if n <= sink + (g if rows == hq else 1) * per_row + recent + 1:
        return [np.arange(n) for _ in range(rows)], None

    candidates = np.arange(sink, n - 1 - recent)
    probs = lambda h: attention_row(last[h], keys[h // g], n - 1)  # noqa: E731
    scores = []  # per row, over the candidates
    for row in range(rows):
        if isinstance(policy, sagekv.SageKV) and policy.group == "query_head":
            plain = policy.pool == policy.follow == 1
            full = keys[row // g] @ last[row] / np.sqrt(d) if plain else pool1d(probs(row), policy.pool, "max", policy.follow, policy.decay)
            score = full[candidates]
        elif isinstance(policy, sagekv.SageKV):
            score = pool1d(sum(probs(h) for h in range(row * g, (row + 1) * g)), policy.pool, "max", policy.follow,
                           policy.decay)[candidates]
        elif isinstance(policy, sagekv.SnapKV):
            window = range(w - min(w, policy.window), w)
            votes = sum(attention_row(queries[h, i], keys[row], n - w + i) for h in range(row * g, (row + 1) * g) for i in window)
            score = pool1d(votes[candidates], policy.kernel, policy.pooling)
        elif isinstance(policy, sagekv.TOVA):
            score = (sum(probs(h) for h in range(hq)) / hq)[candidates]
        elif isinstance(policy, sagekv.Knorm):
            score = -np.round(np.linalg.norm(keys[row], axis=-1), 3)[candidates]
        elif isinstance(policy, sagekv.Random):
            score = np.random.default_rng(policy.seed).random((hkv, len(candidates)), dtype=np.float32)[row]
        else:
            score = np.zeros(len(candidates))
        scores.append(score)
    kept = []
    fixed = list(range(sink)) + list(range(n - 1 - recent, n))
    for score in scores:
        top = candidates[np.argsort(-score, kind="stable")[:per_row]] if per_row else []
        kept.append(np.sort(np.array(fixed + list(top), dtype=np.int64)))
    return kept, (candidates, scores)


def masked_attention(query, keys, values, kept, scale):
    """One query head attending to the positions in ``kept`` only."""
    logits = keys[kept] @ query * scale
    p = np.exp(logits - logits.max())
    return (p / p.sum()) @ values[kept]


def quest_pages(query, keys, length, page, budget):
    """Quest's positions for one query head, as in its repository: all of them while they fit the
    budget, else the top upper bounds among full pages plus the current page, budget // page pages."""
    if length <= budget:
        return list(range(length))
    pages = -(-length // page)
    bounds = []
    for p in range(pages - 1):
        chunk = keys[p * page : (p + 1) * page]
        bounds.append(np.maximum(query * chunk.min(0), query * chunk.max(0)).sum())
    chosen = sorted(np.argsort(-np.array(bounds), kind="stable")[: budget // page - 1]) + [pages - 1]
    return [t for p in chosen for t in range(p * page, min((p + 1) * page, length))]


def assert_valid_selection(got, reference, tolerance=1e-5):
    """Rows equal the reference, or differ only among candidates tied within float32 noise."""
    rows, detail = reference
    assert len(got) == len(rows)
    for row, (g, r) in enumerate(zip(got, rows)):
        assert list(g) == sorted(g), "positions must be sorted ascending"
        if np.array_equal(g, r):
            continue
        assert detail is not None and len(g) == len(r), (row, g, r)
        candidates, scores = detail
        score = dict(zip(candidates, scores[row]))
        kth = min(score[p] for p in r if p in score)
        for p in set(g) ^ set(r):
            assert abs(score[p] - kth) <= tolerance * max(1.0, abs(kth)), (row, p)


def samkv_selection(question, local_queries, i, keys, initial, local, block):
    """SamKV's kept rows of document i per selection layer, from the spec (float64): the question's
    query plus the other documents' local queries weighted by |cos| with it, averaged per KV group;
    anchor and block-mean key scores summed over KV heads; ratio = share of the block-score range
    above the anchors' score (clipped to [0, 1]), averaged over layers; that share of top blocks."""
    q = np.asarray(question, np.float64)
    locals_ = [np.asarray(x, np.float64) for x in local_queries]
    keys = np.asarray(keys, np.float64)
    layers, hq, d = q.shape
    n, _, hkv, _ = keys.shape
    g = hq // hkv
    others = [j for j in range(len(locals_)) if j != i]
    qhat = q.copy()
    for s in range(layers):
        for h in range(hq):
            bias = np.zeros(d)
            for j in others:
                other = locals_[j][s, h]
                bias += abs(other @ q[s, h] / (np.linalg.norm(other) * np.linalg.norm(q[s, h]))) * other
            qhat[s, h] += bias / len(others)
    anchors = list(range(initial)) + list(range(n - local, n))
    middle = list(range(initial, n - local))
    blocks = [middle[b : b + block] for b in range(0, len(middle), block)]
    ratios, scores = [], []
    for s in range(layers):
        grouped = [qhat[s, h * g : (h + 1) * g].mean(axis=0) for h in range(hkv)]
        anchor = sum(keys[anchors, s, h].mean(axis=0) @ grouped[h] for h in range(hkv))
        per_block = [sum(keys[b, s, h].mean(axis=0) @ grouped[h] for h in range(hkv)) for b in blocks]
        high, low = max(per_block), min(per_block)
        ratios.append(min(max((high - anchor) / (high - low), 0.0), 1.0))
        scores.append(per_block)
    keep = int(len(blocks) * np.mean(ratios))
    chosen = []
    for per_block in scores:
        top = sorted(np.argsort(-np.array(per_block), kind="stable")[:keep])
        chosen.append(np.array(sorted(anchors + [r for b in top for r in blocks[b]])))
    return chosen


def samkv_token_selection(queries, keys, anchors, follow, decay, share):
    """SamKV's ``unit="tokens"`` kept rows per piece and selection layer (float64): per layer and KV
    head, one softmax of the personalised queries (``queries`` per piece [S, Hq, D]) over every piece's
    keys (per piece [n, S, Hkv, D]), summed over the head's query group; anchors weigh 0, then each
    token takes the highest of its own weight and decay**j times that of the token j <= follow - 1
    before it in its piece; each (layer, head) keeps its top k non-anchor tokens (ties: earlier
    first), k the largest whose union with the anchors keeps at most ``share`` of the tokens."""
    lengths = [len(k) for k in keys]
    offsets = np.cumsum([0] + lengths)
    layers, hq, d = queries[0].shape
    hkv = keys[0].shape[2]
    g = hq // hkv
    scores = np.zeros((layers, hkv, offsets[-1]))
    for s in range(layers):
        for h in range(hkv):
            for head in range(h * g, (h + 1) * g):
                logits = np.concatenate([np.asarray(k, np.float64)[:, s, h] @ np.asarray(q, np.float64)[s, head]
                                         for q, k in zip(queries, keys)]) / np.sqrt(d)
                scores[s, h] += softmax(logits)
    for i, rows in enumerate(anchors):
        part = scores[:, :, offsets[i] : offsets[i + 1]]
        part[:, :, rows] = 0.0
        carried = part.copy()
        for j in range(1, follow):
            carried[:, :, j:] = np.maximum(carried[:, :, j:], part[:, :, :-j] * decay**j)
        carried[:, :, rows] = -1.0
        scores[:, :, offsets[i] : offsets[i + 1]] = carried
    candidates = offsets[-1] - sum(len(a) for a in anchors)
    for k in range(candidates, -1, -1):
        chosen = []
        for i in range(len(keys)):
            per_layer = []
            for s in range(layers):
                top = {int(t) for h in range(hkv) for t in sorted(range(offsets[-1]), key=lambda t: (-scores[s, h, t], t))[:k]}
                per_layer.append(np.array(sorted(set(anchors[i].tolist()) | {t - offsets[i] for t in top if offsets[i] <= t < offsets[i + 1]})))
            chosen.append(per_layer)
        if sum(len(set().union(*[set(r.tolist()) for r in per_layer])) for per_layer in chosen) <= share * offsets[-1] or k == 0:
            return chosen


def sampling_probabilities(logits, temperature, top_p=1.0, top_k=0):
    """The distribution a token is drawn from: softmax(logits / temperature) over the ``top_k`` highest
    logits (and ties with the k-th), then over the fewest most probable tokens whose probabilities add
    up to at least ``top_p``, renormalised."""
    z = np.asarray(logits, np.float64) / temperature
    if 0 < top_k < len(z):
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = softmax(z)
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        count = min(np.searchsorted(np.cumsum(p[order]), top_p) + 1, len(p))  # the first prefix reaching top_p
        p[order[count:]] = 0
        p /= p.sum()
    return p
