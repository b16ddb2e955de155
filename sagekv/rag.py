"""Retrieval-augmented generation over independently prefilled, stored document caches.

Each document is prefilled alone (positions 0..n-1) once and stored; a question then arrives with
the documents it retrieved. The tokens the tokenizer puts before any text (``<bos>``) form a first
piece of their own, as a system preamble would. Every method places the pieces one after another
(each document's keys re-rotated by its offset, so each token has the position it has in the
concatenated prompt), prefills the question, and decodes (greedily unless given a sampler):

- :class:`FullRecompute`: one ordinary prefill of everything (the accuracy reference);
- :class:`Reuse`: the stored caches as they are, only the question prefilled;
- :class:`EPIC`: reuse, recomputing the first ``k`` tokens of every document (EPIC's LegoLink);
- :class:`CacheBlend`: reuse, recomputing the tokens whose keys deviate most at a check layer;
- :class:`SamKV`: a sparse cache per document chosen with a query personalised by the other
  documents, every other entry evicted, the kept tokens recomputed layer by layer.

Time to first token counts from the question's arrival: stored document prefills are excluded,
loading the stored rows a method needs is included. A pass computes chosen rows of the compact
sequence layer by layer (:func:`sagekv.layerwise.run_pass`); each layer's :class:`SegmentKV` holds the cache being
repaired, writes the fresh rows (overwritten or fused) and masks attention by compact index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import numpy as np

from .cache import SegmentKV
from .errors import SageKVError
from .layerwise import run_pass
from .ops import NumpyOps
from .policies.base import carry_forward, check_fraction, check_int
from .store import MemoryStore, content_key

QUERY_TAIL = 128  # a stored document keeps the queries of its last tokens (SamKV's local query)
PREFILL_ROWS = 2048  # rows per pass when a document is prefilled alone


# ---------------------------------------------------------------------------------------------
# Documents: prefilled alone and stored


@dataclass
class Piece:
    """One stored part of the prompt, its first token at global position ``start``."""

    ids: list
    start: int
    stored: object  # a StoredDocument: read(name, rows=None, layers=None) -> numpy, dtype(name)

    @property
    def stop(self) -> int:
        return self.start + len(self.ids)

    def read(self, run, name: str, rows=None, layers=None):
        """Stored rows as an array of the model's backend."""
        if rows is not None and len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)  # a range reads as one block
        return run.from_raw(self.stored.read(name, rows, layers), self.stored.dtype(name))


def prefill_document(model, ids: list, start: int = 0) -> dict:
    """``ids`` prefilled alone at positions start..: keys and values [n, L, Hkv, D] and the queries of
    its last QUERY_TAIL tokens [q, L, Hq, D], as (numpy, safetensors dtype) pairs for the store."""
    run = model.runner
    _, segments, _, tails = fresh_prefill(run, ids, start, PREFILL_ROWS)
    by_token = lambda per_layer: run.ops.xp.stack(per_layer).swapaxes(0, 2).swapaxes(1, 2)  # [L, H, n, D] -> [n, L, H, D]  # noqa: E731
    return {
        "keys": run.raw(by_token([s.keys[0, :, : s.size] for s in segments])),
        "values": run.raw(by_token([s.values[0, :, : s.size] for s in segments])),
        "queries": run.raw(by_token(tails)),
    }


def fresh_prefill(run, ids: list, start: int = 0, chunk: Optional[int] = None):
    """An ordinary causal prefill of ``ids`` at positions start.., layer by layer, ``chunk`` rows per
    call of a layer (default all: the fastest causal kernel): the cache, its layers, the last logits
    and, per layer, the queries of the last QUERY_TAIL tokens."""
    chunk = chunk and max(chunk, QUERY_TAIL)  # the last part holds the tail's queries
    segments = [SegmentKV.empty(run.ops, run.empty_kv(), room=len(ids)) for _ in range(run.num_layers)]
    cache = run.wrap(segments)
    rows = np.arange(len(ids))
    logits = run_pass(run, cache, segments, ids, rows + start, rows, chunk=chunk)
    return cache, segments, logits, [s.queries[:, -QUERY_TAIL:] for s in segments]


