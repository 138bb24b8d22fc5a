"""Pair losses on a similarity matrix: multi-similarity, contrastive and circle loss.

They take similarities, not embeddings, so one module serves both parts of the Cross-Image-Attention objective
(docs/design.md §1): the unconditional similarities ``E_local @ E_all.T`` (Q×N, rows a slice of the columns when the
columns are all-gathered across processes) and the head's conditional similarities ``S^l`` (B×B, which are no inner
products of any embedding, so an embedding-based loss could not take them).

Which column is a row's own item is given by index (``query_index``), never by value, as the benchmark protocol asks:
see :func:`crossmetric.modeling.multi_similarity.pair_masks`.
"""

from __future__ import annotations

import torch
from torch import nn

from ...modeling.multi_similarity import masked_multi_similarity_loss, pair_masks


class PairLoss(nn.Module):
    """Base class: a loss of a Q×N similarity matrix and labels, averaged into a scalar.

    ``forward(similarities, labels, query_labels=None, query_index=None)`` builds the positive and negative pair masks
    once, with :func:`~crossmetric.modeling.multi_similarity.pair_masks`, and hands them to :meth:`compute_loss`, the
    only method a pair loss implements (as pytorch-metric-learning's ``GenericPairLoss`` with its ``_compute_loss``).
    So every pair loss excludes self pairs, and checks shapes, in the same way.

    - ``similarities`` (Q×N): cosine similarities (or the head's conditional similarities), higher = more alike;
    - ``labels`` (N): the column labels (and the row labels when the matrix is square);
    - ``query_labels`` (Q, optional): row labels when the rows are other items than the columns;
    - ``query_index`` (Q, optional): column index of each row's own item, e.g. ``rank * B + arange(B)`` for a
      process's rows against embeddings gathered over processes; that self pair is excluded. Without it a square
      matrix excludes its diagonal.
    """

    def forward(
        self,
        similarities: torch.Tensor,
        labels: torch.Tensor,
        query_labels: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        positive, negative = pair_masks(similarities, labels, query_labels, query_index)
        return self.compute_loss(similarities, positive, negative)

    def compute_loss(self, similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a Q×N similarity matrix given its Q×N boolean positive and negative pair masks.

        Entries in neither mask (self pairs) may hold anything, NaN included: an implementation must keep them out of
        the loss and its gradient.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement compute_loss(similarities, positive, negative)"
        )


class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss: weighs each pair by its own similarity and by its relation to the anchor's other pairs.

    Per anchor, ``1/alpha · log(1 + Σ_pos exp(-alpha (S - base))) + 1/beta · log(1 + Σ_neg exp(beta (S - base)))``
    over the pairs kept by the paper's mining (hard negatives ``S_neg + margin > min S_pos``, hard positives
    ``S_pos - margin < max S_neg``), averaged over all anchors. It wraps
    :func:`crossmetric.modeling.multi_similarity.masked_multi_similarity_loss`, the function the model itself uses.

    Args:
        alpha: scale of the positive term (Revisiting-DML: 2).
        beta: scale of the negative term (Revisiting-DML: 40; pytorch-metric-learning's default is 50).
        base: similarity offset lambda of the paper (0.5).
        margin: epsilon of the paper's pair mining (0.1); ``None`` keeps every pair, which is exactly
            pytorch-metric-learning's ``MultiSimilarityLoss`` without a miner.

    References:
        - Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning", CVPR 2019:
          https://arxiv.org/abs/1904.06627
        - Roth et al., "Revisiting Training Strategies and Generalization Performance in Deep Metric Learning",
          ICML 2020 (the hyperparameters above): https://arxiv.org/abs/2002.08473

    Recommendations:
        - The default base and CIA pair loss of this package: strong on CUB200, Cars196 and SOP without tuning.
        - Needs positives in every batch: use :class:`~crossmetric.data.sampler.ClassBalancedBatchSampler`
          (P×K, e.g. K = 2 to 4 images per class). An anchor without a positive adds 0 under mining.
        - Works on the head's conditional similarities as-is (they are cosines in [-1, 1]).

    Example::

        loss_fn = MultiSimilarityLoss()
        loss = loss_fn(embeddings @ embeddings.T, labels)
    """

    def __init__(self, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5, margin: float | None = 0.1):
        super().__init__()
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"MultiSimilarityLoss: alpha={alpha} and beta={beta} must be > 0")
        if margin is not None and margin < 0:
            raise ValueError(f"MultiSimilarityLoss: margin={margin} must be >= 0, or None to keep every pair")
        self.alpha, self.beta, self.base, self.margin = alpha, beta, base, margin

    def compute_loss(self, similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return masked_multi_similarity_loss(
            similarities, positive, negative, alpha=self.alpha, beta=self.beta, base=self.base, margin=self.margin
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}, margin={self.margin}"


class ContrastiveLoss(PairLoss):
    """Contrastive loss on similarities: pulls positives above ``pos_margin``, pushes negatives below ``neg_margin``.

    Per positive pair ``relu(pos_margin - S)``, per negative pair ``relu(S - neg_margin)``; each of the two is averaged
    over its pairs with a non-zero loss and the two averages are added. This is pytorch-metric-learning's
    ``ContrastiveLoss(pos_margin, neg_margin, distance=CosineSimilarity())`` with its ``AvgNonZeroReducer``.

    Args:
        pos_margin: positives with similarity below it are pulled up (1.0: pull until identical).
        neg_margin: negatives with similarity above it are pushed down. 0.5 is the similarity at Euclidean distance 1
            on the unit sphere (``d² = 2 - 2 S``), the negative margin of Hadsell et al.'s form as used by
            Roth et al. on normalised embeddings.

    References:
        - Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006:
          https://doi.org/10.1109/CVPR.2006.100
        - Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020 (contrastive loss, well tuned, is
          competitive with later losses): https://arxiv.org/abs/2003.08505

    Recommendations:
        - A simple, well-understood baseline; tune ``neg_margin`` (0.3 to 0.7) per dataset.
        - Use the P×K :class:`~crossmetric.data.sampler.ClassBalancedBatchSampler` so that every batch has
          positive pairs. Averaging over non-zero pairs only keeps the loss from vanishing once most pairs are easy.
        - The average is over the whole matrix, so with rows split across processes the per-process losses do not
          average to the single-process loss exactly (multi-similarity and circle loss, per-anchor means, do).
    """

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.5):
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def compute_loss(self, similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        pos_losses = torch.relu(self.pos_margin - similarities).masked_fill(~positive, 0.0)
        neg_losses = torch.relu(similarities - self.neg_margin).masked_fill(~negative, 0.0)
        return _mean_of_nonzero(pos_losses) + _mean_of_nonzero(neg_losses)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


class CircleLoss(PairLoss):
    """Circle loss: re-weights every pair by how far it is from its optimum, so each similarity learns at its own pace.

    Per anchor, ``softplus(logsumexp_neg(gamma a_n (S_n - m)) + logsumexp_pos(-gamma a_p (S_p - 1 + m)))`` with the
    detached weights ``a_p = relu(1 + m - S_p)`` and ``a_n = relu(S_n + m)``; averaged over the anchors that have at
    least one positive and one negative. This is pytorch-metric-learning's ``CircleLoss(m, gamma)``.

    Args:
        m: relaxation margin (0.4 for fine-grained image retrieval in the paper; 0.25 for faces and re-id).
        gamma: scale (80 for fine-grained retrieval; 128 to 256 for re-id and faces).

    References:
        - Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization", CVPR 2020:
          https://arxiv.org/abs/2002.10857

    Recommendations:
        - An alternative to multi-similarity when pairs are imbalanced (few positives, many negatives); no mining.
        - Use the P×K :class:`~crossmetric.data.sampler.ClassBalancedBatchSampler` (K >= 2); anchors without a
          positive or without a negative are left out of the average.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"CircleLoss: gamma={gamma} must be > 0")
        self.m, self.gamma = m, gamma

    def compute_loss(self, similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        # Entries that are no pair (e.g. the head's diagonal) are zeroed first: the products below would turn a
        # NaN there into a NaN gradient even where the result is masked out.
        similarities = similarities.masked_fill(~(positive | negative), 0.0)
        detached = similarities.detach()
        pos_logits = -self.gamma * torch.relu(1 + self.m - detached) * (similarities - (1 - self.m))
        neg_logits = self.gamma * torch.relu(detached + self.m) * (similarities - self.m)
        has_pos, has_neg = positive.any(dim=1), negative.any(dim=1)
        valid = has_pos & has_neg
        # Masked entries get the dtype's lowest finite value, not -inf: a row with no entry then has a finite
        # logsumexp and finite (zero) gradients, where -inf would give NaN gradients through logsumexp.
        lowest = torch.finfo(similarities.dtype).min
        lse_pos = torch.logsumexp(pos_logits.masked_fill(~positive, lowest), dim=1).masked_fill(~valid, 0.0)
        lse_neg = torch.logsumexp(neg_logits.masked_fill(~negative, lowest), dim=1).masked_fill(~valid, 0.0)
        losses = nn.functional.softplus(lse_pos + lse_neg).masked_fill(~valid, 0.0)
        return losses.sum() / valid.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"


def _mean_of_nonzero(losses: torch.Tensor) -> torch.Tensor:
    """Mean of the strictly positive entries (pytorch-metric-learning's AvgNonZeroReducer); 0, still differentiable,
    when there is none. No ``.item()`` or boolean indexing, so no device synchronisation."""
    return losses.sum() / (losses > 0).sum().clamp(min=1)
