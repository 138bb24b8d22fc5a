"""Stop the head-to-embedding transfer when the head is no better a ranker than the embedding it teaches.

The transfer (``cia_distill_*``) distils the head's order of each batch's nearest candidates into the embedding. That
helps where the head ranks better than the embedding (emoji: its re-ranking gains +4.4 Recall@1 on test), and it has
nothing to teach where it does not: on a folder of another domain (890 training images, 4-8 per class) the head alone
re-ranked validation *below* the embedding in 2 of 3 seeds (0.523 against 0.558, 0.457 against 0.484) and the default
lost 0.4 Recall@1 against head off (issue 29, item 7).

Two rules (``--cia_distill_stop``), checked at every validation evaluation from the end of the transfer's warm-up on:
the head re-ranks each validation query's ``reranker_top_k`` nearest neighbours by the embedding, alone (no fusion),
and its Recall@1 over those candidates is compared with the embedding's own Recall@1.

- ``head_no_better`` (the issue's rule): stop at the first check where the head is no better than the embedding.
  Measured on emoji seed 0, where the transfer gains +2.35 Recall@1 over head off: it fires at the first check
  (step 78 of 312: head alone 0.737, embedding 0.765), because the head starts behind and overtakes later (+2.8
  Recall@1 head alone over the embedding on test at the end, 5 seeds). So it is not any recipe's default.
- ``head_not_catching_up``: stop at a check where the head is no better *and* its lead over the embedding did not
  grow since the previous check (a head behind and not catching up). The earliest stop is at the second check. On
  emoji seed 0 it fires too, at step 195 (the lead, head alone − embedding on validation, was −2.84, −2.05, −1.10,
  −1.42, −0.95 points at steps 78 to 234).

Why both fire where the transfer helps: the transfer pulls the embedding towards the head, so a head compared with
the student it teaches looks no better while it is teaching well (emoji seed 0: with the transfer stopped at step
78 the head alone led the embedding by +2.8 Recall@1 on validation at the selected step; with it running, the head
stayed behind all along). Head minus student cannot tell emoji from the folder where the head was weak (−3.5 and
−2.7 at the end there). Each check also logs the fused re-ranker's Recall@1 on the same candidates, the figure a
better rule may need.
- ``watch`` (the fine-tuning recipe's default): the same checks, logged with both verdicts, acting on nothing.

When a rule fires the transfer's weight is 0 from then on (the embedder then trains as with the head detached and no
transfer, i.e. as with the head off), and the log and the model card say at which step, with which figures and why.
The check is one extra pass over the validation split that also keeps the head's tokens (the selection's own pass
keeps only embeddings), plus the head on K candidates per query; it draws no random numbers (the generators are
forked), so a run where no rule fires trains bit for bit as without the checks (emoji seed 0: the same figures at
step 78 with ``watch`` as with ``head_no_better``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from ..evaluation.rerank_fusion import CandidateScores, candidate_scores, choose_fusion
from ..evaluation.reranking import head_inputs

logger = logging.getLogger(__name__)

STOP_RULES = ("head_no_better", "head_not_catching_up", "watch", "never")
RECORD = "transfer_check"  # the key of the check's record in the training log (RUN/log.jsonl)
DEFAULT_CANDIDATES = 20  # when --reranker_top_k is 0: the re-ranker's usual candidate count


@dataclass
class TransferCheck:
    """One check: the step, Recall@1 over each validation query's top-K candidates by the head alone and by the
    embedding, K, the head's lead at the previous check (None at the first) and whether the transfer stops here."""

    step: int
    head_recall: float
    embedding_recall: float
    candidates: int
    previous_lead: float | None = None
    stop: bool = False
    fused_recall: float | None = None  # the re-ranker's fused score (best alpha on these scores): logged, not judged

    @property
    def lead(self) -> float:
        return self.head_recall - self.embedding_recall

    @property
    def no_better(self) -> bool:
        """``head_no_better``: the head teaches nothing when its ranking is no better than the embedding's (ties
        included)."""
        return self.head_recall <= self.embedding_recall

    @property
    def not_catching_up(self) -> bool:
        """``head_not_catching_up``: no better, and its lead did not grow since the previous check."""
        return self.no_better and self.previous_lead is not None and self.lead <= self.previous_lead

    def verdict(self, rule: str) -> bool:
        return {"head_no_better": self.no_better, "head_not_catching_up": self.not_catching_up}.get(rule, False)

    def as_record(self) -> dict[str, Any]:
        record = {
            "head_recall@1": self.head_recall,
            "embedding_recall@1": self.embedding_recall,
            "candidates": self.candidates,
            "previous_lead": self.previous_lead,
            "fused_recall@1": self.fused_recall,
            "head_no_better": self.no_better,
            "head_not_catching_up": self.not_catching_up,
            "stopped": self.stop,
        }
        if self.stop:
            record["reason"] = stop_reason(record)
        return record


def check_scores(scores: CandidateScores, step: int, previous_lead: float | None = None) -> TransferCheck:
    """The figures of one check from a split's candidate scores (:func:`~crossmetric.evaluation.rerank_fusion.
    candidate_scores`); ``stop`` is left False for :meth:`TransferGate.decide`."""
    head, embedding = scores.recall_at_1(0.0), scores.recall_at_1(None)  # alpha 0: the head's score alone
    fused = choose_fusion(scores)["validation"]["rerank/recall@1"]
    return TransferCheck(step, head, embedding, scores.neighbours.shape[1], previous_lead, fused_recall=fused)


