"""Losses by name: the registry the trainer and the command line pick from, and the objective factory.

=====================  ======================================  =====================================
name                   class                                   takes
=====================  ======================================  =====================================
``multi_similarity``   :class:`MultiSimilarityLoss`             a similarity matrix (pair loss)
``contrastive``        :class:`ContrastiveLoss`                 a similarity matrix (pair loss)
``circle``             :class:`CircleLoss`                      a similarity matrix (pair loss)
``proxy_anchor``       :class:`ProxyAnchorLoss`                 embeddings, learned class proxies
``normalized_softmax`` :class:`NormalizedSoftmaxLoss`           embeddings, learned class proxies
=====================  ======================================  =====================================

Pair losses serve as the base loss and as the pair loss of the head's conditional similarities; proxy losses only
as the base loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .cia_objective import CrossImageAttentionObjective, ObjectiveOutput
from .head_distillation import HeadDistillationLoss
from .pair_losses import CircleLoss, ContrastiveLoss, MultiSimilarityLoss, PairLoss
from .proxy_losses import NormalizedSoftmaxLoss, ProxyAnchorLoss, ProxyLoss

__all__ = [
    "LOSSES",
    "CircleLoss",
    "ContrastiveLoss",
    "CrossImageAttentionObjective",
    "MultiSimilarityLoss",
    "NormalizedSoftmaxLoss",
    "ObjectiveOutput",
    "PairLoss",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "build_loss",
    "build_objective",
    "objective_from_config",
]

LOSSES: dict[str, type[nn.Module]] = {
    "multi_similarity": MultiSimilarityLoss,
    "contrastive": ContrastiveLoss,
    "circle": CircleLoss,
    "proxy_anchor": ProxyAnchorLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
}


def build_loss(
    name: str, *, num_classes: int | None = None, embedding_dim: int | None = None, **kwargs: Any
) -> PairLoss | ProxyLoss:
    """The loss registered as ``name``, with its hyperparameters from ``kwargs``.

    ``num_classes`` and ``embedding_dim`` go to proxy losses (which need them) and are ignored by pair losses, so a
    caller may always pass them.

    Raises:
        ValueError: for an unknown name, an unknown hyperparameter, or a proxy loss without its sizes.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "embedding_dim"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"Loss {name!r} has no hyperparameter {', '.join(unknown)}; it takes {sorted(accepted)}")
    if issubclass(cls, ProxyLoss):
        if num_classes is None or embedding_dim is None:
            raise ValueError(
                f"Loss {name!r} learns one proxy per class: pass num_classes (number of training classes) "
                "and embedding_dim"
            )
        return cls(num_classes=num_classes, embedding_dim=embedding_dim, **kwargs)
    return cls(**kwargs)


def build_objective(
    loss: str = "multi_similarity",
    pair_loss: str | None = "multi_similarity",
    loss_weight: float = 1.0,
    level_weights: Sequence[float] | None = None,
    *,
    num_classes: int | None = None,
    embedding_dim: int | None = None,
    loss_kwargs: Mapping[str, Any] | None = None,
    pair_loss_kwargs: Mapping[str, Any] | None = None,
    transfer: Mapping[str, Any] | None = None,
) -> CrossImageAttentionObjective:
    """The CIA objective from loss names: base ``loss``, conditional ``pair_loss``, λ and w_l.

    Args:
        loss: base loss name (any of :data:`LOSSES`).
        pair_loss: pair loss name for the conditional similarities (a pair loss); ``None``: see
            :class:`CrossImageAttentionObjective`.
        loss_weight, level_weights: λ and w_l.
        num_classes, embedding_dim: sizes for a proxy base loss.
        loss_kwargs, pair_loss_kwargs: hyperparameters of each loss (e.g. ``{"margin": None}``).
        transfer: the head-to-embedding transfer: ``distillation``, ``distill_weight``, ``distill_level``,
            ``distill_warmup_steps`` of :class:`CrossImageAttentionObjective`.
    """
    base = build_loss(loss, num_classes=num_classes, embedding_dim=embedding_dim, **dict(loss_kwargs or {}))
    pair = None
    if pair_loss is not None:
        if not issubclass(LOSSES.get(pair_loss, PairLoss), PairLoss):
            pair_names = [n for n, c in LOSSES.items() if issubclass(c, PairLoss)]
            raise ValueError(
                f"pair loss {pair_loss!r} takes embeddings, but the conditional similarities are no inner products "
                f"of embeddings: choose one of {', '.join(pair_names)}"
            )
        pair = build_loss(pair_loss, **dict(pair_loss_kwargs or {}))
    return CrossImageAttentionObjective(
        base, pair, loss_weight=loss_weight, level_weights=level_weights, **dict(transfer or {})
    )


def objective_from_config(config: Any, num_classes: int | None = None) -> CrossImageAttentionObjective:
    """:func:`build_objective` from a config object with the fields of ``TrainingConfig``.

    Reads ``loss``, ``cia_pair_loss``, ``cia_loss_weight``, ``cia_level_weights``, ``embedding_dim``, the
    ``cia_distill_*`` transfer fields and, when present, ``loss_kwargs`` / ``cia_pair_loss_kwargs``.
    """
    distill_weight = float(getattr(config, "cia_distill_weight", 0.0) or 0.0)
    distillation = None
    if distill_weight > 0:
        distillation = HeadDistillationLoss(
            form=getattr(config, "cia_distill_form", "kl"),
            temperature=getattr(config, "cia_distill_temperature", 1.0),
            top_k=getattr(config, "cia_distill_top_k", 8),
        )
    return build_objective(
        loss=config.loss,
        pair_loss=getattr(config, "cia_pair_loss", "multi_similarity"),
        loss_weight=config.cia_loss_weight,
        level_weights=config.cia_level_weights,
        num_classes=num_classes,
        embedding_dim=config.embedding_dim,
        loss_kwargs=getattr(config, "loss_kwargs", None),
        pair_loss_kwargs=getattr(config, "cia_pair_loss_kwargs", None),
        transfer={
            "distillation": distillation,
            "distill_weight": distill_weight,
            "distill_level": int(getattr(config, "cia_distill_level", -1)),
            "distill_warmup_steps": int(getattr(config, "cia_distill_warmup_steps", 0) or 0),
        },
    )
