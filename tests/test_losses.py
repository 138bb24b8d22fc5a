"""Losses against pytorch-metric-learning and brute-force references; the CIA objective against its definition."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import CosineSimilarity

from crossmetric.modeling.multi_similarity import multi_similarity_loss
from crossmetric.training.losses.registry import (
    LOSSES,
    CircleLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    NormalizedSoftmaxLoss,
    PairLoss,
    ProxyAnchorLoss,
    build_loss,
    build_objective,
    objective_from_config,
)

# 5 classes of 3, one of 2 and a singleton (an anchor with no positive): 18 items.
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6])
PAIR_LOSSES = [MultiSimilarityLoss(), MultiSimilarityLoss(margin=None), ContrastiveLoss(), CircleLoss()]


def embeddings(n: int = len(LABELS), dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Clustered unit embeddings in float64 (so parity holds to 1e-6 whatever the summation order)."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(int(LABELS.max()) + 1, dim, generator=generator, dtype=torch.float64)
    points = centres[LABELS[:n]] + 0.8 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return F.normalize(points, dim=1)


def ms_reference(sim: torch.Tensor, labels: torch.Tensor, margin: float, alpha=2.0, beta=40.0, base=0.5) -> float:
    """Wang et al.'s loss written per anchor: hard negatives S_n + margin > min S_p, hard positives
    S_p - margin < max S_n (on all pairs, self excluded), then the two soft-weighted terms, mean over anchors."""
    total = 0.0
    for i in range(len(labels)):
        pos = [sim[i, j].item() for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [sim[i, j].item() for j in range(len(labels)) if labels[j] != labels[i]]
        hard_neg = [s for s in neg if pos and s + margin > min(pos)]
        hard_pos = [s for s in pos if neg and s - margin < max(neg)]
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in hard_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in hard_neg)) / beta
    return total / len(labels)


def test_multi_similarity_without_mining_equals_pml() -> None:
    emb = embeddings()
    ours = MultiSimilarityLoss(alpha=2, beta=40, base=0.5, margin=None)(emb @ emb.T, LABELS)
    theirs = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)(emb, LABELS)
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_multi_similarity_with_mining_equals_per_anchor_reference_and_pml_miner() -> None:
    emb = embeddings(seed=1)
    sim = emb @ emb.T
    ours = MultiSimilarityLoss(margin=0.1)(sim, LABELS)
    reference = ms_reference(sim, LABELS, margin=0.1)
    pml = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)
    theirs = pml(emb, LABELS, pml_miners.MultiSimilarityMiner(epsilon=0.1)(emb, LABELS))
    assert abs(ours.item() - reference) < 1e-6
    assert abs(ours.item() - theirs.item()) < 1e-6
    unmined = MultiSimilarityLoss(margin=None)(sim, LABELS)
    assert abs(ours.item() - unmined.item()) > 1e-3  # the mining really drops pairs on this batch


def test_multi_similarity_wraps_the_model_function() -> None:
    emb = embeddings(seed=2)
    assert MultiSimilarityLoss()(emb @ emb.T, LABELS) == multi_similarity_loss(emb @ emb.T, LABELS)


def test_query_labels_without_self_pairs_equals_pml_reference_embeddings() -> None:
    emb, ref = embeddings(seed=3), embeddings(seed=4)
    query_labels = LABELS.flip(0)
    ours = MultiSimilarityLoss(margin=None)(emb @ ref.T, LABELS, query_labels=query_labels)
    theirs = pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)(
        emb, query_labels, ref_emb=ref, ref_labels=LABELS
    )
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_contrastive_equals_pml_with_cosine_similarity() -> None:
    emb = embeddings(seed=5)
    ours = ContrastiveLoss(pos_margin=1.0, neg_margin=0.5)(emb @ emb.T, LABELS)
    theirs = pml_losses.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=CosineSimilarity())(emb, LABELS)
    assert ours.item() > 0
    assert abs(ours.item() - theirs.item()) < 1e-6


def test_circle_equals_pml() -> None:
    emb = embeddings(seed=6)
    ours = CircleLoss(m=0.4, gamma=80)(emb @ emb.T, LABELS)
    theirs = pml_losses.CircleLoss(m=0.4, gamma=80)(emb, LABELS)
    assert abs(ours.item() - theirs.item()) < 1e-6


@pytest.mark.parametrize("loss_fn", PAIR_LOSSES, ids=repr)
def test_query_index_names_the_self_column(loss_fn) -> None:
    """Columns shuffled, each row told where its own column went: the same loss as the square matrix."""
    emb = embeddings(seed=7)
    full = loss_fn(emb @ emb.T, LABELS)
    permutation = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))
    query_index = torch.argsort(permutation)  # row i's item now sits in column query_index[i]
    shuffled = loss_fn(emb @ emb[permutation].T, LABELS[permutation], query_index=query_index)
    torch.testing.assert_close(shuffled, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [MultiSimilarityLoss(), MultiSimilarityLoss(margin=None), CircleLoss()], ids=repr)
def test_row_slices_against_all_columns_average_to_the_full_loss(loss_fn) -> None:
    """Per-anchor means: two processes' rows against the gathered columns average to the one-process loss."""
    emb, labels = embeddings(seed=8)[:12], LABELS[:12]  # 4 classes of 3: every anchor has both kinds of pair
    full = loss_fn(emb @ emb.T, labels)
    parts = [loss_fn(emb[rows] @ emb.T, labels, query_index=rows) for rows in torch.arange(12).chunk(2)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_fn", PAIR_LOSSES, ids=repr)
def test_gradients_flow_to_the_embeddings(loss_fn) -> None:
    emb = embeddings(seed=9).requires_grad_(True)
    loss_fn(emb @ emb.T, LABELS).backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("loss_fn", PAIR_LOSSES, ids=repr)
def test_batch_without_any_positive(loss_fn) -> None:
    """All singletons: mining and circle loss keep nothing (0, still backpropagates); the others push negatives."""
    emb = embeddings(n=6, seed=10).requires_grad_(True)
    labels = torch.arange(6)
    loss = loss_fn(emb @ emb.T, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    if isinstance(loss_fn, CircleLoss) or (isinstance(loss_fn, MultiSimilarityLoss) and loss_fn.margin is not None):
        assert loss.item() == 0.0
    else:
        theirs = {
            ContrastiveLoss: lambda: pml_losses.ContrastiveLoss(1.0, 0.5, distance=CosineSimilarity()),
            MultiSimilarityLoss: lambda: pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5),
        }[type(loss_fn)]()(emb.detach(), labels)
        assert loss.item() > 0 and abs(loss.item() - theirs.item()) < 1e-6


def test_nan_outside_the_pairs_does_not_leak() -> None:
    """The conditional matrices' diagonal is no pair: whatever it holds, losses and gradients stay finite."""
    sim = (embeddings(seed=11) @ embeddings(seed=11).T).requires_grad_(True)
    with torch.no_grad():
        sim.fill_diagonal_(float("nan"))
    for loss_fn in PAIR_LOSSES:
        sim.grad = None
        loss = loss_fn(sim, LABELS)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sim.grad).all(), loss_fn


