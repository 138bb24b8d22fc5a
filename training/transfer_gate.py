"""Stop the head-to-embedding transfer when the head is no better a ranker than the embedding it teaches.

The transfer (``cia_distill_*``) distils the head's order of each batch's nearest candidates into the embedding. That
helps where the head ranks better than the embedding (emoji: its re-ranking gains +4.4 Recall@1 on test), and it has
nothing to teach where it does not: on a folder of another domain (890 training images, 4-8 per class) the head alone
re-ranked validation *below* the embedding in 2 of 3 seeds (0.523 against 0.558, 0.457 against 0.484) and the default
lost 0.4 Recall@1 against head off (issue 29, item 7).

The rule (``cia_distill_stop="head_no_better"``): at every validation evaluation from the end of the transfer's
warm-up on, the head re-ranks each validation query's ``reranker_top_k`` nearest neighbours by the embedding, alone
(no fusion); when its Recall@1 over those candidates is no better than the embedding's own Recall@1, the transfer
stops: its weight is 0 from then on (the embedder then trains as with the head detached and no transfer, i.e. as with
the head off), and the log and the model card say at which step and with which figures. Before the warm-up ends the
head is still young and is not judged. The check is one extra pass over the validation split that also keeps the
head's tokens (the selection's own pass keeps only embeddings), plus the head on K candidates per query; it draws no
random numbers (the generators are forked), so a run where the rule never fires trains bit for bit as without it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from ..evaluation.rerank_fusion import CandidateScores, candidate_scores
from ..evaluation.reranking import head_inputs

logger = logging.getLogger(__name__)

STOP_RULES = ("head_no_better", "watch", "never")  # watch: check and log at the same points, never stop
RECORD = "transfer_check"  # the key of the check's record in the training log (RUN/log.jsonl)
DEFAULT_CANDIDATES = 20  # when --reranker_top_k is 0: the re-ranker's usual candidate count


@dataclass
class TransferCheck:
    """One check: the step, Recall@1 over each validation query's top-K candidates by the head alone and by the
    embedding, K, and whether the transfer stops here."""

    step: int
    head_recall: float
    embedding_recall: float
    candidates: int
    stop: bool
    no_better: bool | None = None  # what the rule says, whether or not it acts (--cia_distill_stop watch)

    def as_record(self) -> dict[str, Any]:
        return {
            "head_recall@1": self.head_recall,
            "embedding_recall@1": self.embedding_recall,
            "candidates": self.candidates,
            "head_no_better": self.stop if self.no_better is None else self.no_better,
            "stopped": self.stop,
        }


def head_no_better(head_recall: float, embedding_recall: float) -> bool:
    """The rule: the head teaches nothing when its ranking is no better than the embedding's (ties stop it too)."""
    return head_recall <= embedding_recall


def check_scores(scores: CandidateScores, step: int) -> TransferCheck:
    """The decision on a split's candidate scores (:func:`~crossmetric.evaluation.rerank_fusion.candidate_scores`)."""
    head, embedding = scores.recall_at_1(0.0), scores.recall_at_1(None)  # alpha 0: the head's score alone
    return TransferCheck(step, head, embedding, scores.neighbours.shape[1], head_no_better(head, embedding))


def stop_reason(record: dict[str, Any]) -> str:
    """A check's record (``as_record``), in words, for the log and the model card."""
    return (
        f"the head re-ranked the validation split no better than the embedding (Recall@1 over each query's "
        f"{record['candidates']} nearest: head alone {record['head_recall@1']:.4f}, embedding "
        f"{record['embedding_recall@1']:.4f}), so it had nothing to teach"
    )


def stopped_check(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The log record of the check that stopped the transfer (``{"step", RECORD: {...}}``), or None."""
    return next((r for r in history if RECORD in r and r[RECORD].get("stopped")), None)


class TransferGate:
    """Applies the rule to a run: :meth:`check` at each selection evaluation, :meth:`restore` after a resume.

    Active only when the run has a transfer (weight > 0), a head, a validation split and ``cia_distill_stop`` is
    ``head_no_better``.
    """

    def __init__(self, config: Any, objective: Any, model: Any, selection_split: str | None) -> None:
        """``config``: the run's ``TrainingConfig``; ``objective`` and ``model`` unwrapped (no DDP)."""
        self.config = config
        self.objective = objective
        self.acts = config.cia_distill_stop == "head_no_better"
        self.active = (
            config.cia_distill_stop in ("head_no_better", "watch")
            and bool(config.cia_distill_weight)
            and getattr(model, "head", None) is not None
            and selection_split == "validation"
        )
        self.stopped_at: int | None = None

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
        return self.decide(check_scores(scores, step))

    def decide(self, check: TransferCheck) -> TransferCheck:
        """The rule's verdict, acted on only with ``head_no_better`` (``watch`` logs it and the transfer goes on)."""
        check.no_better, check.stop = check.stop, check.stop and self.acts
        return check

    def apply(self, record: dict[str, Any], step: int) -> None:
        """Act on a check's record (the same on every process): stop the transfer when it says so."""
        if not record["stopped"]:
            logger.info(
                "step %d: the transfer goes on (--cia_distill_stop %s; Recall@1 over each query's %d nearest on "
                "validation: head alone %.4f, embedding %.4f)",
                step, self.config.cia_distill_stop, record["candidates"], record["head_recall@1"],
                record["embedding_recall@1"],
            )  # fmt: skip
            return
        self.stop(step)
        logger.warning("step %d: the transfer stops (its weight is 0 from now on): %s.", step, stop_reason(record))

    def stop(self, step: int) -> None:
        self.stopped_at = step
        self.objective.stop_transfer()

    def restore(self, history: list[dict[str, Any]]) -> None:
        """After a resume: stop again if the log (cut at the checkpoint) says the transfer had stopped."""
        record = stopped_check(history)
        if record is not None and self.active:
            self.stop(record["step"])