def stored_pieces(model, store, pieces_ids: list) -> list:
    """The pieces placed one after another, each stored (prefilled alone) unless it already is."""
    starts = np.cumsum([0] + [len(ids) for ids in pieces_ids])
    return [stored_piece(model, store, ids, int(start)) for ids, start in zip(pieces_ids, starts)]


def stored_piece(model, store, ids: list, start: int) -> Piece:
    key = content_key(ids)
    stored = store.get(key)
    if stored is None:
        stored = store.put(key, prefill_document(model, ids), {"tokens": str(len(ids))})
    return Piece(ids, start, stored)


# ---------------------------------------------------------------------------------------------
# Repairing a cache with a layer-by-layer pass (sagekv.layerwise.run_pass)


def load_rows(run, pieces, rows_per_piece):
    """The given local rows of each piece, keys re-rotated to their global positions: per layer
    keys and values [1, Hkv, T, D], with the rows' global positions and token ids."""
    keys, values, positions, ids = [], [], [], []
    for piece, rows in zip(pieces, rows_per_piece):
        if len(rows):
            keys.append(run.rerotate(piece.read(run, "keys", rows), piece.start))
            values.append(piece.read(run, "values", rows))
            positions.append(rows + piece.start)
            ids += [piece.ids[r] for r in rows]
    per_layer = lambda parts: run.ops.concat(parts, axis=0).swapaxes(0, 1).swapaxes(1, 2)[:, None]  # [L, 1, H, T, D]  # noqa: E731
    return per_layer(keys), per_layer(values), np.concatenate(positions), ids


def question_rows(pieces, question, held: int):
    """Compact rows and global positions of the question appended after ``held`` rows."""
    start = pieces[-1].stop
    return np.arange(held, held + len(question)), np.arange(start, start + len(question))


def repair(model, pieces, question, kept, compute=None, schedule=None, theta=None, track=()):
    """Load the ``kept`` local rows of every piece and compute, over them, the compact rows
    ``compute`` (default: every kept row) and the question; returns the caches and logits."""
    run = model.runner
    keys, values, positions, ids = load_rows(run, pieces, kept)
    segments = [SegmentKV(run.ops, k, v, positions) for k, v in zip(keys, values)]
    cache = run.wrap(segments)
    held = len(ids)
    q_rows, q_positions = question_rows(pieces, question, held)
    compute = np.arange(held) if compute is None else compute
    rows = np.concatenate([compute, q_rows])
    all_ids, all_positions = ids + list(question), np.concatenate([positions, q_positions])
    logits = run_pass(run, cache, segments, [all_ids[r] for r in rows], all_positions[rows], rows, schedule, theta, track)
    return cache, logits


def every_row(piece) -> np.ndarray:
    return np.arange(len(piece.ids))


# ---------------------------------------------------------------------------------------------
# Methods


class RagMethod:
    """A way to answer a question over stored documents: ``prefill`` returns the backend cache to
    decode on, the first token's logits and how many document tokens that cache keeps."""

    name: ClassVar[str]

    def prefill(self, model, pieces: list, question: list):
        raise NotImplementedError


@dataclass(frozen=True)
class FullRecompute(RagMethod):
    """One ordinary prefill of all documents and the question: the accuracy reference."""

    name = "full_recompute"

    def prefill(self, model, pieces, question):
        ids = [t for piece in pieces for t in piece.ids] + list(question)
        cache, _, logits, _ = fresh_prefill(model.runner, ids)
        return cache, logits, len(ids) - len(question)


@dataclass(frozen=True)
class Reuse(RagMethod):
    """The stored caches, re-rotated and concatenated as they are; only the question is prefilled."""

    name = "reuse"

    def prefill(self, model, pieces, question):
        cache, logits = repair(model, pieces, question, [every_row(p) for p in pieces], compute=np.arange(0))
        return cache, logits, pieces[-1].stop


@dataclass(frozen=True)
class EPIC(RagMethod):
    """EPIC's LegoLink (Hu et al., "EPIC: Efficient Position-Independent Caching for Serving Large
    Language Models", arXiv 2410.15332): reuse, then recompute at every layer the first ``k``
    tokens of every piece but the first (prefilled alone, they act as attention sinks)."""

    k: int = 32
    name = "epic"

    def __post_init__(self):
        check_int("k", self.k, 0)

    def prefill(self, model, pieces, question):
        firsts = [np.arange(p.start, p.start + min(self.k, len(p.ids))) for p in pieces[1:]]
        cache, logits = repair(model, pieces, question, [every_row(p) for p in pieces],
                               compute=np.concatenate(firsts) if firsts else np.arange(0))
        return cache, logits, pieces[-1].stop


