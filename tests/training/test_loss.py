"""The preference loss against hand computation, its gradients, the in-batch-negatives variant, and 2-rank gloo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pickscore.training.loss import gather_features, pickscore_loss

WIN_0, WIN_1, TIE = (1.0, 0.0), (0.0, 1.0), (0.5, 0.5)


def _unit(*angles: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles (N, 2), float64 so hand arithmetic matches to 1e-12."""
    a = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([a.cos(), a.sin()], dim=-1)


def _labels(*labels) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([x[0] for x in labels], dtype=torch.float64), torch.tensor(
        [x[1] for x in labels], dtype=torch.float64
    )


def _pairwise_by_hand(scale: float, t: tuple, y0: tuple, y1: tuple, label: tuple) -> float:
    """-label_0 log p0 - label_1 log p1 with s_j = scale * <t, y_j>, for one example of 2-D vectors."""
    s0, s1 = scale * (t[0] * y0[0] + t[1] * y0[1]), scale * (t[0] * y1[0] + t[1] * y1[1])
    log_z = math.log(math.exp(s0) + math.exp(s1))
    return -label[0] * (s0 - log_z) - label[1] * (s1 - log_z)


def test_clear_preference_matches_hand_computation():
    text, y0, y1 = _unit(0.0), _unit(0.3), _unit(1.2)
    s0, s1 = 10 * math.cos(0.3), 10 * math.cos(1.2)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    loss = pickscore_loss(text, y0, y1, *_labels(WIN_0), scale)
    assert loss.item() == pytest.approx(math.log1p(math.exp(s1 - s0)), abs=1e-12)
    # Preferring the other image costs more, by exactly the score difference.
    flipped = pickscore_loss(text, y0, y1, *_labels(WIN_1), scale)
    assert flipped.item() - loss.item() == pytest.approx(s0 - s1, abs=1e-12)