def stop_reason(record: dict[str, Any]) -> str:
    """A stopping check's record, in words, for the log and the model card (which reads ``reason`` from the log)."""
    text = (
        f"the head re-ranked the validation split no better than the embedding (Recall@1 over each query's "
        f"{record['candidates']} nearest: head alone {record['head_recall@1']:.4f}, embedding "
        f"{record['embedding_recall@1']:.4f})"
    )
    if record.get("head_not_catching_up"):
        lead = record["head_recall@1"] - record["embedding_recall@1"]
        text += f" and was not catching up (its lead {record['previous_lead']:+.4f} at the previous check, {lead:+.4f})"
    return text + ", so it had nothing to teach"


def stopped_check(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The log record of the check that stopped the transfer (``{"step", RECORD: {...}}``), or None."""
    return next((r for r in history if RECORD in r and r[RECORD].get("stopped")), None)


class TransferGate:
    """Applies the rule to a run: :meth:`check` at each selection evaluation, :meth:`restore` after a resume.

    Active only when the run has a transfer (weight > 0), a head, a validation split and ``cia_distill_stop`` is
    one of the rules or ``watch``.
    """

    def __init__(self, config: Any, objective: Any, model: Any, selection_split: str | None) -> None:
        """``config``: the run's ``TrainingConfig``; ``objective`` and ``model`` unwrapped (no DDP)."""
        self.config = config
        self.objective = objective
        self.rule = config.cia_distill_stop
        self.active = (
            self.rule in STOP_RULES[:3]
            and bool(config.cia_distill_weight)
            and getattr(model, "head", None) is not None
            and model.head.query_mode != "shuffled"  # a random third image: no pair scores to re-rank with
            and selection_split == "validation"
        )
        self.stopped_at: int | None = None
        self.previous_lead: float | None = None  # the head's lead at the last check (set on every process)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a check runs at this evaluation: after the warm-up, before the end, while the transfer runs."""
        warmup = max(1, self.config.cia_distill_warmup_steps)
        return self.active and self.stopped_at is None and warmup <= step < total_steps

    def at_evaluation(
        self,
        accelerator: Any,
        model: Any,
        validation: Any,
        step: int,
        total_steps: int,
        log: Callable[[dict[str, Any]], None],
        train_mode: Callable[[], None],
    ) -> bool:
        """The trainer's hook after each selection evaluation: when a check is due, run it on the main process (its
        record goes to ``log``), share the decision with every process, act on it and put the model back in
        training mode (``train_mode``). True when a check ran."""
        if not self.due(step, total_steps):
            return False
        record: list[Any] = [None]
        if accelerator.is_main_process:
            record = [self.check(accelerator.unwrap_model(model), validation, step, accelerator.device).as_record()]
            log({"step": step, RECORD: record[0]})
        record = broadcast_object_list(record)
        self.apply(record[0], step)
        train_mode()
        return True

    def check(self, model: Any, validation: Any, step: int, device: torch.device) -> TransferCheck:
        """Score the validation split's candidates by ``model``'s head and its embedding; decide."""
        candidates = min(self.config.reranker_top_k or DEFAULT_CANDIDATES, len(validation) - 1)
        with torch.random.fork_rng(devices=[]):  # nothing here may move the training's random streams
            embeddings, tokens, labels = head_inputs(model, validation, self.config.eval_batch_size, device, False)
            scores = candidate_scores(model.head, embeddings, tokens, labels, candidates, device=device)
        return self.decide(check_scores(scores, step, self.previous_lead))

    def decide(self, check: TransferCheck) -> TransferCheck:
        """The configured rule's verdict (``watch``: never stop; both verdicts are in the record either way)."""
        check.stop = check.verdict(self.rule)
        return check

    def apply(self, record: dict[str, Any], step: int) -> None:
        """Act on a check's record (the same on every process): stop the transfer when it says so."""
        self.previous_lead = record["head_recall@1"] - record["embedding_recall@1"]
        if not record["stopped"]:
            logger.info(
                "step %d: the transfer goes on (--cia_distill_stop %s; Recall@1 over each query's %d nearest on "
                "validation: head alone %.4f, embedding %.4f)",
                step, self.config.cia_distill_stop, record["candidates"], record["head_recall@1"],
                record["embedding_recall@1"],
            )  # fmt: skip
            return
        self.stop(step)
        logger.warning("step %d: the transfer stops (its weight is 0 from now on): %s.", step, record["reason"])

    def stop(self, step: int) -> None:
        self.stopped_at = step
        self.objective.stop_transfer()

    def restore(self, history: list[dict[str, Any]]) -> None:
        """After a resume: the last check's lead, and stop again if the log (cut at the checkpoint) says it had."""
        checks = [r for r in history if RECORD in r]
        if checks and self.active:
            last = checks[-1][RECORD]
            self.previous_lead = last["head_recall@1"] - last["embedding_recall@1"]
        record = stopped_check(history)
        if record is not None and self.active:
            self.stop(record["step"])