def test_pair_loss_shape_errors_name_the_fix() -> None:
    sim = torch.rand(4, 6)
    with pytest.raises(ValueError, match="query_index"):
        MultiSimilarityLoss()(sim, torch.arange(6))
    with pytest.raises(ValueError, match="one label per column"):
        ContrastiveLoss()(sim, torch.arange(5), query_index=torch.arange(4))
    with pytest.raises(ValueError, match="query_index must hold"):
        CircleLoss()(sim, torch.arange(6), query_index=torch.arange(3))


class _MaskRecorder(PairLoss):
    """A pair loss that implements only ``compute_loss`` and keeps the masks it was given."""

    def compute_loss(self, similarities: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        self.masks = (positive, negative)
        return (similarities * positive).sum()


def test_a_pair_loss_implements_only_compute_loss_and_gets_the_masks_built_once() -> None:
    """The base class builds the masks (self pairs excluded by index, shapes checked) for every subclass."""
    recorder = _MaskRecorder()
    labels = torch.tensor([0, 0, 1, 1])
    sim = torch.ones(2, 4)
    loss = recorder(sim, labels, query_index=torch.tensor([3, 0]))  # row 0 is item 3, row 1 is item 0
    positive, negative = recorder.masks
    assert positive.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert negative.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert loss.item() == 2.0
    with pytest.raises(ValueError, match="query_index"):
        recorder(sim, labels)
    with pytest.raises(NotImplementedError, match="compute_loss"):
        PairLoss()(torch.ones(2, 2), torch.tensor([0, 1]))


def copy_proxies(ours, theirs) -> None:
    with torch.no_grad():
        if isinstance(ours, ProxyAnchorLoss):
            theirs.proxies.copy_(ours.proxies)  # PML: proxies, C×D
        else:
            theirs.W.copy_(ours.proxies.T)  # PML: W, D×C


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (ProxyAnchorLoss(10, 16, margin=0.1, alpha=32), pml_losses.ProxyAnchorLoss(10, 16, margin=0.1, alpha=32)),
        (NormalizedSoftmaxLoss(10, 16, temperature=0.05), pml_losses.NormalizedSoftmaxLoss(10, 16, temperature=0.05)),
    ],
    ids=["proxy_anchor", "normalized_softmax"],
)
def test_proxy_losses_equal_pml_with_the_same_proxies(ours, theirs) -> None:
    ours, theirs = ours.double(), theirs.double()
    copy_proxies(ours, theirs)
    emb = embeddings(seed=12)  # labels 0..6 of 10 classes: proxies 7..9 have no positive in the batch
    emb_ours, emb_theirs = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    loss_ours, loss_theirs = ours(emb_ours, LABELS), theirs(emb_theirs, LABELS)
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-6
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(emb_ours.grad, emb_theirs.grad, rtol=0, atol=1e-8)
    proxy_grad_theirs = theirs.proxies.grad if isinstance(ours, ProxyAnchorLoss) else theirs.W.grad.T
    torch.testing.assert_close(ours.proxies.grad, proxy_grad_theirs, rtol=0, atol=1e-8)


