"""Transfer from the cross-image-attention head to the embedding: the head's detached conditional similarities teach
the unconditional ones (docs/design.md §1, "Transfer").

The head ranks neighbours better than the embedding does (re-ranking probe), but export drops it. These losses pull
the embedding's in-batch similarities ``S⁰ = E Eᵀ`` toward the head's ``S^l`` of one level, the teacher detached, so
that what the head knows can reach the model users download. Three forms:

- ``kl``: similarity distillation as in S2SD (Roth, Milbich, Ommer et al., ICML 2021; ``criteria/s2sd.py``): a
  row-wise KL(teacher ‖ student) of the softmax over each row's in-batch candidates at temperature ``T``, times
  ``T²``, the diagonal (an image with itself) masked. S2SD's defaults: T = 1, weight 50.
- ``listwise``: the same KL restricted to each row's ``top_k`` candidates by the teacher (CPRD, RocketQAv2): only
  the order of the nearest candidates is taught, not the teacher's whole distribution, which on training classes
  mostly repeats the labels.
- ``margin_mse``: Margin-MSE (Hofstätter et al., 2020): for each anchor, each in-batch positive and the anchor's
  hardest in-batch negative by the student, ``((s⁺ − s⁻) − (t⁺ − t⁻))²``: the teacher's margins, not its scale
  (cross-encoder scores are more concentrated than bi-encoder ones).

Written by hand: pytorch-metric-learning and sentence-transformers have distillation losses on embeddings or on
given teacher scores per (query, passage) pair, not between two in-batch B×B similarity matrices with label masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_FORMS = ("kl", "listwise", "margin_mse")


class HeadDistillationLoss(nn.Module):
    """A transfer term from a teacher B×B similarity matrix (detached here) to the student's.

    Args:
        form: one of :data:`DISTILL_FORMS`.
        temperature: T of the softmax in ``kl`` and ``listwise``.
        top_k: candidates per row in ``listwise``.

    References:
        - Roth, Milbich, Ommer, Cohen, Ghassemi, "Simultaneous Similarity-based Self-Distillation for Deep Metric
          Learning", ICML 2021 (S2SD).
        - Hofstätter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
          Distillation", 2020 (Margin-MSE).
        - Ren et al., "RocketQAv2", EMNLP 2021 (list-wise KL over the top candidates).

    Recommendations:
        - Train the head on detached tokens (``cia_detach``) so that this term is the only path from the head to the
          embedding; warm it up (``cia_distill_warmup_steps``) while the head is still random.
    """

    def __init__(self, form: str = "kl", temperature: float = 1.0, top_k: int = 16) -> None:
        super().__init__()
        if form not in DISTILL_FORMS:
            raise ValueError(f"distillation form {form!r} must be one of {', '.join(DISTILL_FORMS)}")
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        if top_k < 1:
            raise ValueError(f"distillation top_k must be >= 1, got {top_k}")
        self.form = form
        self.temperature = float(temperature)
        self.top_k = int(top_k)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The transfer loss of B×B ``student`` similarities toward ``teacher`` (detached here); self pairs ignored."""
        if student.shape != teacher.shape or student.shape[0] != student.shape[1]:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be B×B")
        teacher = teacher.detach()
        eye = torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
        if self.form == "margin_mse":
            return margin_mse(student, teacher, labels, eye)
        if self.form == "listwise":
            k = min(self.top_k, student.shape[0] - 1)
            candidates = teacher.masked_fill(eye, float("-inf")).topk(k, dim=1).indices
            student, teacher = student.gather(1, candidates), teacher.gather(1, candidates)
            mask = torch.zeros_like(student, dtype=torch.bool)
        else:
            mask = eye
        t = self.temperature
        log_student = F.log_softmax(student.masked_fill(mask, float("-inf")) / t, dim=1)
        log_teacher = F.log_softmax(teacher.masked_fill(mask, float("-inf")) / t, dim=1)
        terms = log_teacher.exp() * (log_teacher - log_student)
        return terms.masked_fill(mask, 0.0).sum() * t**2 / student.shape[0]

    def extra_repr(self) -> str:
        return f"form={self.form!r}, temperature={self.temperature}, top_k={self.top_k}"


def margin_mse(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Mean over (anchor, positive) of the squared difference of the student's and the teacher's margins to the
    anchor's hardest negative by the student; 0 when no anchor has both a positive and a negative."""
    same = labels[:, None] == labels[None, :]
    positives, negatives = same & ~eye, ~same
    usable = positives.any(dim=1) & negatives.any(dim=1)
    if not usable.any():
        return student.sum() * 0.0
    hardest = student.detach().masked_fill(~negatives, float("-inf")).argmax(dim=1, keepdim=True)
    student_margin = student - student.gather(1, hardest)
    teacher_margin = teacher - teacher.gather(1, hardest)
    pairs = positives & usable[:, None]
    return ((student_margin - teacher_margin) ** 2)[pairs].mean()