@dataclass(frozen=True)
class CacheBlend(RagMethod):
    """CacheBlend (Yao et al., "CacheBlend: Fast Large Language Model Serving for RAG with Cached
    Knowledge Fusion", arXiv 2405.16444): reuse, recompute every token up to a check layer, then only
    the share ``ratios[i]`` of document tokens whose keys changed most at ``check_layers[i]``
    (several check layers narrow the set step by step: its gradual filtering). Defaults are
    LMCache's: check layer 1, 15%. The whole cache is kept."""

    ratios: tuple = (0.15,)
    check_layers: tuple = (1,)
    name = "cacheblend"

    def __post_init__(self):
        if len(self.ratios) != len(self.check_layers) or not self.ratios:
            raise SageKVError("cacheblend needs one ratio per check layer")
        if any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
            raise SageKVError(f"ratios must be in (0, 1] and not increase, got {self.ratios!r}")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.check_layers) or \
                list(self.check_layers) != sorted(set(self.check_layers)):
            # layer 0's keys depend on the token and its position alone: they deviate by rounding only
            raise SageKVError(f"check_layers must be ascending layer indices from 1, got {self.check_layers!r}")

    def prefill(self, model, pieces, question):
        documents = pieces[-1].stop
        if self.check_layers[-1] >= model.runner.num_layers - 1:
            raise SageKVError(f"check layers must come before the last layer ({model.runner.num_layers - 1})")

        def schedule(layer, rows, segments):
            if layer - 1 not in self.check_layers:
                return rows
            ratio = self.ratios[self.check_layers.index(layer - 1)]
            held = rows[rows < documents]
            deviation = segments[layer - 1].deviation[: len(held)]
            top = held[np.argsort(-deviation, kind="stable")[: min(int(round(ratio * documents)), len(held))]]
            return np.concatenate([np.sort(top), rows[rows >= documents]])

        cache, logits = repair(model, pieces, question, [every_row(p) for p in pieces], schedule=schedule,
                               track=self.check_layers)
        return cache, logits, documents