@pytest.mark.parametrize("tie_offset, at_equal_scores", [(False, math.log(2.0)), (True, 0.0)])
def test_tie_is_minimised_at_equal_scores(tie_offset, at_equal_scores):
    text, scale = _unit(0.0), torch.tensor(math.log(20.0), dtype=torch.float64)
    y0 = _unit(0.5)
    values = {}
    for angle in (-0.9, -0.5, -0.2, 0.5, 0.8):  # -0.5 and 0.5 give s0 == s1
        y1 = _unit(angle).requires_grad_()
        loss = pickscore_loss(text, y0, y1, *_labels(TIE), scale, tie_offset=tie_offset)
        loss.backward()
        values[angle] = (loss.item(), y1.grad.abs().max().item())
    assert values[-0.5][0] == pytest.approx(at_equal_scores, abs=1e-12)
    assert values[0.5] == (pytest.approx(at_equal_scores, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    assert all(v > at_equal_scores + 1e-3 for a, (v, _) in values.items() if abs(a) != 0.5)


def test_tie_offset_only_moves_ties_and_never_the_gradient():
    text, y0, y1 = _unit(0.0, 0.4), _unit(0.3, 1.0), _unit(1.2, 0.1)
    labels, scale = _labels(TIE, WIN_0), torch.tensor(math.log(30.0), dtype=torch.float64)
    grads = []
    for tie_offset in (False, True):
        t = text.clone().requires_grad_()
        loss = pickscore_loss(t, y0, y1, *labels, scale, tie_offset=tie_offset)
        loss.backward()
        grads.append((loss.item(), t.grad))
    assert grads[0][0] - grads[1][0] == pytest.approx(math.log(2.0) / 2, abs=1e-12)  # one tie in a mean of two
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)


def test_prompt_frequencies_weight_the_mean():
    angles = [
        (0.0, 1.2, 0.3),
        (0.5, 1.4, 0.6),
        (1.0, 1.1, 1.05),
    ]  # (text, image 0, image 1); the first prefers the wrong image
    labels = [WIN_0, WIN_1, TIE]
    counts = torch.tensor([1, 2, 4])
    text, y0, y1 = (_unit(*[a[j] for a in angles]) for j in range(3))
    scale = math.exp(math.log(15.0))
    per_example = [
        _pairwise_by_hand(scale, tuple(text[i].tolist()), tuple(y0[i].tolist()), tuple(y1[i].tolist()), labels[i])
        for i in range(3)
    ]
    per_example[2] += math.log(0.5)  # the tie offset
    weights = [1.0, 0.5, 0.25]
    expected = sum(w * loss for w, loss in zip(weights, per_example)) / sum(weights)
    log_scale = torch.tensor(math.log(15.0), dtype=torch.float64)
    loss = pickscore_loss(text, y0, y1, *_labels(*labels), log_scale, num_example_per_prompt=counts)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    unweighted = pickscore_loss(text, y0, y1, *_labels(*labels), log_scale)
    assert unweighted.item() == pytest.approx(sum(per_example) / 3, abs=1e-12)
    assert abs(loss.item() - unweighted.item()) > 1e-3


def test_gradients_reach_embeddings_and_logit_scale():
    text, y0, y1 = (_unit(a).requires_grad_() for a in (0.0, 0.3, 1.2))
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    pickscore_loss(text, y0, y1, *_labels(WIN_0), log_scale).backward()
    # loss = log(1 + exp(-d * e^l)) with d = cos 0.3 - cos 1.2, so dloss/dl = -d e^l sigmoid(-d e^l).
    d = math.cos(0.3) - math.cos(1.2)
    assert log_scale.grad.item() == pytest.approx(-d * 10 / (1 + math.exp(d * 10)), abs=1e-12)
    for grad in (text.grad, y0.grad, y1.grad):
        assert grad.abs().sum() > 0
    # Gradient descent raises the preferred image's score: y0's gradient points away from the text.
    assert (y0.grad @ text.detach().T).item() < 0


def _in_batch_by_hand(scale: float, text, y0, y1, labels, counts) -> float:
    """The original's in-batch-negatives loss, written out with loops over a batch of B examples."""
    B = len(text)
    images = list(y0) + list(y1)  # image j of prompt i sits at i (image 0) and B + i (image 1)

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    total, weight_sum = 0.0, 0.0
    for i in range(B):
        row = [scale * dot(text[i], img) for img in images]  # prompt i against every image
        log_z = math.log(sum(math.exp(v) for v in row))
        text_loss = -labels[i][0] * (row[i] - log_z) - labels[i][1] * (row[B + i] - log_z)
        if labels[i][0] == labels[i][1]:
            text_loss += math.log(0.5)
        image_loss = 0.0
        for label, img in ((labels[i][0], y0[i]), (labels[i][1], y1[i])):
            column = [scale * dot(t, img) for t in text]  # the image against every prompt
            image_loss += label * -(column[i] - math.log(sum(math.exp(v) for v in column)))
        weight = 1.0 / counts[i]
        total += weight * (text_loss + image_loss) / 2
        weight_sum += weight
    return total / weight_sum


def test_in_batch_negatives_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    text, y0, y1 = (F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    labels, counts = [WIN_0, TIE, WIN_1], [1, 3, 2]
    expected = _in_batch_by_hand(12.0, text.tolist(), y0.tolist(), y1.tolist(), labels, counts)
    loss = pickscore_loss(
        text,
        y0,
        y1,
        *_labels(*labels),
        torch.tensor(math.log(12.0), dtype=torch.float64),
        num_example_per_prompt=torch.tensor(counts),
        in_batch_negatives=True,
    )
    assert loss.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("label", [WIN_0, WIN_1, TIE])
def test_in_batch_negatives_with_one_example_is_half_the_pairwise_loss(label):
    # One prompt: the text side is the pairwise loss and the image side has nothing to contrast against (0).
    text, y0, y1, scale = _unit(0.0), _unit(0.3), _unit(1.2), torch.tensor(math.log(10.0), dtype=torch.float64)
    pairwise = pickscore_loss(text, y0, y1, *_labels(label), scale)
    in_batch = pickscore_loss(text, y0, y1, *_labels(label), scale, in_batch_negatives=True)
    assert in_batch.item() == pytest.approx(pairwise.item() / 2, abs=1e-12)


def test_gather_is_the_identity_without_a_process_group():
    a, b = torch.ones(2, 3), torch.zeros(2)
    gathered = gather_features(a, b)
    assert gathered[0] is a and gathered[1] is b


# --- two ranks -------------------------------------------------------------------------------------------------

GLOBAL_BATCH, WORLD_SIZE, DIM = 8, 2, 6


class _Towers(torch.nn.Module):
    """Stand-in for CLIP: a linear text tower, a linear image tower and a logit scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.text = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        self.image = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))

    def forward(self, text, image_0, image_1):
        return (
            F.normalize(self.text(text), dim=-1),
            F.normalize(self.image(image_0), dim=-1),
            F.normalize(self.image(image_1), dim=-1),
            self.logit_scale,
        )


def _global_batch():
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(GLOBAL_BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(3)]
    label_0 = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0], dtype=torch.float64)
    counts = torch.tensor([1, 2, 3, 4, 1, 5, 2, 1])
    return inputs, label_0, 1.0 - label_0, counts


def _loss_and_grads(model, rows: slice, in_batch_negatives: bool):
    inputs, label_0, label_1, counts = _global_batch()
    embeds = model(*(x[rows] for x in inputs))
    loss = pickscore_loss(
        *embeds[:3], label_0[rows], label_1[rows], embeds[3], counts[rows], in_batch_negatives=in_batch_negatives
    )
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rank(rank: int, out: str):
    """One of WORLD_SIZE processes: its shard of the global batch through DDP; losses and gradients to out/."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD_SIZE)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_Towers())  # averages gradients over ranks, as in training
        shard = GLOBAL_BATCH // WORLD_SIZE
        rows = slice(rank * shard, (rank + 1) * shard)
        results = {}
        for flag in (False, True):
            loss, grads = _loss_and_grads(model, rows, flag)
            results[flag] = (loss, {n.removeprefix("module."): g for n, g in grads.items()})
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process_on_the_global_batch(tmp_path):
    # Gathering without autograd and keeping only the local shard's gradient (open_clip's default) would give
    # the same loss but 1/WORLD_SIZE of these gradients after DDP's averaging; this test tells the two apart.
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=WORLD_SIZE)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    for flag in (False, True):
        loss, grads = _loss_and_grads(_Towers(), slice(None), flag)
        for rank_results in results:
            rank_loss, rank_grads = rank_results[flag]
            torch.testing.assert_close(rank_loss, loss, rtol=0, atol=1e-12)
            assert rank_grads.keys() == grads.keys()
            for name in grads:
                torch.testing.assert_close(rank_grads[name], grads[name], rtol=0, atol=1e-12, msg=name)
