"""Multi-similarity loss on a similarity matrix (Wang et al., CVPR 2019).

It lives in ``modeling/`` (not only in ``training/losses.py``, which wraps it) because
:class:`CrossMetricForMetricLearning` computes a loss when given labels, and ``modeling/`` may import only torch,
timm and transformers so that it stays valid Hub remote code.
"""

from __future__ import annotations

import torch


def multi_similarity_loss(
    similarities: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    margin: float | None = 0.1,
    query_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-similarity loss of a Q×N similarity matrix.

    Row q is an anchor; its positives are the columns with the same label (itself excluded when the matrix is
    square and ``query_labels`` is not given), its negatives the others. Per anchor:
    ``1/alpha · log(1 + Σ_pos exp(-alpha (S - base))) + 1/beta · log(1 + Σ_neg exp(beta (S - base)))``,
    averaged over anchors (as pytorch-metric-learning's ``MultiSimilarityLoss``).

    Args:
        similarities: Q×N similarities (cosine of normalised embeddings, or the head's conditional ones).
        labels: N column labels (and row labels too when ``query_labels`` is None).
        alpha, beta, base: the positive scale, negative scale and similarity offset (Revisiting-DML: 2, 40, 0.5).
        margin: the paper's pair mining: keep negatives with ``S + margin > min S_pos`` and positives with
            ``S - margin < max S_neg``; ``None`` uses every pair.
        query_labels: Q row labels, when the rows are a different set than the columns (e.g. gathered columns).
    """
    square_self = query_labels is None
    row_labels = labels if query_labels is None else query_labels
    positive = row_labels[:, None] == labels[None, :]
    if square_self:
        positive = positive & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        negative = ~positive & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    else:
        negative = row_labels[:, None] != labels[None, :]
    if margin is not None:
        positive, negative = _mine_pairs(similarities.detach(), positive, negative, margin)
    pos_term = _log1p_sum_exp(-alpha * (similarities - base), positive) / alpha
    neg_term = _log1p_sum_exp(beta * (similarities - base), negative) / beta
    return (pos_term + neg_term).mean()


def _mine_pairs(
    similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The informative pairs of the MS paper: hard negatives and hard positives relative to each anchor."""
    inf = torch.finfo(similarities.dtype).max
    min_positive = similarities.masked_fill(~positive, inf).amin(dim=1, keepdim=True)
    max_negative = similarities.masked_fill(~negative, -inf).amax(dim=1, keepdim=True)
    return positive & (similarities - margin < max_negative), negative & (similarities + margin > min_positive)


def _log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(values))`` per row, stable; 0 for rows with no selected entry."""
    masked = values.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(values.shape[0], 1, dtype=values.dtype, device=values.device)
    return torch.logsumexp(torch.cat([masked, zeros], dim=1), dim=1)