@dataclass(frozen=True)
class SamKV(RagMethod):
    """SamKV (Cao et al., "Sparse Attention across Multiple-context KV Cache", arXiv 2508.11661).

    Each document keeps its first ``initial`` and last ``local`` tokens (anchors). The question is
    prefilled over the anchors of all documents; at each of the last ``layers`` layers its mean
    query, plus the other documents' mean local queries weighted by their |cosine| with it, makes a
    query personalised per document. Each document's middle is cut into blocks of ``block`` tokens
    scored by that query against their mean keys; the share of the score range above the anchors'
    score, averaged over those layers, is the document's retention ratio, and that share of blocks
    is kept at each of those layers. Everything else is evicted; the kept tokens are recomputed
    layer by layer (a token chosen at layer n is recomputed at every layer up to n), their fresh
    entries overwriting the stored ones (``update="overwrite"``) or mixed in with weight ``theta``
    (``"fusion"``). Decoding runs on that compact cache, positions kept as in the full prompt.

    The paper's settings could not be read; defaults are the public re-implementation's (KV Packet,
    arXiv 2604.13226): the last 4 layers, fusion weight 0.9, and its "small" anchors and blocks,
    8 / 16 / 8 (its "large" is 64 / 128 / 64). Where the anchors score below every block the ratio
    is 1 (that implementation gives 0, keeping nothing of a document whose every block outranks
    its anchors).

    ``layers``: the last ``layers`` layers select (the re-implementation's choice), or a tuple of
    layer indices. Not in the paper: ``query="last"`` scores with the question's last token's query instead of its
    mean (the query SAGE-KV selects with); ``max_kept=s`` scales every document's ratio down until
    at most the share ``s`` of document tokens is kept (anchors are always kept). ``recompute=False``
    is the paper's ablation: the kept entries are used as stored.

    ``unit="tokens"`` (not in the paper) replaces blocks and ratios by SAGE-KV's ``kv_follow``
    selection across documents: at each selection layer and KV head, the personalised queries'
    softmax attention over every document's middle tokens at once (one softmax, so documents compete
    for the budget), summed over the head's query group, each token's score carried to the
    ``follow - 1`` tokens after it with weight ``decay`` per token; each (layer, KV head) keeps its
    top k tokens, k the largest whose union over layers and heads, with the anchors, is at most the
    share ``max_kept`` of document tokens (required).

    ``lookahead=m`` (not in the paper; ``unit="tokens"`` only) then drafts m tokens greedily on the
    kept entries as stored and selects again, each draft token's queries at the selection layers
    scoring every document's tokens as the personalised query does, all scores summed. One query
    finds what the question names; the draft's also find what the answer reads next (in a two-hop
    question, the fact about the entity the first fact names), even when the draft itself is wrong.
    Pseudo queries from a draft guide eviction in Lookahead Q-Cache (Wang et al., 2025) too.
    """

    initial: int = 8
    local: int = 16
    block: int = 8
    layers: Union[int, tuple] = 4
    update: str = "overwrite"
    theta: float = 0.9
    query: str = "mean"
    max_kept: Optional[float] = None
    recompute: bool = True
    unit: str = "blocks"
    follow: int = 32
    decay: float = 0.8
    lookahead: int = 0
    name = "samkv"

    def __post_init__(self):
        check_int("initial", self.initial, 0)
        check_int("local", self.local, 1)
        check_int("block", self.block, 1)
        if isinstance(self.layers, tuple):
            if not self.layers or any(isinstance(n, bool) or not isinstance(n, int) for n in self.layers) \
                    or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
                raise SageKVError(f"layers must be a count or ascending layer indices from 0, got {self.layers!r}")
        else:
            check_int("layers", self.layers, 1)
        if self.update not in ("overwrite", "fusion"):
            raise SageKVError(f"update must be 'overwrite' or 'fusion', got {self.update!r}")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)) or not 0 < self.theta <= 1:
            raise SageKVError(f"theta must be in (0, 1], got {self.theta!r}")
        if self.query not in ("mean", "last"):
            raise SageKVError(f"query must be 'mean' or 'last', got {self.query!r}")
        if self.max_kept is not None and (isinstance(self.max_kept, bool) or not isinstance(self.max_kept, (int, float))
                                          or not 0 < self.max_kept <= 1):
            raise SageKVError(f"max_kept must be a share in (0, 1], got {self.max_kept!r}")
        if self.unit not in ("blocks", "tokens"):
            raise SageKVError(f"unit must be 'blocks' or 'tokens', got {self.unit!r}")
        if self.unit == "tokens" and self.max_kept is None:
            raise SageKVError("unit='tokens' needs max_kept, the share of document tokens kept")
        check_int("follow", self.follow, 1)
        check_fraction("decay", self.decay)
        check_int("lookahead", self.lookahead, 0)
        if self.lookahead and self.unit != "tokens":
            raise SageKVError("lookahead needs unit='tokens' (blocks are chosen by ratios, not by summed scores)")
        if self.local > QUERY_TAIL:
            raise SageKVError(f"local must be at most {QUERY_TAIL} (the stored query tail), got {self.local}")

    def selection_layers(self, num_layers: int) -> list:
        if isinstance(self.layers, int):
            return list(range(max(num_layers - self.layers, 0), num_layers))
        if self.layers[-1] >= num_layers:
            raise SageKVError(f"selection layer {self.layers[-1]} is beyond the model's {num_layers} layers")
        return list(self.layers)

    def anchors(self, n: int) -> np.ndarray:
        if n <= self.initial + self.local:
            return np.arange(n)
        return np.concatenate([np.arange(self.initial), np.arange(n - self.local, n)])

    def select(self, model, pieces, question) -> list:
        """Per piece, per selection layer: the local rows SamKV keeps."""
        run = model.runner
        layers = self.selection_layers(run.num_layers)
        question_query = self.question_query(model, pieces, question, layers)
        local_queries = [self.local_query(p, layers) for p in pieces]
        if self.unit == "tokens":
            return self.select_tokens(model, pieces, question, question_query, local_queries, layers)
        scored = []  # per piece: (anchors, end of its middle, block order per layer or None, retention ratio)
        for i, piece in enumerate(pieces):
            n = len(piece.ids)
            anchors = self.anchors(n)
            if len(anchors) == n:
                scored.append((anchors, n, None, 0.0))
                continue
            query = personalised_query(question_query, local_queries, i)
            keys = run.rerotate(piece.read(run, "keys", layers=layers), piece.start)  # [n, S, Hkv, D]
            anchor_score, scores = block_scores(run.ops, query, keys, anchors, self.initial, n - self.local, self.block)
            ratio = float(np.mean([retention_ratio(a, b) for a, b in zip(anchor_score, scores)]))
            scored.append((anchors, n - self.local, block_order(scores), ratio))

        def choose(scale: float) -> list:
            return [[anchors] * len(layers) if order is None else
                    chosen_rows(order, anchors, self.initial, stop, self.block, int(order.shape[1] * ratio * scale))
                    for anchors, stop, order, ratio in scored]

        chosen = choose(1.0)
        if self.max_kept is not None:  # scale every document's ratio down until the share fits
            limit = self.max_kept * sum(len(p.ids) for p in pieces)
            if kept_count(chosen) > limit:
                low, high = 0.0, 1.0
                for _ in range(16):  # to 1/65536 of the ratios
                    middle = (low + high) / 2
                    low, high = (middle, high) if kept_count(choose(middle)) <= limit else (low, middle)
                chosen = choose(low)
        return chosen

    def select_tokens(self, model, pieces, question, question_query, local_queries, layers) -> list:
        """Per piece, per selection layer: its anchors and the tokens ``unit="tokens"`` keeps there."""
        run = model.runner
        anchors, lengths = [self.anchors(len(p.ids)) for p in pieces], [len(p.ids) for p in pieces]
        keys = [run.rerotate(p.read(run, "keys", layers=layers), p.start) for p in pieces]
        queries = [personalised_query(question_query, local_queries, i) for i in range(len(pieces))]
        scores = token_scores(run.ops, queries, keys, anchors, self.follow, self.decay)
        chosen = chosen_tokens(scores, lengths, anchors, self.max_kept)
        if not self.lookahead:
            return chosen
        scores = scores + self.draft_scores(model, pieces, question, kept_rows(chosen), layers, keys, anchors)
        return chosen_tokens(scores, lengths, anchors, self.max_kept)

    def draft(self, model, pieces, question, kept) -> list:
        """``lookahead`` tokens drafted greedily over the ``kept`` rows as stored (fewer at an end of sequence)."""
        from .generate import Prefilled

        cache, logits = repair(model, pieces, question, kept, compute=np.arange(0))
        prefilled = Prefilled(cache, logits, pieces[-1].stop + len(question), 0, 0.0)
        return model.decode(prefilled, None, self.lookahead, keep_prefill=False).tokens

    def draft_scores(self, model, pieces, question, kept, layers, keys, anchors):
        """Every document token's score by the draft's queries at the selection layers: each draft token's
        attention over every document's tokens and over the question's and the draft's own rows up to
        it (so a document's share is what the draft would read of it, not renormalised over the
        documents), summed over the draft, then as the question's scores (:func:`token_scores`)."""
        run = model.runner
        draft = self.draft(model, pieces, question, kept)
        if not draft:
            return 0.0
        cache, _ = repair(model, pieces, list(question) + draft, kept, compute=np.arange(0))
        layers_held = run.unwrap(cache)
        segments = [layers_held[n] for n in layers]
        rows = len(question) + len(draft)
        queries = np.stack([to_float(run.ops, s.queries[:, len(question):]) for s in segments])  # [S, Hq, m, D]
        own = run.ops.xp.stack([s.keys[0, :, s.size - rows : s.size] for s in segments])  # [S, Hkv, q + m, D]
        visible = np.arange(rows)[None, :] <= np.arange(len(question), rows)[:, None]  # [m, q + m]: causal
        return token_scores(run.ops, [queries] * len(pieces), keys, anchors, self.follow, self.decay, (own, visible))

    def prefill(self, model, pieces, question):
        run = model.runner
        layers = self.selection_layers(run.num_layers)
        chosen = self.select(model, pieces, question)
        kept = kept_rows(chosen)
        offsets = np.cumsum([0] + [len(k) for k in kept])
        total = int(offsets[-1])
        if not self.recompute:  # the ablation: the kept entries as stored, only the question computed
            cache, logits = repair(model, pieces, question, kept, compute=np.arange(0))
            return cache, logits, total
        question_compact = np.arange(total, total + len(question))
        # a token chosen at selection layer n is recomputed at every layer up to n
        needed = []
        for layer in range(run.num_layers):
            later = [j for j, n in enumerate(layers) if n >= layer]
            rows = [offsets[i] + np.searchsorted(kept[i], np.unique(np.concatenate([chosen[i][j] for j in later])))
                    for i in range(len(pieces))] if later else []
            needed.append(np.concatenate([*rows, question_compact]).astype(np.int64))
        theta = self.theta if self.update == "fusion" else None
        cache, logits = repair(model, pieces, question, kept, schedule=lambda layer, rows, segments: needed[layer],
                               theta=theta)
        return cache, logits, total

    def question_query(self, model, pieces, question, layers):
        """The question prefilled over every piece's anchors: its mean query (or its last token's)
        at each selection layer, [S, Hq, D] float32 numpy."""
        run = model.runner
        cache, _ = repair(model, pieces, question, [self.anchors(len(p.ids)) for p in pieces], compute=np.arange(0))
        segments = run.unwrap(cache)
        queries = [to_float(run.ops, segments[n].queries) for n in layers]  # each [Hq, question tokens, D]
        return np.stack([q.mean(axis=1) if self.query == "mean" else q[:, -1] for q in queries])

    def local_query(self, piece, layers):
        """The mean query of the piece's last ``local`` tokens at each selection layer, [S, Hq, D]."""
        stored = piece.stored.shape("queries")[0]
        rows = np.arange(max(stored - self.local, 0), stored)
        raw = piece.stored.read("queries", rows, layers)
        return float32_of(raw, piece.stored.dtype("queries")).mean(axis=0)


