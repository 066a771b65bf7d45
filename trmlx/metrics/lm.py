"""Language-model perplexity from per-example summed negative log-likelihoods.

Averaging per-example perplexities over-weights short examples; this pools tokens: mean NLL is
sum(nll) / sum(tokens) and perplexity is exp(mean NLL).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def perplexity(pairs: Iterable[tuple[float, int]]) -> dict[str, float]:
    """Token-weighted mean NLL (nats/token) and perplexity from (sum_nll, n_tokens) pairs.

    Returns {"nll": mean NLL, "perplexity": exp(mean NLL) (inf if it overflows), "tokens": total tokens}.
    """
    total_nll = 0.0
    total_tokens = 0
    for i, (nll, n_tokens) in enumerate(pairs):
        if isinstance(n_tokens, bool) or int(n_tokens) != n_tokens or n_tokens < 0:
            raise ValueError(f"example {i}: n_tokens must be a non-negative integer, got {n_tokens!r}")
        if not math.isfinite(nll) or nll < 0:
            raise ValueError(f"example {i}: sum_nll must be a finite non-negative number, got {nll!r}")
        if n_tokens == 0 and nll != 0:
            raise ValueError(f"example {i}: sum_nll is {nll} over 0 tokens")
        total_nll += float(nll)
        total_tokens += int(n_tokens)
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one scored token")
    mean = total_nll / total_tokens
    try:
        ppl = math.exp(mean)
    except OverflowError:
        ppl = math.inf
    return {"nll": mean, "perplexity": ppl, "tokens": float(total_tokens)}
