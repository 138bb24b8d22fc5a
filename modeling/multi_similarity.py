"""Multi-similarity loss on a similarity matrix (Wang et al., CVPR 2019), and the pair masks of such a matrix.

It lives in ``modeling/`` (not only in ``training/pair_losses.py``, which wraps it) because
:class:`CrossMetricForMetricLearning` computes a loss when given labels, and ``modeling/`` may import only torch,
timm and transformers so that it stays valid Hub remote code.
"""

from __future__ import annotations

import torch


def pair_masks(
    similarities: torch.Tensor,
    labels: torch.Tensor,
    query_labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative pair masks (both Q×N booleans) of a Q×N similarity matrix, self pairs excluded by index.

    Which column is a row's own item (never a pair):

    - neither ``query_labels`` nor ``query_index``: the matrix is square over one set of items, self = the diagonal;
    - ``query_index`` (Q column indices): row q is the item in column ``query_index[q]``, e.g. a process's rows against
      embeddings all-gathered over processes; the row labels default to ``labels[query_index]``;
    - only ``query_labels``: the rows are other items than the columns (a memory bank, a query set): no self pair.

    Raises:
        ValueError: on shapes that do not fit together, naming the argument to fix.
    """
    if similarities.dim() != 2:
        raise ValueError(f"similarities must be a Q×N matrix, got shape {tuple(similarities.shape)}")
    num_rows, num_columns = similarities.shape
    if labels.dim() != 1 or labels.shape[0] != num_columns:
        raise ValueError(f"labels must hold one label per column: shape ({num_columns},), got {tuple(labels.shape)}")
    if query_index is not None:
        if query_index.dim() != 1 or query_index.shape[0] != num_rows:
            raise ValueError(
                f"query_index must hold each row's own column: shape ({num_rows},), got {tuple(query_index.shape)}"
            )
        query_index = query_index.to(device=labels.device, dtype=torch.long)
        if query_labels is None:
            query_labels = labels[query_index]
    if query_labels is not None and (query_labels.dim() != 1 or query_labels.shape[0] != num_rows):
        raise ValueError(
            f"query_labels must hold one label per row: shape ({num_rows},), got {tuple(query_labels.shape)}"
        )
    if query_labels is None and num_rows != num_columns:
        raise ValueError(
            f"similarities is {num_rows}×{num_columns} (rows are not the columns): pass query_index (each row's own "
            "column, to exclude self pairs) or query_labels (rows that are other items than the columns)"
        )
    row_labels = labels if query_labels is None else query_labels
    same = row_labels[:, None] == labels[None, :]
    if query_labels is None:
        is_self = torch.eye(num_rows, dtype=torch.bool, device=labels.device)
    elif query_index is not None:
        is_self = torch.zeros(num_rows, num_columns, dtype=torch.bool, device=labels.device)
        is_self.scatter_(1, query_index[:, None], True)
    else:
        return same, ~same
    return same & ~is_self, ~same & ~is_self


def multi_similarity_loss(
    similarities: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    margin: float | None = 0.1,
    query_labels: torch.Tensor | None = None,
    query_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-similarity loss of a Q×N similarity matrix.

    Row q is an anchor; its positives are the columns with the same label (its own column excluded, see
    :func:`pair_masks`), its negatives the others. Per anchor:
    ``1/alpha · log(1 + Σ_pos exp(-alpha (S - base))) + 1/beta · log(1 + Σ_neg exp(beta (S - base)))``,
    averaged over all anchors (as pytorch-metric-learning's ``MultiSimilarityLoss``; an anchor with no selected pair
    adds 0).

    Args:
        similarities: Q×N similarities (cosine of normalised embeddings, or the head's conditional ones).
        labels: N column labels (and row labels too when ``query_labels`` is None).
        alpha, beta, base: the positive scale, negative scale and similarity offset (Revisiting-DML: 2, 40, 0.5).
        margin: the paper's pair mining: keep negatives with ``S + margin > min S_pos`` and positives with
            ``S - margin < max S_neg``; ``None`` uses every pair. With mining, an anchor without positives (or
            without negatives) keeps no pair at all.
        query_labels: Q row labels, when the rows are a different set than the columns (e.g. gathered columns).
        query_index: Q column indices, the column of each row's own item (excluded from its pairs).
    """
    positive, negative = pair_masks(similarities, labels, query_labels, query_index)
    return masked_multi_similarity_loss(
        similarities, positive, negative, alpha=alpha, beta=beta, base=base, margin=margin
    )


def masked_multi_similarity_loss(
    similarities: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    base: float,
    margin: float | None,
) -> torch.Tensor:
    """Multi-similarity loss of a Q×N similarity matrix whose pair masks are already built (see :func:`pair_masks`).

    The part of :func:`multi_similarity_loss` after the masks, so that
    ``crossmetric.training.losses.pair_losses.PairLoss`` can build the masks once for every pair loss and hand them
    here. Arguments as in :func:`multi_similarity_loss` (whose defaults are the paper's), but all required;
    ``positive`` and ``negative`` are Q×N booleans.
    """
    if margin is not None:
        positive, negative = _mine_pairs(similarities.detach(), positive, negative, margin)
    pos_term = log1p_sum_exp(-alpha * (similarities - base), positive, dim=1) / alpha
    neg_term = log1p_sum_exp(beta * (similarities - base), negative, dim=1) / beta
    return (pos_term + neg_term).mean()


def _mine_pairs(
    similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The informative pairs of the MS paper: hard negatives and hard positives relative to each anchor."""
    inf = torch.finfo(similarities.dtype).max
    min_positive = similarities.masked_fill(~positive, inf).amin(dim=1, keepdim=True)
    max_negative = similarities.masked_fill(~negative, -inf).amax(dim=1, keepdim=True)
    return positive & (similarities - margin < max_negative), negative & (similarities + margin > min_positive)


def log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``log(1 + Σ_{mask} exp(values))`` along ``dim`` of a 2-D tensor, stable; 0 where nothing is selected.

    The ``1 +`` is a zero logit appended along ``dim``. Shared by the multi-similarity loss (per row) and
    ``crossmetric.training.losses.proxy_losses`` (per proxy column), which have the same soft-plus-of-a-sum form.
    """
    masked = values.masked_fill(~mask, float("-inf"))
    shape = list(values.shape)
    shape[dim] = 1
    zeros = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return torch.logsumexp(torch.cat([masked, zeros], dim=dim), dim=dim)