def test_proxies_are_checkpointed_parameters_and_labels_are_checked() -> None:
    objective = build_objective("proxy_anchor", num_classes=7, embedding_dim=16)
    assert [name for name, _ in objective.named_parameters()] == ["base_loss.proxies"]
    assert objective.state_dict()["base_loss.proxies"].shape == (7, 16)
    assert isinstance(objective.pair_loss, MultiSimilarityLoss)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.6"):
        objective(embeddings(seed=13).float(), LABELS + 1)
    with pytest.raises(ValueError, match="embedding_dim"):
        objective(torch.zeros(18, 8), LABELS)


def conditional(n: int, levels: int, seed: int) -> list[torch.Tensor]:
    """Symmetric B×B matrices of cosines with a unit diagonal, as the head returns."""
    out = []
    for level in range(levels):
        z = F.normalize(torch.randn(n, n, 8, generator=torch.Generator().manual_seed(seed + level)), dim=-1)
        sim = torch.einsum("ijc,jic->ij", z, z)
        out.append(sim.fill_diagonal_(1.0))
    return out


def test_objective_is_base_plus_weighted_level_losses() -> None:
    emb = embeddings(seed=14).float()
    levels = conditional(len(LABELS), 3, seed=0)
    objective = build_objective("multi_similarity", "contrastive", loss_weight=0.7, level_weights=[0.0, 0.5, 2.0])
    out = objective(emb, LABELS, levels)
    base = MultiSimilarityLoss()(emb @ emb.T, LABELS)
    level_losses = [ContrastiveLoss()(sim, LABELS) for sim in levels]
    expected = base + 0.7 * (0.5 * level_losses[1] + 2.0 * level_losses[2])
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.base_loss, base)
    torch.testing.assert_close(torch.stack(out.level_losses), torch.stack(level_losses))
    assert not out.level_losses[0].requires_grad  # weight 0: logged, not trained


