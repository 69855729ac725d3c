"""ONNX handlers of text and classical-ML ops on numbers: TfIdfVectorizer (integer pools) and the
ai.onnx.ml Binarizer and ArrayFeatureExtractor (ONNX's reference semantics)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..common import reshape
from .common import _slice_axis, handler

ML = "ai.onnx.ml"


@handler("TfIdfVectorizer")
def _tfidf_vectorizer(n, x):
    """Counts of the pool's n-grams in each row of x ([C] or [B, C]), as ONNX's reference counts them:
    an n-gram of length g in [min_gram_length, max_gram_length] matches the tokens x[i], x[i + d],
    ..., x[i + (g - 1) d] for every skip distance d in 1..max_skip_count + 1 (unigrams at d = 1
    only); then TF (the counts), IDF (weight, or 1, where the count is nonzero) or TFIDF
    (count x weight). Each (g, d) is one comparison of strided slices with the pool's n-grams."""
    pool = n.attr("pool_int64s")
    if pool is None or x.dtype not in (torch.int32, torch.int64) or len(x.shape) not in (1, 2):
        n.unsupported(f"a {x.dtype} input of rank {len(x.shape)} (an integer pool and [C] or [B, C] integer input only)")
    lo, hi, skips = n.attr("min_gram_length"), n.attr("max_gram_length"), n.attr("max_skip_count")
    starts, indexes = list(n.attr("ngram_counts")), list(n.attr("ngram_indexes"))
    mode, weights = n.attr("mode"), n.attr("weights")
    out_size = max(indexes) + 1
    rows = reshape(n, x, (1, x.shape[0])) if len(x.shape) == 1 else x
    b, c = rows.shape
    total = None
    k = 0   # the number of the pool's first n-gram of the current length
    for g, start in enumerate(starts, 1):
        end = starts[g] if g < len(starts) else len(pool)
        count = (end - start) // g   # as ONNX's reference: whole n-grams only
        grams = np.array(pool[start:start + count * g], dtype=np.int64).reshape(count, g)
        if lo <= g <= hi and len(grams):
            place = np.zeros((len(grams), out_size), np.float32)   # n-gram -> its output column
            place[np.arange(len(grams)), [indexes[k + i] for i in range(len(grams))]] = 1
            counts = None
            for d in range(1, (1 if g == 1 else skips + 1) + 1):
                width = c - (g - 1) * d
                if width <= 0:
                    break
                hit = None
                for j in range(g):
                    tok = reshape(n, _slice_axis(n, rows, 1, j * d, j * d + width, 1), (b, width, 1))
                    eq = n.add("eq", tok, n.const(torch.from_numpy(grams[:, j]).to(x.dtype)))
                    hit = eq if hit is None else n.add("logical_and", hit, eq)
                per = n.add("reduce_sum", n.add("cast", hit, dtype=torch.float32), axes=[1])   # [B, grams]
                counts = per if counts is None else n.add("add", counts, per)
            if counts is not None:
                y = n.add("matmul", counts, n.const(torch.from_numpy(place)))
                total = y if total is None else n.add("add", total, y)
        k += len(grams)
    if total is None:
        total = n.const(torch.zeros(b, out_size))
    w = n.const(torch.tensor(weights, dtype=torch.float32)) if weights else None
    if mode == "IDF":
        total = n.add("where", n.add("gt", total, n.const(0.0)), w if w is not None else n.const(1.0), n.const(0.0))
    elif mode == "TFIDF" and w is not None:
        total = n.add("mul", total, w)
    elif mode not in ("TF", "TFIDF"):
        n.fail(f"mode {mode!r}")
    return reshape(n, total, (out_size,)) if len(x.shape) == 1 else total


@handler((ML, "Binarizer"))
def _binarizer(n, x):
    return n.add("cast", n.add("gt", x, n.const(n.attr("threshold", 0.0), dtype=x.dtype)), dtype=x.dtype)


@handler((ML, "ArrayFeatureExtractor"))
def _array_feature_extractor(n, x, indices):
    """x[..., indices] with the indices flattened; a 1-d x gives one row."""
    k = math.prod(indices.shape)
    y = n.add("gather", x, reshape(n, indices, (k,)), axis=len(x.shape) - 1)
    return reshape(n, y, (1, k)) if len(x.shape) == 1 else y