def to_float(ops, x):
    return ops.to_numpy(ops.float32(x))


def float32_of(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as float32 numpy (bfloat16 arrives as its uint16 bits)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def personalised_query(question_query, local_queries, i: int):
    """Q_que + (1 / (D - 1)) * sum over j != i of |cos(Q_loc_j, Q_que)| * Q_loc_j, per layer and head
    (``question_query`` [S, Hq, D]; ``local_queries`` per piece [S, Hq, D]; float32 numpy)."""
    others = [local_queries[j] for j in range(len(local_queries)) if j != i]
    if not others:
        return question_query
    q = question_query
    q_norm = np.linalg.norm(q, axis=-1)
    bias = sum(np.abs((o * q).sum(-1) / (np.linalg.norm(o, axis=-1) * q_norm + 1e-8))[..., None] * o for o in others)
    return q + bias / len(others)


def block_scores(ops, query, keys, anchors, start: int, stop: int, block: int):
    """Scores per selection layer of the anchors' mean key and of each middle block's mean key
    against ``query`` averaged over each KV head's group, summed over heads: ([S], [S, blocks]) numpy.

    ``query``: [S, Hq, D] numpy; ``keys``: the piece's keys at the selection layers [n, S, Hkv, D]."""
    s_layers, hq, d = query.shape
    hkv = keys.shape[2]
    grouped = ops.asarray(query.reshape(s_layers, hkv, hq // hkv, d).mean(axis=2).astype(np.float32), like=keys)
    keys = ops.float32(keys)
    anchor_mean = keys[ops.asarray(anchors, like=keys)].sum(axis=0) / len(anchors)
    middle = keys[start:stop]
    whole = (stop - start) // block * block
    means = [middle[:whole].reshape(whole // block, block, s_layers, hkv, d).sum(axis=1) / block] if whole else []
    if whole < stop - start:
        means.append(middle[whole:].sum(axis=0)[None] / (stop - start - whole))
    blocks = ops.concat(means, axis=0)  # [blocks, S, Hkv, D]
    anchor_score = (anchor_mean * grouped).sum(axis=-1).sum(axis=-1)
    scores = (blocks * grouped[None]).sum(axis=-1).sum(axis=-1).swapaxes(0, 1)
    return ops.to_numpy(anchor_score), ops.to_numpy(scores)


def token_scores(ops, queries: list, keys: list, anchors: list, follow: int, decay: float, own=None) -> np.ndarray:
    """``unit="tokens"``'s score of every token of every piece, [S, Hkv, total tokens] float64 numpy,
    anchors -1: the softmax attention of the queries over every piece's tokens at once, summed over
    each KV head's query group (and the queries), carried forward within each piece.

    Per piece: ``queries`` [S, Hq, D] or [S, Hq, Q, D] numpy, ``keys`` at the selection layers
    [n, S, Hkv, D]. ``own``: (keys [S, Hkv, R, D], visible [Q, R]) rows beyond the pieces that the
    queries (then the same for every piece) attend to as well, where visible."""
    queries = [q[:, :, None] if q.ndim == 3 else q for q in queries]
    s_layers, hq, count, d = queries[0].shape
    hkv = keys[0].shape[2]
    logits = []
    for query, k in zip(queries, keys):
        grouped = ops.asarray(query.reshape(s_layers, hkv, hq // hkv, count, d).astype(np.float32), like=k)
        k = ops.float32(k).swapaxes(0, 1).swapaxes(1, 2)[:, :, None]  # [S, Hkv, 1, n, D]
        logits.append((grouped @ k.swapaxes(-1, -2)) * d**-0.5)  # [S, Hkv, G, Q, n]
    total = sum(k.shape[0] for k in keys)
    if own is not None:
        own_keys, visible = own
        extra = (grouped @ ops.float32(own_keys)[:, :, None].swapaxes(-1, -2)) * d**-0.5
        logits.append(ops.xp.where(ops.asarray(visible, like=extra), extra, float("-inf")))
    probs = ops.softmax(ops.concat(logits, axis=-1))[..., :total].sum(axis=2).sum(axis=2)
    probs = ops.to_numpy(probs).astype(np.float64)
    parts, start = [], 0
    for k, rows in zip(keys, anchors):
        part = probs[..., start : start + k.shape[0]].copy()
        part[..., rows] = 0.0  # kept anyway: their weight must not carry into the middle
        part = carry_forward(NumpyOps, part, follow - 1, decay)  # within the piece only
        part[..., rows] = -1.0
        parts.append(part)
        start += k.shape[0]
    return np.concatenate(parts, axis=-1)


def chosen_tokens(scores: np.ndarray, lengths: list, anchors: list, share: float) -> list:
    """Per piece, per selection layer: its anchors and, from every (layer, KV head) row of ``scores``
    ([S, Hkv, total], anchors -1), the top k tokens that fall in it; k the largest whose union over
    layers and heads keeps at most the share ``share`` of all tokens (equal scores: earlier first)."""
    offsets = np.cumsum([0, *lengths])
    order = np.argsort(-scores, axis=-1, kind="stable")

    def choose(k: int) -> list:
        chosen = [[] for _ in lengths]
        for layer in order[..., :k]:
            rows = np.unique(layer)
            cuts = np.searchsorted(rows, offsets)
            for i, per_layer in enumerate(chosen):
                per_layer.append(np.union1d(anchors[i], rows[cuts[i] : cuts[i + 1]] - offsets[i]).astype(np.int64))
        return chosen

    low, high = 0, int(offsets[-1]) - sum(len(a) for a in anchors)  # anchors sort last
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if kept_count(choose(middle)) <= share * offsets[-1] else (low, middle - 1)
    return choose(low)


def kept_rows(chosen: list) -> list:
    """Per piece, the rows kept: the union of its selection layers' rows."""
    return [np.unique(np.concatenate(per_layer)) for per_layer in chosen]


def kept_count(chosen: list) -> int:
    return sum(len(rows) for rows in kept_rows(chosen))


def chosen_rows(order, anchors, start: int, stop: int, block: int, keep: int) -> list:
    """Per selection layer: the anchors and the rows of the ``keep`` best blocks. ``order``: per
    layer, the block indices best first ([S, blocks]; see :func:`block_order`)."""
    within = np.arange(block)
    chosen = []
    for ranked in order:
        rows = (start + ranked[:keep, None] * block + within).ravel()
        chosen.append(np.union1d(anchors, rows[rows < stop]).astype(np.int64))
    return chosen


def block_order(block_score):
    """Block indices by descending score per layer; ties keep the earlier block."""
    return np.argsort(-block_score, axis=-1, kind="stable")


def retention_ratio(anchor_score: float, block_score) -> float:
    """The share of the block-score range above the anchors' score, clipped to [0, 1]."""
    high, low = float(block_score.max()), float(block_score.min())
    return float(np.clip((high - anchor_score) / (high - low + 1e-8), 0.0, 1.0))


METHODS = {m.name: m for m in (FullRecompute, Reuse, EPIC, CacheBlend, SamKV)}


def make_method(name: str) -> RagMethod:
    if name not in METHODS:
        raise SageKVError(f"unknown method {name!r} (choose from: {', '.join(METHODS)})")
    return METHODS[name]()


# ---------------------------------------------------------------------------------------------
# The entry point


@dataclass
class RagStats:
    """What answering cost: document tokens the cache keeps (of ``total_tokens``), the cache's
    bytes, time to first token from the question's arrival, and the time spent storing documents."""

    method: str
    kept_tokens: int
    total_tokens: int
    kv_bytes: int
    ttft_s: float
    store_s: float


def rag(model, documents, question: str, method=None, store=None, max_tokens: int = 64, policy=None, on_token=None,
        sampler=None):
    """Answer ``question`` over ``documents`` (strings); returns a Result with ``rag`` stats.

    ``method``: a RagMethod or its name (default SamKV); ``store``: a DocumentStore, or None to
    prefill the documents in memory; ``policy``: a sagekv policy applied to the cache for decoding;
    ``on_token`` and ``sampler``: as in :meth:`SageModel.generate` (streaming, early stop; sampling)."""
    method = SamKV() if method is None else make_method(method) if isinstance(method, str) else method
    if not isinstance(method, RagMethod):
        raise SageKVError(f"method must be a sagekv RAG method such as sagekv.SamKV(), got {method!r}")
    pieces_ids, question_ids = prompt_ids(model, documents, question, max_tokens)
    return rag_ids(model, pieces_ids, question_ids, method, store, max_tokens, policy, on_token, sampler)


def prompt_ids(model, documents, question: str, max_tokens: int) -> tuple:
    """Token ids of the stored pieces (the preamble, then each document) and of the question, once they
    are known to fit in the model's context with ``max_tokens`` generated (a caller can check its input
    before it opens a store)."""
    if isinstance(documents, str) or not isinstance(documents, (list, tuple)) or not documents:
        raise SageKVError("no documents given")
    if any(not isinstance(d, str) or not d.strip() for d in documents):
        raise SageKVError("a document is empty")
    if not isinstance(question, str) or not question.strip():
        raise SageKVError("the question is empty")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise SageKVError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    pieces_ids = [ids for ids in [model.preamble_ids()] + [model.encode_plain(d) for d in documents] if ids]
    question_ids = model.encode_plain(question)
    model.check_length(sum(len(ids) for ids in pieces_ids) + len(question_ids) + max_tokens)
    return pieces_ids, question_ids


def rag_ids(model, pieces_ids: list, question_ids: list, method, store=None, max_tokens: int = 64, policy=None,
            on_token=None, sampler=None):
    """:func:`rag` on token ids from :func:`prompt_ids`."""
    total = sum(len(ids) for ids in pieces_ids)
    store = MemoryStore(model.store_id) if store is None else store
    run = model.runner
    with run.inference():
        start = time.perf_counter()
        pieces = stored_pieces(model, store, pieces_ids)
        run.sync()
        store_s = time.perf_counter() - start
        start = time.perf_counter()
        cache, logits, kept = method.prefill(model, pieces, question_ids)
        run.sync()
        ttft = time.perf_counter() - start
    from .generate import Prefilled

    prefilled = Prefilled(cache, logits, total + len(question_ids), run.kv_bytes(cache), ttft)
    result = model.decode(prefilled, policy, max_tokens, keep_prefill=False, on_token=on_token, sampler=sampler)
    result.rag = RagStats(method.name, kept, total, result.stats.kept_kv_bytes, ttft, store_s)
    return result