def test_lambda_zero_is_the_head_off_baseline() -> None:
    emb = embeddings(seed=15).float()
    head_off = build_objective(loss_weight=1.0)(emb, LABELS)
    weight_zero = build_objective(loss_weight=0.0, level_weights=[1.0, 1.0])(emb, LABELS, conditional(18, 2, seed=1))
    assert head_off.level_losses == [] and len(weight_zero.level_losses) == 2
    assert torch.equal(weight_zero.loss, head_off.loss)


def test_gathered_rows_average_to_the_single_process_objective() -> None:
    """Rows = each process's slice, columns = the gathered batch: the mean of the two losses and its gradient are
    the one-process ones (the head's levels are local, so this checks the base part)."""
    emb = embeddings(seed=16)[:12].requires_grad_(True)
    labels = LABELS[:12]
    objective = build_objective(loss_weight=0.5)
    full = objective(emb, labels).loss
    (full_grad,) = torch.autograd.grad(full, emb)
    parts = []
    for rows in torch.arange(12).chunk(2):
        out = objective(emb[rows], labels[rows], gathered_embeddings=emb, gathered_labels=labels, query_index=rows)
        parts.append(out.loss)
    mean = (parts[0] + parts[1]) / 2
    torch.testing.assert_close(mean, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(mean, emb)[0], full_grad, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="query_index"):
        objective(emb[:8], labels[:8], gathered_embeddings=emb, gathered_labels=labels)


def test_proxy_base_loss_uses_all_gathered_rows() -> None:
    emb = embeddings(seed=17).float()
    objective = build_objective("normalized_softmax", num_classes=7, embedding_dim=16)
    gathered = objective(emb[:9], LABELS[:9], gathered_embeddings=emb, gathered_labels=LABELS)
    torch.testing.assert_close(gathered.base_loss, objective.base_loss(emb, LABELS))


def test_objective_equals_the_models_own_loss() -> None:
    """Real model, real head: default objective = the loss CrossMetricForMetricLearning computes from labels."""
    from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning

    config = CrossMetricConfig(
        backbone="test_resnet",
        embedding_dim=16,
        cia_levels=2,
        cia_dim=16,
        cia_heads=2,
        cia_loss_weight=0.3,
        cia_level_weights=[0.5, 1.0],
        image_size=32,
    )
    model = CrossMetricForMetricLearning(config).eval()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        outputs = model(torch.randn(6, 3, 32, 32), labels=labels)
    objective = build_objective(loss_weight=config.cia_loss_weight, level_weights=config.level_weights)
    out = objective(outputs.embeddings, labels, outputs.conditional_similarities)
    assert len(out.level_losses) == 2
    torch.testing.assert_close(out.loss, outputs.loss)


def test_registry_and_factory_errors() -> None:
    assert set(LOSSES) == {"multi_similarity", "contrastive", "circle", "proxy_anchor", "normalized_softmax"}
    assert build_loss("multi_similarity", margin=None, num_classes=5, embedding_dim=4).margin is None
    with pytest.raises(ValueError, match="choose one of"):
        build_loss("triplet")
    with pytest.raises(ValueError, match="no hyperparameter"):
        build_loss("contrastive", margin=0.2)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("proxy_anchor")
    with pytest.raises(ValueError, match="conditional similarities"):
        build_objective("multi_similarity", "proxy_anchor")
    with pytest.raises(ValueError, match="one weight per level"):
        build_objective(level_weights=[1.0])(embeddings(seed=18), LABELS, conditional(18, 2, seed=2))
    config = SimpleNamespace(
        loss="circle", cia_pair_loss="multi_similarity", cia_loss_weight=2.0, cia_level_weights=None, embedding_dim=16
    )
    objective = objective_from_config(config)
    assert isinstance(objective.base_loss, CircleLoss) and objective.loss_weight == 2.0
