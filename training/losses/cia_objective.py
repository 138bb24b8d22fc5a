"""The training objective of Cross-Image-Attention (docs/design.md §1): a base loss plus weighted per-level pair losses.

``L = L_base(unconditional embeddings) + λ · Σ_l w_l · L_pair(S^l)``. With the head off (no conditional
similarities, or λ = 0) it is the plain DML baseline through the same code, so the benchmark's CIA-vs-baseline
comparison differs in nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .head_distillation import HeadDistillationLoss
from .pair_losses import MultiSimilarityLoss, PairLoss
from .proxy_losses import ProxyLoss


@dataclass
class ObjectiveOutput:
    """What :class:`CrossImageAttentionObjective` returns.

    Attributes:
        loss: the scalar to backpropagate.
        base_loss: the base loss on the unconditional embeddings.
        level_losses: the pair loss of each head level, unweighted (detached where λ · w_l = 0); for logging.
        distill_loss: the transfer term from the head to the embedding, unweighted; None when it is off.
    """

    loss: torch.Tensor
    base_loss: torch.Tensor
    level_losses: list[torch.Tensor] = field(default_factory=list)
    distill_loss: torch.Tensor | None = None


class CrossImageAttentionObjective(nn.Module):
    """Base loss on the unconditional embeddings plus ``λ · Σ_l w_l ·`` a pair loss on each level's conditional
    similarities.

    Args:
        base_loss: a :class:`~crossmetric.training.losses.pair_losses.PairLoss` (applied to
            ``embeddings @ columns.T``) or a
            :class:`~crossmetric.training.losses.proxy_losses.ProxyLoss` (applied to the embeddings).
        pair_loss: the pair loss of the conditional similarities; ``None`` reuses ``base_loss`` when it is a pair loss
            and otherwise takes :class:`~crossmetric.training.losses.pair_losses.MultiSimilarityLoss` with its defaults.
        loss_weight: λ (``CrossMetricConfig.cia_loss_weight``); 0 makes the objective the baseline's.
        level_weights: w_l per level (``CrossMetricConfig.level_weights``); ``None`` weighs every level 1. Its
            length must match the number of levels the head gives, unless it gives none (head off).
        distillation: a :class:`~crossmetric.training.losses.head_distillation.HeadDistillationLoss` that pulls the
            unconditional similarities toward one level's detached conditional ones (the transfer), or None.
        distill_weight: its weight; 0 (or no distillation) leaves the objective exactly as without it.
        distill_level: which level teaches (an index into the levels; -1: the last).
        distill_warmup_steps: the transfer's weight rises linearly from 0 over these steps (the head starts random).

    The proxies of a proxy base loss are parameters of this module (``objective.parameters()``, its
    ``state_dict``), so the trainer can give them their own learning rate and checkpoint them; they are never part
    of the exported model.

    Multi-process training: the trainer all-gathers embeddings and labels (with gradient) and passes them as
    ``gathered_embeddings`` / ``gathered_labels``, with ``query_index`` = the columns of this process's rows
    (``rank * B + arange(B)``). A pair base loss then compares the local rows with all columns, so the per-process
    losses average to the loss of the whole batch (for per-anchor means such as multi-similarity); a proxy base loss
    takes all gathered rows, so every process computes the same value and gives the proxies the same gradient
    (they stay in sync without wrapping the loss in DDP). The conditional similarities are always local (pairs stay
    within one device's batch) and use the local labels.

    References:
        - Kotovenko, Ma, Milbich and Ommer, "Cross-Image-Attention for Conditional Embeddings in Deep Metric
          Learning", CVPR 2023: https://openaccess.thecvf.com/content/CVPR2023/html/Kotovenko_Cross-Image-Attention_for_Conditional_Embeddings_in_Deep_Metric_Learning_CVPR_2023_paper.html

    Recommendations:
        - Multi-similarity for both the base and the pair loss, P×K batches (K >= 2) from
          :class:`~crossmetric.training.data.sampler.ClassBalancedBatchSampler`: the conditional losses need positive
          pairs inside each device's batch.
        - Ablate λ and w_l (e.g. only the last level) with the head kept; λ = 0 is the baseline.
    """

    def __init__(
        self,
        base_loss: nn.Module,
        pair_loss: nn.Module | None = None,
        loss_weight: float = 1.0,
        level_weights: Sequence[float] | None = None,
        distillation: HeadDistillationLoss | None = None,
        distill_weight: float = 0.0,
        distill_level: int = -1,
        distill_warmup_steps: int = 0,
    ):
        super().__init__()
        if not isinstance(base_loss, (PairLoss, ProxyLoss)):
            raise TypeError(
                f"base_loss must be a PairLoss or a ProxyLoss (see crossmetric.training.losses.registry.LOSSES), "
                f"got {type(base_loss).__name__}"
            )
        if pair_loss is None:
            pair_loss = base_loss if isinstance(base_loss, PairLoss) else MultiSimilarityLoss()
        if not isinstance(pair_loss, PairLoss):
            raise TypeError(
                f"pair_loss must be a PairLoss (it takes similarity matrices), got {type(pair_loss).__name__}: "
                "pick one of multi_similarity, contrastive, circle"
            )
        if loss_weight < 0:
            raise ValueError(f"loss_weight (lambda) = {loss_weight} must be >= 0")
        if level_weights is not None and any(w < 0 for w in level_weights):
            raise ValueError(f"level_weights = {list(level_weights)} must all be >= 0")
        self.base_loss = base_loss
        self.pair_loss = pair_loss
        self.loss_weight = float(loss_weight)
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]
        if distill_weight < 0 or distill_warmup_steps < 0:
            raise ValueError(
                f"distill_weight {distill_weight} and distill_warmup_steps {distill_warmup_steps} must be >= 0"
            )
        self.distillation = distillation if distill_weight > 0 else None
        self.distill_weight = float(distill_weight)
        self.distill_level = int(distill_level)
        self.distill_warmup_steps = int(distill_warmup_steps)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        conditional_similarities: Sequence[torch.Tensor] = (),
        *,
        gathered_embeddings: torch.Tensor | None = None,
        gathered_labels: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        step: int | None = None,
    ) -> ObjectiveOutput:
        """Compute the objective.

        Args:
            embeddings: B×D unconditional embeddings of this process (L2-normalised).
            labels: B labels of this process's batch.
            conditional_similarities: one B×B matrix per head level (``outputs.conditional_similarities``); empty
                when the head is off.
            gathered_embeddings: N×D embeddings of all processes (with gradient), or None on one process.
            gathered_labels: N labels of all processes; required with ``gathered_embeddings``.
            query_index: B column indices of this process's rows in the gathered embeddings; required with
                ``gathered_embeddings`` for a pair base loss.
            step: the optimizer step, for the transfer's warm-up (None: past it).
        """
        if gathered_embeddings is not None and gathered_labels is None:
            raise ValueError("gathered_embeddings needs gathered_labels (the labels all-gathered the same way)")
        base = self._base(embeddings, labels, gathered_embeddings, gathered_labels, query_index)
        weights = self.level_weights if self.level_weights is not None else [1.0] * len(conditional_similarities)
        if conditional_similarities and len(weights) != len(conditional_similarities):
            raise ValueError(
                f"level_weights has {len(weights)} entries but the head gave {len(conditional_similarities)} levels: "
                "pass one weight per level (cia_level_weights) or None"
            )
        loss = base
        level_losses: list[torch.Tensor] = []
        for weight, similarities in zip(weights, conditional_similarities):
            if similarities.shape != (len(labels), len(labels)):
                raise ValueError(
                    f"conditional similarities must be B×B with B={len(labels)} local labels, "
                    f"got {tuple(similarities.shape)}"
                )
            scale = self.loss_weight * weight
            if scale == 0:  # skipped, not multiplied by 0: 0 · inf would be NaN; still reported for logging
                with torch.no_grad():
                    level_losses.append(self.pair_loss(similarities, labels))
                continue
            level_loss = self.pair_loss(similarities, labels)
            level_losses.append(level_loss)
            loss = loss + scale * level_loss
        distill_loss = None
        if self.distillation is not None and conditional_similarities:
            teacher = conditional_similarities[self.distill_level]
            distill_loss = self.distillation(embeddings @ embeddings.T, teacher, labels)  # local pairs, as the head's
            loss = loss + self.distill_scale(step) * distill_loss
        return ObjectiveOutput(loss=loss, base_loss=base, level_losses=level_losses, distill_loss=distill_loss)

    def stop_transfer(self) -> None:
        """Switch the transfer off for the rest of the run (``training/transfer_gate.py``): weight 0, not computed."""
        self.distillation = None
        self.distill_weight = 0.0

    def distill_scale(self, step: int | None) -> float:
        """The transfer's weight at ``step``: rising linearly over the warm-up, then ``distill_weight``."""
        if step is None or self.distill_warmup_steps == 0:
            return self.distill_weight
        return self.distill_weight * min(1.0, step / self.distill_warmup_steps)

    def _base(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        gathered_embeddings: torch.Tensor | None,
        gathered_labels: torch.Tensor | None,
        query_index: torch.Tensor | None,
    ) -> torch.Tensor:
        if isinstance(self.base_loss, ProxyLoss):
            if gathered_embeddings is None:
                return self.base_loss(embeddings, labels)
            return self.base_loss(gathered_embeddings, gathered_labels)
        if gathered_embeddings is None:
            return self.base_loss(embeddings @ embeddings.T, labels)
        if query_index is None:
            raise ValueError(
                "gathered_embeddings needs query_index: the column of each local row in the gathered embeddings "
                "(rank * batch_size + arange(batch_size)), so that self pairs are excluded"
            )
        return self.base_loss(
            embeddings @ gathered_embeddings.T, gathered_labels, query_labels=labels, query_index=query_index
        )

    def extra_repr(self) -> str:
        return (
            f"loss_weight={self.loss_weight}, level_weights={self.level_weights}, "
            f"distill_weight={self.distill_weight}, distill_level={self.distill_level}, "
            f"distill_warmup_steps={self.distill_warmup_steps}"
        )
