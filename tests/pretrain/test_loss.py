"""The PAST similarity-adjusted loss: formula, analytic value, 2-rank gloo equality, temperature, retrieval."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.errors import InputError
from pretrain.loss import LearnableTemperature, retrieval_accuracy, similarity_adjusted_loss
from tests.support import end_process_group

WORLD_SIZE = 2
GLOBAL_BATCH, IN_DIM, EMB_DIM = 8, 5, 4
DETACH_TARGETS = (True, False)


def reference_loss(img: np.ndarray, cell: np.ndarray, tau: float) -> float:
    """The PAST formula written out with loops, in float64."""
    n = img.shape[0]
    logits = np.array([[cell[i] @ img[j] / tau for j in range(n)] for i in range(n)])
    sim = np.array([[(cell[i] @ cell[j] + img[i] @ img[j]) / (2 * tau) for j in range(n)] for i in range(n)])
    targets = np.exp(sim) / np.exp(sim).sum(axis=1, keepdims=True)

    def soft_cross_entropy(z: np.ndarray, t: np.ndarray) -> float:
        rows = []
        for i in range(n):
            log_p = z[i] - math.log(sum(math.exp(v) for v in z[i]))
            rows.append(-sum(t[i, j] * log_p[j] for j in range(n)))
        return sum(rows) / n

    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))


def random_unit_rows(generator: torch.Generator, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_matches_plain_reference(tau):
    g = torch.Generator().manual_seed(1)
    img, cell = random_unit_rows(g, 7, 6), random_unit_rows(g, 7, 6)
    got = similarity_adjusted_loss(img, cell, tau, check_normalized=True)
    assert got.item() == pytest.approx(reference_loss(img.numpy(), cell.numpy(), tau), rel=1e-10)
    # A tensor temperature and float32 inputs give the same value.
    got32 = similarity_adjusted_loss(img.float(), cell.float(), torch.tensor(tau))
    assert got32.item() == pytest.approx(got.item(), rel=1e-5)


def test_aligned_orthonormal_pairs_have_analytic_value():
    # img = cell = orthonormal rows: logits and similarity are both I/τ, so every row's target
    # equals its prediction p = softmax(e_i/τ) and the loss is the entropy of p.
    n, tau = 5, 0.2
    q_matrix, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    emb = q_matrix[:n]
    p_own = math.exp(1 / tau) / (math.exp(1 / tau) + n - 1)
    p_other = 1 / (math.exp(1 / tau) + n - 1)
    entropy = -p_own * math.log(p_own) - (n - 1) * p_other * math.log(p_other)
    assert similarity_adjusted_loss(emb, emb.clone(), tau).item() == pytest.approx(entropy, rel=1e-12)


def test_gradient_flows_through_the_targets_by_default_and_detach_makes_them_labels():
    g = torch.Generator().manual_seed(2)
    img, cell = random_unit_rows(g, 6, 4).requires_grad_(), random_unit_rows(g, 6, 4)
    (grad_detached,) = torch.autograd.grad(similarity_adjusted_loss(img, cell, 0.3, detach_targets=True), img)
    (grad_through,) = torch.autograd.grad(similarity_adjusted_loss(img, cell, 0.3), img)
    (grad_explicit,) = torch.autograd.grad(similarity_adjusted_loss(img, cell, 0.3, detach_targets=False), img)
    torch.testing.assert_close(grad_through, grad_explicit)  # the default: the authors' convention
    assert not torch.allclose(grad_detached, grad_through)
    # With detached targets the gradient is that of CE against constant targets.
    tau = 0.3
    targets = torch.softmax((cell @ cell.T + img.detach() @ img.detach().T) / (2 * tau), dim=-1)
    logits = cell @ img.T / tau
    expected = 0.5 * (
        -(targets * logits.log_softmax(-1)).sum(-1).mean() - (targets.T * logits.T.log_softmax(-1)).sum(-1).mean()
    )
    (grad_expected,) = torch.autograd.grad(expected, img)
    torch.testing.assert_close(grad_detached, grad_expected)


def test_bad_inputs_raise_one_clear_error():
    good = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(InputError, match="same"):
        similarity_adjusted_loss(good, good[:3], 0.1)
    with pytest.raises(InputError, match="normalised"):
        similarity_adjusted_loss(good * 2, good, 0.1, check_normalized=True)
    with pytest.raises(InputError, match="positive"):
        similarity_adjusted_loss(good, good, 0.0)


def test_temperature_stays_within_bounds():
    # SGD on ±τ with a huge step drives the raw parameter far out; τ = min + span·sigmoid(·) cannot follow.
    for sign, bound in ((-1.0, 1.0), (+1.0, 0.01)):
        temperature = LearnableTemperature(init_temperature=0.07)
        assert temperature.temperature == pytest.approx(0.07)
        optimizer = torch.optim.SGD(temperature.parameters(), lr=1e3)
        for _ in range(5):
            optimizer.zero_grad()
            (sign * temperature()).backward()
            optimizer.step()
            assert 0.01 * (1 - 1e-6) <= temperature.temperature <= 1.0  # float32(0.01) < 0.01
        assert temperature.temperature == pytest.approx(bound, abs=1e-3)


def test_retrieval_accuracy_identity_and_permutation():
    g = torch.Generator().manual_seed(3)
    img = random_unit_rows(g, 10, 16)
    assert retrieval_accuracy(img, img.clone()) == (1.0, 1.0)
    perm = torch.tensor([1, 0, 2, 3, 5, 4, 6, 8, 7, 9])  # fixed points: 2, 3, 6, 9
    expected = (perm == torch.arange(10)).double().mean().item()
    assert expected == pytest.approx(0.4)
    assert retrieval_accuracy(img, img[perm]) == (pytest.approx(expected), pytest.approx(expected))


# --- two gloo ranks -------------------------------------------------------------------------


def _full_batch_problem(dtype=torch.float64):
    """Inputs and a tiny linear 'encoder' per modality, identical in every process."""
    g = torch.Generator().manual_seed(7)
    x_img = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=dtype)
    x_cell = torch.randn(GLOBAL_BATCH, IN_DIM, generator=g, dtype=dtype)
    torch.manual_seed(11)
    img_encoder = torch.nn.Linear(IN_DIM, EMB_DIM).to(dtype)
    cell_encoder = torch.nn.Linear(IN_DIM, EMB_DIM).to(dtype)
    temperature = LearnableTemperature(init_temperature=0.2).to(dtype)
    modules = torch.nn.ModuleDict({"img": img_encoder, "cell": cell_encoder, "temperature": temperature})
    return x_img, x_cell, modules


def _rank_averaged_grads(modules) -> dict:
    """What DeepSpeed/DDP does with data-parallel gradients: average them over ranks."""
    grads = {}
    for name, param in modules.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        grads[name] = grad / WORLD_SIZE
    return grads


def _forward(modules, x_img, x_cell, detach_targets):
    img_emb = F.normalize(modules["img"](x_img), dim=-1)
    cell_emb = F.normalize(modules["cell"](x_cell), dim=-1)
    img_emb.retain_grad()
    cell_emb.retain_grad()
    loss = similarity_adjusted_loss(img_emb, cell_emb, modules["temperature"], detach_targets=detach_targets)
    return img_emb, cell_emb, loss


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        result = {}
        for detach_targets in DETACH_TARGETS:
            x_img, x_cell, modules = _full_batch_problem()
            img_emb, cell_emb, loss = _forward(modules, x_img[rows], x_cell[rows], detach_targets)
            loss.backward()
            param_grads = _rank_averaged_grads(modules)
            result[detach_targets] = {
                "loss": loss.detach(),
                "img_emb_grad": img_emb.grad,
                "cell_emb_grad": cell_emb.grad,
                "param_grads": param_grads,
            }
        result["accuracy"] = retrieval_accuracy(img_emb.detach(), cell_emb.detach())
        result["uneven_error"] = None
        try:
            similarity_adjusted_loss(img_emb[: 1 + rank].detach(), cell_emb[: 1 + rank].detach(), 0.1)
        except InputError as error:
            result["uneven_error"] = str(error)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        end_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    local = GLOBAL_BATCH // WORLD_SIZE
    for detach_targets in DETACH_TARGETS:
        x_img, x_cell, modules = _full_batch_problem()
        img_emb, cell_emb, loss = _forward(modules, x_img, x_cell, detach_targets)
        loss.backward()
        for r, result in enumerate(results):
            got = result[detach_targets]
            # The value on every rank is the full-batch value.
            assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6, rel=1e-10)
            # Embedding gradients: all_gather's backward sums every rank's contribution, so a
            # rank's rows carry world_size × the full-batch gradient; the data-parallel average
            # of parameter gradients undoes the factor.
            rows = slice(r * local, (r + 1) * local)
            torch.testing.assert_close(got["img_emb_grad"], WORLD_SIZE * img_emb.grad[rows])
            torch.testing.assert_close(got["cell_emb_grad"], WORLD_SIZE * cell_emb.grad[rows])
            # Parameter gradients averaged over ranks equal the single-process ones, τ's included.
            for name, param in modules.named_parameters():
                torch.testing.assert_close(got["param_grads"][name], param.grad, msg=name)
    for result in results:
        assert result["accuracy"] == retrieval_accuracy(img_emb.detach(), cell_emb.detach())
        assert result["uneven_error"] is not None and "same local batch size" in result["uneven_error"]


# --- target mixing (λ: (1 − λ)·I + λ·PAST targets) -----------------------------------------


def clip_hard_target_loss(img: torch.Tensor, cell: torch.Tensor, tau: float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, written independently: each pair's own column is the class."""
    logits = cell @ img.T / tau
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def test_target_mix_zero_is_clip_and_one_is_the_default():
    g = torch.Generator().manual_seed(4)
    img, cell = random_unit_rows(g, 7, 5).requires_grad_(), random_unit_rows(g, 7, 5)
    tau = 0.1
    got = similarity_adjusted_loss(img, cell, tau, target_mix=0.0)
    expected = clip_hard_target_loss(img, cell, tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad_got,) = torch.autograd.grad(got, img)
    (grad_expected,) = torch.autograd.grad(expected, img)
    torch.testing.assert_close(grad_got, grad_expected)
    # The PAST targets are not the identity here, so λ really changes the loss.
    assert similarity_adjusted_loss(img, cell, tau).item() != pytest.approx(got.item(), rel=1e-6)
    assert (
        similarity_adjusted_loss(img, cell, tau, target_mix=1.0).item()
        == similarity_adjusted_loss(img, cell, tau).item()
    )


