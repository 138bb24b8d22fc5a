"""Proxy losses on embeddings: proxy-anchor and normalised softmax, each with a learned ``proxies`` parameter.

The proxies (one per training class, C×D) belong to the loss module, not to the model: the trainer gives them their
own learning rate (a parameter group from ``loss.parameters()``), saves them in training checkpoints with the loss
module's ``state_dict``, and never exports them (test classes are other classes, so proxies are useless there).
"""

from __future__ import annotations

import torch
from torch import nn

from ...modeling.multi_similarity import log1p_sum_exp


class ProxyLoss(nn.Module):
    """Base class: a loss of (B×D embeddings, B labels in ``0..num_classes-1``) against learned class proxies.

    Args:
        num_classes: number of training classes C; labels must be remapped to ``0..C-1``.
        embedding_dim: embedding size D.
    """

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        if num_classes < 1 or embedding_dim < 1:
            raise ValueError(
                f"{type(self).__name__}: num_classes={num_classes} and embedding_dim={embedding_dim} must be >= 1 "
                "(num_classes = number of training classes)"
            )
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim))

    def check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Clear errors for inputs that would otherwise fail deep inside (or, on a GPU, as a device-side assert)."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"{type(self).__name__}: embeddings must be B×{self.embedding_dim} (embedding_dim), "
                f"got shape {tuple(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"labels must hold one label per embedding: shape ({embeddings.shape[0]},)")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"{type(self).__name__}: labels must lie in 0..{self.num_classes - 1} (num_classes={self.num_classes}),"
                f" got {int(labels.min())}..{int(labels.max())}: remap the training labels to contiguous class indices"
                " or build the loss with the number of training classes"
            )

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """B×C cosine similarities between the embeddings and the proxies."""
        proxies = nn.functional.normalize(self.proxies, dim=1).to(embeddings.dtype)
        return nn.functional.normalize(embeddings, dim=1) @ proxies.T

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}"


class ProxyAnchorLoss(ProxyLoss):
    """Proxy-anchor loss: each class proxy is an anchor that pulls its batch samples close and pushes the others away.

    ``1/|P+| Σ_{p ∈ P+} log(1 + Σ_{x ∈ X_p+} exp(-alpha (cos(x, p) - margin)))
    + 1/|P| Σ_{p ∈ P} log(1 + Σ_{x ∈ X_p-} exp(alpha (cos(x, p) + margin)))``, where P+ are the proxies with a
    sample in the batch. Because every sample of the batch enters every proxy's log-sum-exp, the gradient of one
    sample depends on the others (data-to-data relations) while training converges as fast as a proxy loss.
    Equals pytorch-metric-learning's ``ProxyAnchorLoss`` (whose proxies are also ``proxies``, C×D).

    Args:
        num_classes: number of training classes C (labels in ``0..C-1``).
        embedding_dim: embedding size D.
        margin: delta of the paper (0.1).
        alpha: scale (32).

    References:
        - Kim, Kim, Cho and Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020:
          https://arxiv.org/abs/2003.13911

    Recommendations:
        - Fast convergence and strong results on CUB200, Cars196, SOP, In-Shop; no sampler needed (random batches
          work), but the P×K :class:`~crossmetric.data.sampler.ClassBalancedBatchSampler` is fine too.
        - Give the proxies a much larger learning rate than the network (the paper: 100×; ``--loss_learning_rate``).
        - Proxies are initialised as in the paper (Kaiming normal, fan-out).
    """

    def __init__(self, num_classes: int, embedding_dim: int, margin: float = 0.1, alpha: float = 32.0):
        super().__init__(num_classes, embedding_dim)
        self.margin, self.alpha = margin, alpha
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(embeddings, labels)
        cos = self.cosines(embeddings)
        positive = nn.functional.one_hot(labels, self.num_classes).bool()
        pos_term = log1p_sum_exp(-self.alpha * (cos - self.margin), positive, dim=0)
        neg_term = log1p_sum_exp(self.alpha * (cos + self.margin), ~positive, dim=0)
        proxies_with_positives = positive.any(dim=0).sum().clamp(min=1)
        return pos_term.sum() / proxies_with_positives + neg_term.sum() / self.num_classes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, margin={self.margin}, alpha={self.alpha}"


class NormalizedSoftmaxLoss(ProxyLoss):
    """Normalised softmax: cross-entropy of the cosines between an embedding and all class proxies, over a temperature.

    ``CE(cos(x, P) / temperature, y)``, averaged over the batch: classification with a cosine classifier, whose
    normalised weights are the proxies. Equals pytorch-metric-learning's ``NormalizedSoftmaxLoss`` with its weight
    ``W`` (D×C) set to ``proxies.T``.

    Args:
        num_classes: number of training classes C (labels in ``0..C-1``).
        embedding_dim: embedding size D.
        temperature: softmax temperature (0.05, as the paper).

    References:
        - Zhai and Wu, "Classification is a Strong Baseline for Deep Metric Learning", BMVC 2019:
          https://arxiv.org/abs/1811.12649

    Recommendations:
        - A strong, simple baseline, especially with many classes (SOP, In-Shop); random batches suffice, no P×K
          sampler needed, and large batches are not required.
        - Give the proxies a larger learning rate than the network (``--loss_learning_rate``).
    """

    def __init__(self, num_classes: int, embedding_dim: int, temperature: float = 0.05):
        super().__init__(num_classes, embedding_dim)
        if temperature <= 0:
            raise ValueError(f"NormalizedSoftmaxLoss: temperature={temperature} must be > 0")
        self.temperature = temperature
        nn.init.normal_(self.proxies)  # only the direction matters: the proxies are normalised

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_inputs(embeddings, labels)
        return nn.functional.cross_entropy(self.cosines(embeddings) / self.temperature, labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"
