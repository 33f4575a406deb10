"""Exact values of the GRPO equations on hand-computed cases (docs/method.md, Stage 2 and process reward)."""
import math

import pytest
import torch

from unigrpo import group_advantages, grpo_loss, k3_kl, process_advantages


def test_group_advantages_hand_computed():
    # group 1: rewards 1, 2, 3, 6 -> mean 3, unbiased std sqrt(14/3)
    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.5, 0.5, 0.5, 0.5])
    a = group_advantages(r, 4, eps=0.0)
    std = math.sqrt(14 / 3)
    assert torch.allclose(a[:4], torch.tensor([-2 / std, -1 / std, 0.0, 3 / std]), atol=1e-6)
    # a group whose rewards are all equal: zero advantage, no NaN
    assert torch.equal(group_advantages(r, 4)[4:], torch.zeros(4))
    assert not torch.isnan(group_advantages(torch.ones(4), 4)).any()


def test_group_advantages_are_per_group():
    r = torch.tensor([0.0, 1.0, 10.0, 11.0])
    a = group_advantages(r, 2)
    assert torch.allclose(a[:2], a[2:]), "shifting a whole group must not change its advantages"


def test_process_advantages_suffix_sums():
    # G = 2 rows; steps: row 0 has rewards [1, 0, 1], row 1 has [0, NaN(no such step), 1]
    sr = torch.tensor([[1.0, 0.0, 1.0], [0.0, float("nan"), 1.0]])
    # collection {1, 0, 1, 0, 1}: mean 0.6, unbiased std sqrt(0.3)
    s = math.sqrt(0.3)
    n1, n0 = (1 - 0.6) / s, (0 - 0.6) / s
    token_step = torch.tensor([[0, 0, 1, 2, 3], [0, 2, 2, 3, 3]])  # step 3: past the last rewarded step
    adv = process_advantages(sr, token_step, 2, eps=0.0)
    row0 = [n1 + n0 + n1, n1 + n0 + n1, n0 + n1, n1, 0.0]
    row1 = [n0 + n1, n1, n1, 0.0, 0.0]  # the missing step adds nothing
    assert torch.allclose(adv, torch.tensor([row0, row1]), atol=1e-6)


def test_process_advantages_all_equal_steps_are_zero():
    sr = torch.ones(4, 2)
    adv = process_advantages(sr, torch.zeros(4, 3, dtype=torch.long), 4)
    assert torch.equal(adv, torch.zeros(4, 3))


def test_k3_kl_values():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    d = ref - logp
    assert torch.allclose(k3_kl(logp, ref), torch.exp(d) - d - 1)
    assert k3_kl(logp, ref)[0] == 0 and (k3_kl(logp, ref) >= 0).all()
    assert k3_kl(torch.tensor([-2.0]), torch.tensor([-1.0])).item() == pytest.approx(math.e - 2, abs=1e-6)


def _loss(ratio, adv, eps=0.2, **kw):
    logp = torch.log(torch.tensor([[ratio]]))
    return grpo_loss(logp, torch.zeros(1, 1), logp, torch.tensor([[adv]]), torch.ones(1, 1), clip_eps=eps, kl_beta=0.0, **kw)


def test_clipped_objective_both_sides():
    # positive advantage: gain capped at 1 + eps; negative: penalty floor at 1 - eps
    assert _loss(1.5, 2.0)[0].item() == pytest.approx(-1.2 * 2.0)
    assert _loss(1.1, 2.0)[0].item() == pytest.approx(-1.1 * 2.0)
    assert _loss(0.5, 2.0)[0].item() == pytest.approx(-0.5 * 2.0)   # min picks the unclipped (worse) side
    assert _loss(0.5, -1.0)[0].item() == pytest.approx(0.8)
    assert _loss(1.5, -1.0)[0].item() == pytest.approx(1.5)
    assert _loss(1.5, 2.0)[1]["clip_ratio"] == 1.0 and _loss(1.1, 2.0)[1]["clip_ratio"] == 0.0


def test_clipped_gradient_is_zero_outside_the_trust_region():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = grpo_loss(logp, torch.zeros(1, 1), logp.detach(), torch.tensor([[1.0]]), torch.ones(1, 1), kl_beta=0.0)
    loss.backward()
    assert logp.grad.item() == 0.0


def test_kl_term_and_normalisations():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    beta = 0.5
    kl0 = math.exp(-1) + 1 - 1  # k3 at d = -1
    # sequence: mean over each row's tokens, then over rows
    seq = ((3 * 1.0 - beta * kl0) / 3 + (-1.0)) / 2
    tok = (3 * 1.0 - beta * kl0 - 1.0) / 4
    ls, st = grpo_loss(logp, logp, ref, adv, mask, kl_beta=beta, loss_type="sequence")
    lt, _ = grpo_loss(logp, logp, ref, adv, mask, kl_beta=beta, loss_type="token")
    assert ls.item() == pytest.approx(-seq, abs=1e-6)
    assert lt.item() == pytest.approx(-tok, abs=1e-6)
    assert st["kl"] == pytest.approx(kl0 / 4, abs=1e-6)


def test_t_interval_known_values():
    import eval as E
    # two-sided 95% critical values of Student's t (any table): df 1, 2, 4, 9, 30
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert E.t_quantile(0.975, df) == pytest.approx(t, abs=1e-3)
    assert E.t_cdf(0.0, 3) == pytest.approx(0.5) and E.t_cdf(2.0, 4) == pytest.approx(0.94194, abs=1e-5)
    # diffs 1..5: mean 3, sd sqrt(2.5), se sqrt(0.5); half-width 2.776 * 0.7071; p from t = 4.243 at df 4
    m, half, p = E.paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3 and half == pytest.approx(2.7764 * math.sqrt(0.5), abs=1e-3) and p == pytest.approx(0.01324, abs=2e-4)
    assert E.paired_interval([0.5]) == (0.5, None, None)
    assert E.paired_interval([0.1, -0.1])[2] == pytest.approx(1.0)


def test_batch_scaled_advantages_hand_computed():
    # deviations from the group means: group 1 (1, 3) -> -1, +1; group 2 (5, 5.2) -> -0.1, +0.1
    # one std for the batch: sqrt((1 + 1 + 0.01 + 0.01) / 3)
    r = torch.tensor([1.0, 3.0, 5.0, 5.2])
    std = math.sqrt(2.02 / 3)
    a = group_advantages(r, 2, eps=0.0, scale="batch")
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, -0.1, 0.1]) / std, atol=1e-5)
    # per group, the 0.2 gap of group 2 is scaled up to the advantages of group 1's gap of 2
    assert torch.allclose(group_advantages(r, 2, eps=0.0), torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(2), atol=1e-4)
    # process rewards: one std over all the batch's deviations from their group's step mean
    sr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.7]])  # G = 2: groups {1,0,0,1}, {.5,.5,.5,.7}
    dev = torch.tensor([[0.5, -0.5], [-0.5, 0.5], [-0.05, -0.05], [-0.05, 0.15]])
    s = dev.pow(2).sum().div(7).sqrt()
    adv = process_advantages(sr, torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]]), 2, eps=0.0, scale="batch")
    norm = dev / s
    assert torch.allclose(adv, torch.stack([norm.sum(1), norm[:, 1]], 1), atol=1e-5)