@pytest.mark.parametrize("mix", [0.25, 0.7])
def test_target_mix_interpolates_between_clip_and_past(mix):
    g = torch.Generator().manual_seed(5)
    img, cell = random_unit_rows(g, 6, 4), random_unit_rows(g, 6, 4)
    tau = 0.3
    # CE is linear in its targets: CE((1 − λ)I + λT) = (1 − λ)·CE(I) + λ·CE(T).
    expected = (1 - mix) * clip_hard_target_loss(img, cell, tau).item() + mix * reference_loss(
        img.numpy(), cell.numpy(), tau
    )
    assert similarity_adjusted_loss(img, cell, tau, target_mix=mix).item() == pytest.approx(expected, rel=1e-10)


def test_target_mix_outside_unit_interval_raises():
    good = F.normalize(torch.randn(4, 3), dim=-1)
    for bad in (-0.1, 1.5):
        with pytest.raises(InputError, match="target_mix"):
            similarity_adjusted_loss(good, good, 0.1, target_mix=bad)


MIX = 0.4


def _mix_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        rows = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        x_img, x_cell, modules = _full_batch_problem()
        img_emb = F.normalize(modules["img"](x_img[rows]), dim=-1)
        cell_emb = F.normalize(modules["cell"](x_cell[rows]), dim=-1)
        loss = similarity_adjusted_loss(img_emb, cell_emb, modules["temperature"], target_mix=MIX)
        loss.backward()
        param_grads = _rank_averaged_grads(modules)
        torch.save({"loss": loss.detach(), "param_grads": param_grads}, Path(out_dir) / f"mix_rank{rank}.pt")
    finally:
        end_process_group()


def test_two_gloo_ranks_equal_single_process_with_target_mix(tmp_path):
    # The hard-target part needs each rank's own pairs at global columns rank·B_local + i.
    mp.spawn(_mix_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    x_img, x_cell, modules = _full_batch_problem()
    img_emb = F.normalize(modules["img"](x_img), dim=-1)
    cell_emb = F.normalize(modules["cell"](x_cell), dim=-1)
    loss = similarity_adjusted_loss(img_emb, cell_emb, modules["temperature"], target_mix=MIX)
    loss.backward()
    for r in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"mix_rank{r}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), abs=1e-6, rel=1e-10)
        for name, param in modules.named_parameters():
            torch.testing.assert_close(got["param_grads"][name], param.grad, msg=name)
