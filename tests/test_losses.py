"""Tests for dpo_trainer.losses: hand-derived values, naive float64 references, invariants, registry."""

import copy
import inspect
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from dpo_trainer.losses import (
    DEPRECATED_F_DIVERGENCES,
    DEPRECATED_LOSS_NAMES,
    F_DIVERGENCES,
    LOSSES,
    RunningMean,
    check_loss_settings,
    f_divergence_scores,
    loss_names,
    loss_uses,
    needs_reward_shift,
    plackett_luce_loss,
    preference_loss,
    register_loss,
)

BUILTINS = (
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "bco_pair_paper",
    "cdpo",
    "discopop",
    "exo_pair",
    "hinge",
    "ipo",
    "ipo_paper",
    "nca_pair",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "sppo_hard",
)
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def pair_with_h(h, dtype=torch.float64):
    """Four (1,)-tensors whose difference of log-ratios is exactly ``h`` (ref_chosen carries it)."""
    return t(-5.0, dtype=dtype), t(-2.0, dtype=dtype), t(-5.0 - h, dtype=dtype), t(-2.0, dtype=dtype)


# ---------------------------------------------------------------- hand-derived values


def test_sigmoid_at_zero_margin_is_ln2():
    """h = 0: -log sigmoid(0) = -log(1/2) = ln 2, whatever beta; rewards are beta * log-ratio."""
    losses, chosen, rejected = preference_loss(t(-3.0), t(-7.0), t(-3.0), t(-7.0), beta=0.37)
    torch.testing.assert_close(losses, t(math.log(2)))
    torch.testing.assert_close(chosen, t(0.0))
    torch.testing.assert_close(rejected, t(0.0))


def test_sigmoid_hand_value():
    """beta h = ln 3: sigmoid(ln 3) = 3 / (3 + 1) = 3/4, so the loss is -ln(3/4) = ln(4/3)."""
    losses, _, _ = preference_loss(*pair_with_h(2 * math.log(3)), beta=0.5)
    torch.testing.assert_close(losses, t(math.log(4 / 3)))


def test_cdpo_hand_values():
    """Conservative DPO (Mitchell 2023): -(1 - eps) ln sigmoid(beta h) - eps ln sigmoid(-beta h).
    eps = 1/4, beta h = ln 3: sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4, so the loss is
    -(3/4) ln(3/4) - (1/4) ln(1/4) = (3/4) ln(4/3) + (1/4) ln 4, the entropy of (3/4, 1/4); and ln 3 = ln((1 - eps)
    / eps) is the minimum: the gradient -(1 - eps) sigmoid(-x) + eps sigmoid(x) = -(3/4)(1/4) + (1/4)(3/4) = 0.
    beta h = 0 gives ln 2 whatever eps; beta h = -ln 3 swaps the two logs: (3/4) ln 4 + (1/4) ln(4/3)."""
    pc, pr, rc, rr = pair_with_h(math.log(3))
    pc.requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=1.0, loss_type="cdpo", label_smoothing=0.25)
    torch.testing.assert_close(losses, t(0.75 * math.log(4 / 3) + 0.25 * math.log(4)))
    (grad,) = torch.autograd.grad(losses.sum(), pc)
    torch.testing.assert_close(grad, t(0.0))
    at_zero, _, _ = preference_loss(*pair_with_h(0.0), beta=0.7, loss_type="cdpo", label_smoothing=0.1)
    torch.testing.assert_close(at_zero, t(math.log(2)))
    wrong_way, _, _ = preference_loss(
        *pair_with_h(-2 * math.log(3)), beta=0.5, loss_type="cdpo", label_smoothing=0.25
    )
    torch.testing.assert_close(wrong_way, t(0.75 * math.log(4) + 0.25 * math.log(4 / 3)))


def test_sigmoid_takes_no_label_smoothing_and_the_error_names_cdpo():
    """TRL 1.16's sigmoid ignores label_smoothing; ours refuses it (rather than train silently without it) and
    names cdpo, conservative DPO, which is what sigmoid with label_smoothing computed in earlier releases."""
    for loss_type in ("sigmoid", ["sigmoid"], ["sigmoid", "hinge"]):
        with pytest.raises(ValueError) as excinfo:
            preference_loss(*pair_with_h(1.0), loss_type=loss_type, label_smoothing=0.1)
        message = str(excinfo.value)
        assert "label_smoothing=0.1 is not used by loss_type" in message
        assert "the losses that use it: aot, aot_unpaired, cdpo, exo_pair, robust." in message
        assert "TRL 1.16's sigmoid ignores label_smoothing too" in message
        assert "conservative DPO" in message and "loss_type='cdpo'" in message
    assert not loss_uses("sigmoid", "label_smoothing")
    assert loss_uses("cdpo", "label_smoothing")
    assert "label_smoothing" not in inspect.signature(LOSSES["sigmoid"]).parameters
    # eps = 0 with sigmoid is the default and fine; so is a list in which another loss uses eps (as in TRL,
    # sigmoid's part is then plain DPO: eps goes to the losses that take it)
    pc, pr, rc, rr = pair_with_h(math.log(3))
    mixed, _, _ = preference_loss(
        pc, pr, rc, rr, beta=1.0, loss_type=["sigmoid", "robust"], label_smoothing=0.25
    )
    torch.testing.assert_close(mixed, t(math.log(4 / 3) + math.log(4 / 3**1.5)))


def test_cdpo_at_zero_eps_is_sigmoid():
    """eps = 0 is allowed with cdpo (no flips assumed): values and gradients are sigmoid's, bit for bit."""
    pc, pr, rc, rr, beta = random_pair_logps("batch7_large", torch.float64)
    pc.requires_grad_(True)
    cdpo, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=0.0)
    sigmoid, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    torch.testing.assert_close(cdpo, sigmoid, rtol=0, atol=0)
    (grad_cdpo,) = torch.autograd.grad(cdpo.sum(), pc)
    (grad_sigmoid,) = torch.autograd.grad(sigmoid.sum(), pc)
    torch.testing.assert_close(grad_cdpo, grad_sigmoid, rtol=0, atol=0)
    assert check_loss_settings("cdpo") == ["cdpo"]


def test_ipo_paper_hand_values():
    """IPO Eq. 17 on summed log-probs. beta = 1/4 so 1/(2 beta) = 2: h = 5 gives (5 - 2)^2 = 9, h = 2 gives 0,
    h = -1 gives 9; the token counts play no part."""
    lengths = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([7]))
    for h, expected in [(5.0, 9.0), (2.0, 0.0), (-1.0, 9.0)]:
        losses, _, _ = preference_loss(*pair_with_h(h), beta=0.25, loss_type="ipo_paper")
        torch.testing.assert_close(losses, t(expected))
        losses, _, _ = preference_loss(*pair_with_h(h), beta=0.25, loss_type="ipo_paper", **lengths)
        torch.testing.assert_close(losses, t(expected))


def test_ipo_hand_values():
    """TRL's ipo: per-token means. lr_w = h over n_w = 2 tokens, lr_l = 0; beta = 1/4 so 1/(2 beta) = 2:
    h = 10 gives (5 - 2)^2 = 9, h = 4 gives 0, h = -2 gives (-1 - 2)^2 = 9. n = 0 counts as 1 token."""
    lengths = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([7]))
    for h, expected in [(10.0, 9.0), (4.0, 0.0), (-2.0, 9.0)]:
        losses, _, _ = preference_loss(*pair_with_h(h), beta=0.25, loss_type="ipo", **lengths)
        torch.testing.assert_close(losses, t(expected))
    empty = dict(chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([0]))
    losses, _, _ = preference_loss(*pair_with_h(5.0), beta=0.25, loss_type="ipo", **empty)
    torch.testing.assert_close(losses, t(9.0))
    with pytest.raises(ValueError, match="'ipo' needs chosen_lengths"):
        preference_loss(*pair_with_h(5.0), beta=0.25, loss_type="ipo")


def test_hinge_hand_values():
    """beta = 1/2: relu(1 - h/2) is 1/2 at h = 1, 0 at h = 4 (margin met), 2 at h = -2."""
    for h, expected in [(1.0, 0.5), (4.0, 0.0), (-2.0, 2.0)]:
        losses, _, _ = preference_loss(*pair_with_h(h), beta=0.5, loss_type="hinge")
        torch.testing.assert_close(losses, t(expected))


def test_robust_hand_value():
    """eps = 1/4, beta h = ln 3: (-(3/4) ln(3/4) + (1/4) ln(1/4)) / (1/2)
    = (3/2) ln(4/3) - (1/2) ln 4 = ln 4 - (3/2) ln 3 = ln(4 / 3^1.5) < 0 (an unbiased estimate may be negative)."""
    losses, _, _ = preference_loss(
        *pair_with_h(math.log(3)), beta=1.0, loss_type="robust", label_smoothing=0.25
    )
    torch.testing.assert_close(losses, t(math.log(4 / 3**1.5)))


def test_robust_and_cdpo_with_zero_eps_equal_plain_dpo():
    """eps = 0: both extra terms vanish and the divisor is 1, leaving -log sigmoid(beta h), written out here."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-100 * torch.rand(9, generator=gen, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    plain = -torch.log(1 / (1 + torch.exp(-beta * ((pc - rc) - (pr - rr)))))
    cdpo, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=0.0)
    robust, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(cdpo, plain)
    torch.testing.assert_close(robust, plain)
    # and eps > 0 does change cDPO (the same call is not vacuously equal)
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="cdpo", label_smoothing=0.1)
    assert (smoothed - plain).abs().max() > 1e-3


def test_plackett_luce_k3_hand_value():
    """beta = 1, r = (ln 3, ln 2, 0): P(ranking) = 3/(3+2+1) * 2/(2+1) = 1/3, loss = ln 3.
    A constant ref and a constant added to every policy log-prob shift all r_k equally: no change."""
    policy = t(math.log(3), math.log(2), 0.0).unsqueeze(0)
    torch.testing.assert_close(plackett_luce_loss(policy, torch.zeros_like(policy), beta=1.0), t(math.log(3)))
    shifted = plackett_luce_loss(policy - 40.0, torch.full_like(policy, -7.0), beta=1.0)
    torch.testing.assert_close(shifted, t(math.log(3)))


# ---------------------------------------------------------------- naive float64 references


def naive_pairwise(loss_type, pc, pr, rc, rr, beta, eps):
    """The formulas written out with exp/log, no stable primitives."""
    h = (pc - rc) - (pr - rr)
    x = beta * h
    log_sig = torch.log(1 / (1 + torch.exp(-x)))
    log_sig_neg = torch.log(1 / (1 + torch.exp(x)))
    if loss_type == "sigmoid":
        return -log_sig
    if loss_type == "cdpo":
        return -(1 - eps) * log_sig - eps * log_sig_neg
    if loss_type == "robust":
        return (-(1 - eps) * log_sig + eps * log_sig_neg) / (1 - 2 * eps)
    if loss_type == "ipo_paper":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.where(1 - x > 0, 1 - x, torch.zeros_like(x))
    raise AssertionError(loss_type)


def naive_plackett_luce(policy, ref, beta):
    r = beta * (policy - ref)
    loss = torch.zeros(r.shape[0], dtype=r.dtype)
    for k in range(r.shape[1] - 1):
        loss = loss - (r[:, k] - torch.log(torch.exp(r[:, k:]).sum(-1)))
    return loss


# name -> (batch, centre of the summed log-probs, spread of policy - ref, beta)
SHAPES = {
    "realistic": (32, -200.0, 5.0, 0.1),
    "batch1": (1, -20.0, 1.0, 0.5),
    "batch7_large": (7, -300.0, 40.0, 1.0),  # beta h reaches +-100: stable logsigmoid needed in float32
}


def random_pair_logps(shape_name, dtype, seed=0):
    batch, centre, spread, beta = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(seed)
    ref = centre + 0.5 * centre * torch.rand(2, batch, generator=gen, dtype=torch.float64)
    policy = ref + spread * torch.randn(2, batch, generator=gen, dtype=torch.float64)
    pc, pr, rc, rr = (x.to(dtype) for x in (policy[0], policy[1], ref[0], ref[1]))
    return pc, pr, rc, rr, beta


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [
        ("sigmoid", 0.0),
        ("cdpo", 0.0),
        ("cdpo", 0.2),
        ("robust", 0.2),
        ("ipo_paper", 0.0),
        ("hinge", 0.0),
    ],
)
def test_pairwise_values_and_gradients_match_naive(loss_type, eps, shape_name, dtype):
    pc, pr, rc, rr, beta = random_pair_logps(shape_name, dtype)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    grads = torch.autograd.grad(losses.sum(), (pc, pr))

    ref_inputs = [x.detach().double().requires_grad_(True) for x in (pc, pr)]
    expected = naive_pairwise(loss_type, *ref_inputs, rc.double(), rr.double(), beta, eps)
    expected_grads = torch.autograd.grad(expected.sum(), ref_inputs)

    assert losses.dtype == dtype and losses.shape == pc.shape
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.double(), expected, **TOL[dtype])
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad, **TOL[dtype])


PL_SHAPES = {"realistic": (16, 4, 0.1), "batch1_k2": (1, 2, 0.5), "batch7_k5_large": (7, 5, 1.0)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_name", list(PL_SHAPES))
def test_plackett_luce_values_and_gradients_match_naive_loop(shape_name, dtype):
    batch, k, beta = PL_SHAPES[shape_name]
    gen = torch.Generator().manual_seed(1)
    ref = -300.0 * torch.rand(batch, k, generator=gen, dtype=torch.float64)
    policy = (ref + 20.0 * torch.randn(batch, k, generator=gen, dtype=torch.float64)).to(dtype)
    ref = ref.to(dtype)
    policy.requires_grad_(True)
    losses = plackett_luce_loss(policy, ref, beta=beta)
    (grad,) = torch.autograd.grad(losses.sum(), policy)

    policy64 = policy.detach().double().requires_grad_(True)
    expected = naive_plackett_luce(policy64, ref.double(), beta)
    (expected_grad,) = torch.autograd.grad(expected.sum(), policy64)

    assert losses.dtype == dtype and losses.shape == (batch,)
    torch.testing.assert_close(losses.double(), expected, **TOL[dtype])
    torch.testing.assert_close(grad.double(), expected_grad, **TOL[dtype])


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rewards_are_detached_and_equal_beta_times_logratio(shape_name):
    pc, pr, rc, rr, beta = random_pair_logps(shape_name, torch.float64)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, chosen, rejected = preference_loss(pc, pr, rc, rr, beta=beta)
    assert losses.requires_grad
    assert not chosen.requires_grad and not rejected.requires_grad
    torch.testing.assert_close(chosen, beta * (pc.detach() - rc))
    torch.testing.assert_close(rejected, beta * (pr.detach() - rr))


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_plackett_luce_with_two_responses_equals_sigmoid(shape_name):
    pc, pr, rc, rr, beta = random_pair_logps(shape_name, torch.float64)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    sigmoid, _, _ = preference_loss(pc, pr, rc, rr, beta=beta)
    pl = plackett_luce_loss(torch.stack([pc, pr], dim=1), torch.stack([rc, rr], dim=1), beta=beta)
    torch.testing.assert_close(pl, sigmoid)
    grads_pl = torch.autograd.grad(pl.sum(), (pc, pr))
    grads_sigmoid = torch.autograd.grad(sigmoid.sum(), (pc, pr))
    for grad_pl, grad_sigmoid in zip(grads_pl, grads_sigmoid):
        torch.testing.assert_close(grad_pl, grad_sigmoid)


def test_plackett_luce_depends_on_the_order_of_columns():
    """The ranking is read from the column order: swapping any two distinct columns changes the loss."""
    gen = torch.Generator().manual_seed(2)
    policy = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    ref = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    base = plackett_luce_loss(policy, ref, beta=1.0)
    for perm in ([1, 0, 2, 3], [0, 1, 3, 2], [3, 2, 1, 0]):
        permuted = plackett_luce_loss(policy[:, perm], ref[:, perm], beta=1.0)
        assert (permuted - base).abs().min() > 1e-6


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_robust_is_unbiased_under_label_flips(eps):
    """Flipping a label swaps chosen and rejected (h -> -h); averaging the robust loss over flips with
    rate eps gives the clean DPO loss: (1 - eps) rDPO(h) + eps rDPO(-h) = -log sigmoid(beta h)."""
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-50 * torch.rand(64, generator=gen, dtype=torch.float64) for _ in range(4))
    beta = 0.7
    kept, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    flipped, _, _ = preference_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    clean = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close((1 - eps) * kept + eps * flipped, clean)


# ---------------------------------------------------------------- registry


@pytest.fixture
def scratch_loss_name():
    name = "test_scratch_loss"
    yield name
    LOSSES.pop(name, None)


def test_builtin_names_are_registered_and_sorted():
    assert set(BUILTINS) <= set(loss_names())
    assert loss_names() == tuple(sorted(LOSSES))


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss_type 'nope'") as excinfo:
        preference_loss(*pair_with_h(0.0), loss_type="nope")
    for name in BUILTINS:
        assert name in str(excinfo.value)


def test_registered_loss_is_used_by_preference_loss(scratch_loss_name):
    @register_loss(scratch_loss_name)
    def scaled_margin(h, *, beta, label_smoothing):
        return -beta * h + label_smoothing

    assert scratch_loss_name in loss_names()
    losses, _, _ = preference_loss(
        *pair_with_h(3.0), beta=0.5, loss_type=scratch_loss_name, label_smoothing=0.1
    )
    torch.testing.assert_close(losses, t(-1.5 + 0.1))


def test_duplicate_registration_raises_unless_overwrite(scratch_loss_name):
    register_loss(scratch_loss_name)(lambda h, *, beta, label_smoothing: h)
    with pytest.raises(ValueError, match="already registered"):
        register_loss(scratch_loss_name)(lambda h, *, beta, label_smoothing: 2 * h)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("sigmoid")
    register_loss(scratch_loss_name, overwrite=True)(lambda h, *, beta, label_smoothing: 2 * h)
    losses, _, _ = preference_loss(*pair_with_h(3.0), loss_type=scratch_loss_name)
    torch.testing.assert_close(losses, t(6.0))


def test_custom_loss_with_wrong_shape_is_rejected(scratch_loss_name):
    register_loss(scratch_loss_name)(lambda h, *, beta, label_smoothing: h.sum())
    with pytest.raises(ValueError, match="returned shape"):
        preference_loss(*pair_with_h(1.0), loss_type=scratch_loss_name)


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan")])
def test_non_positive_beta_raises(beta):
    with pytest.raises(ValueError, match="beta must be > 0"):
        preference_loss(*pair_with_h(1.0), beta=beta)
    with pytest.raises(ValueError, match="beta must be > 0"):
        plackett_luce_loss(torch.zeros(2, 3), torch.zeros(2, 3), beta=beta)


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.5, 0.7])
def test_label_smoothing_out_of_range_raises(label_smoothing):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        preference_loss(*pair_with_h(1.0), label_smoothing=label_smoothing)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "nca_pair", "sigmoid_norm", ["ipo", "hinge"]])
def test_label_smoothing_rejected_by_losses_that_ignore_it(loss_type):
    with pytest.raises(
        ValueError,
        match=r"label_smoothing=0.1 is not used by loss_type.*: aot, aot_unpaired, cdpo, exo_pair, robust$",
    ):
        preference_loss(*pair_with_h(1.0), loss_type=loss_type, label_smoothing=0.1)


def test_label_smoothing_accepted_when_one_listed_loss_uses_it():
    """MPO-style lists: eps is used by the losses that take it and ignored by the others."""
    pc, pr, rc, rr = pair_with_h(1.0)
    lengths = dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([4]))
    mixed, _, _ = preference_loss(
        pc, pr, rc, rr, loss_type=["exo_pair", "sft"], label_smoothing=0.01, **lengths
    )
    exo, _, _ = preference_loss(pc, pr, rc, rr, loss_type="exo_pair", label_smoothing=0.01)
    sft, _, _ = preference_loss(pc, pr, rc, rr, loss_type="sft", **lengths)
    torch.testing.assert_close(mixed, exo + sft)


def test_shape_mismatch_names_the_shapes():
    with pytest.raises(ValueError, match=r"same shape.*\(3,\).*\(4,\)"):
        preference_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        preference_loss(*(torch.zeros(2, 3) for _ in range(4)))


def test_integer_logps_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        preference_loss(*(torch.zeros(3, dtype=torch.long) for _ in range(4)))


@pytest.mark.parametrize(
    ("policy_shape", "ref_shape", "message"),
    [((4,), (4,), r"\(batch, K\)"), ((2, 3), (2, 4), r"\(2, 3\) and \(2, 4\)"), ((3, 1), (3, 1), "K >= 2")],
)
def test_plackett_luce_shape_validation(policy_shape, ref_shape, message):
    with pytest.raises(ValueError, match=message):
        plackett_luce_loss(torch.zeros(policy_shape), torch.zeros(ref_shape))


# ---------------------------------------------------------------- TRL 1.16's loss family: naive float64 references


def naive_sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def naive_log_sigmoid(x):
    return -torch.log1p(torch.exp(-x))  # log(1/(1+exp(-x))) whose gradient does not underflow at x ~ -700


def naive_f_prime(logratio, f_type, alpha):
    """f'(u) - f'(1) at u = pi / pi_ref, from the f-divergence's definition (f-DPO, arXiv 2309.16240, Table 1)."""
    u = torch.exp(logratio)
    if f_type == "reverse_kl":
        return torch.log(u)
    if f_type == "forward_kl":
        return 1 - 1 / u
    if f_type == "js_divergence":
        return torch.log(2 * u / (1 + u))
    if f_type == "alpha_divergence":  # TRL 1.16's code
        return (u ** (alpha - 1) - 1) / (alpha - 1)
    if f_type == "alpha_divergence_paper":  # the paper's Table 1
        return (1 - u ** (-alpha)) / alpha
    raise AssertionError(f_type)


def naive_family(
    loss_type, pc, pr, rc, rr, nw, nl, *, beta, eps=0.0, tau=0.05, delta=0.0, f_type="reverse_kl", alpha=0.5
):
    """Each loss written from its paper's formula with exp/log; sorting via argsort for AOT."""
    lw, ll = pc - rc, pr - rr
    sw, sl = naive_f_prime(lw, f_type, alpha), naive_f_prime(ll, f_type, alpha)
    x = beta * (sw - sl)
    nw, nl = nw.clamp_min(1).double(), nl.clamp_min(1).double()
    if loss_type == "sigmoid":
        return -naive_log_sigmoid(x)
    if loss_type == "cdpo":  # conservative DPO (Mitchell 2023)
        return -(1 - eps) * naive_log_sigmoid(x) - eps * naive_log_sigmoid(-x)
    if loss_type == "ipo_paper":  # IPO Eq. 17 on summed log-probs
        return (sw - sl - 1 / (2 * beta)) ** 2
    if loss_type == "ipo":  # TRL 1.16: Eq. 17 on per-token means
        return (sw / nw - sl / nl - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.where(1 - x > 0, 1 - x, torch.zeros_like(x))
    if loss_type == "robust":
        return (-(1 - eps) * naive_log_sigmoid(x) + eps * naive_log_sigmoid(-x)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        qw, ql = naive_sigmoid(x), naive_sigmoid(-x)
        return qw * (torch.log(qw) - math.log(1 - eps)) + ql * (torch.log(ql) - math.log(eps))
    if loss_type == "nca_pair":
        rw, rl = beta * lw, beta * ll
        return -naive_log_sigmoid(rw) - 0.5 * naive_log_sigmoid(-rw) - 0.5 * naive_log_sigmoid(-rl)
    if loss_type in ("bco_pair", "bco_pair_paper"):  # TRL 1.16 has no reward shift; the paper's delta
        d = delta if loss_type == "bco_pair_paper" else 0.0
        return -naive_log_sigmoid(beta * lw - d) - naive_log_sigmoid(d - beta * ll)
    if loss_type == "sppo_hard":
        return (lw - 1 / (2 * beta)) ** 2 + (ll + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - naive_sigmoid(beta * lw) + naive_sigmoid(beta * ll)
    if loss_type == "apo_down":
        return naive_sigmoid(beta * lw) + 1 - naive_sigmoid(beta * (lw - ll))
    if loss_type == "discopop":
        modulation = torch.sigmoid(
            x / tau
        )  # the naive 1/(1+exp(-x/tau)) has a NaN gradient at |x/tau| ~ 2000
        return (1 - modulation) * -naive_log_sigmoid(x) + modulation * torch.exp(-x)
    if loss_type == "sigmoid_norm":
        return -naive_log_sigmoid(beta * (sw / nw - sl / nl))
    if loss_type == "sft":
        token_mean_nll = -pc.sum() / nw.sum()
        return token_mean_nll * len(pc) * pc / pc.sum()  # each example's share, batch mean = token mean
    if loss_type in ("aot", "aot_unpaired"):
        a, b = (pc - pr, rc - rr) if loss_type == "aot" else (lw, ll)
        d = a[torch.argsort(a)] - b[torch.argsort(b)]
        return -(1 - eps) * naive_log_sigmoid(beta * d) - eps * naive_log_sigmoid(-beta * d)
    raise AssertionError(loss_type)


FAMILY = [  # (loss_type, label_smoothing, extra keywords)
    ("exo_pair", 1e-3, {}),
    ("exo_pair", 0.2, {}),
    ("nca_pair", 0.0, {}),
    ("bco_pair_paper", 0.0, {"reward_shift": 0.37}),
    ("bco_pair_paper", 0.0, {}),
    ("bco_pair", 0.0, {}),
    ("sppo_hard", 0.0, {}),
    ("aot", 0.0, {}),
    ("aot", 0.2, {}),
    ("aot_unpaired", 0.1, {}),
    ("apo_zero", 0.0, {}),
    ("apo_down", 0.0, {}),
    ("discopop", 0.0, {"discopop_tau": 0.05}),
    ("discopop", 0.0, {"discopop_tau": 2.0}),
    ("sft", 0.0, {}),
    ("sigmoid_norm", 0.0, {}),
    ("ipo", 0.0, {}),
    ("ipo_paper", 0.0, {}),
]


def random_lengths(batch, seed=5):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 40, (2, batch), generator=gen)
    return lengths[0], lengths[1]  # zeros included now and then: clamped to 1 token, as TRL does


def check_against_naive(loss_type, eps, extra, shape_name, dtype, f_type="reverse_kl", alpha=0.5):
    pc, pr, rc, rr, beta = random_pair_logps(shape_name, dtype)
    nw, nl = random_lengths(len(pc))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, _, _ = preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths=nw,
        rejected_lengths=nl,
        f_divergence_type=f_type,
        f_alpha_divergence_coef=alpha,
        **extra,
    )
    grads = torch.autograd.grad(losses.sum(), (pc, pr), allow_unused=True)

    ref_inputs = [x.detach().double().requires_grad_(True) for x in (pc, pr)]
    naive_extra = {{"reward_shift": "delta", "discopop_tau": "tau"}[k]: v for k, v in extra.items()}
    expected = naive_family(
        loss_type,
        *ref_inputs,
        rc.double(),
        rr.double(),
        nw,
        nl,
        beta=beta,
        eps=eps,
        f_type=f_type,
        alpha=alpha,
        **naive_extra,
    )
    expected_grads = torch.autograd.grad(expected.sum(), ref_inputs, allow_unused=True)

    assert losses.dtype == dtype and losses.shape == pc.shape
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses.double(), expected, **TOL[dtype])
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:  # e.g. sft does not depend on the rejected response
            assert grad is None or not grad.any()
            continue
        torch.testing.assert_close(grad.double(), expected_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("loss_type", "eps", "extra"), FAMILY, ids=[f"{n}-{e}-{x}" for n, e, x in FAMILY])
def test_family_values_and_gradients_match_naive(loss_type, eps, extra, shape_name, dtype):
    check_against_naive(loss_type, eps, extra, shape_name, dtype)


F_DIVERGENCE_CASES = [
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 0.3),
    ("alpha_divergence", 0.7),
    ("alpha_divergence_paper", 0.3),
    ("alpha_divergence_paper", 0.7),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shape_name", ["realistic", "batch1"]
)  # |log-ratio| <~ 15: u = exp(log-ratio) stays finite
@pytest.mark.parametrize(("f_type", "alpha"), F_DIVERGENCE_CASES)
@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [
        ("sigmoid", 0.0),
        ("cdpo", 0.1),
        ("hinge", 0.0),
        ("ipo_paper", 0.0),
        ("robust", 0.1),
        ("exo_pair", 0.01),
        ("discopop", 0.0),
        ("sigmoid_norm", 0.0),
        ("ipo", 0.0),
        ("sft", 0.0),
    ],
)
def test_f_divergences_match_naive(loss_type, eps, f_type, alpha, shape_name, dtype):
    check_against_naive(loss_type, eps, {}, shape_name, dtype, f_type=f_type, alpha=alpha)


def test_f_divergence_special_cases():
    """alpha_divergence_paper is the paper's (1 - u^-a)/a: a -> 0 is reverse KL, a = 1 forward KL.
    alpha_divergence is TRL's code, (u^(a-1) - 1)/(a - 1): the paper's at 1 - a, and reverse KL at a = 1."""
    lr = torch.linspace(-6, 6, 25, dtype=torch.float64)
    close = torch.testing.assert_close
    close(f_divergence_scores(lr, "alpha_divergence_paper", 1e-9), lr)
    close(f_divergence_scores(lr, "alpha_divergence_paper", 1.0), f_divergence_scores(lr, "forward_kl"))
    close(f_divergence_scores(lr, "alpha_divergence", 1.0), lr)
    close(f_divergence_scores(lr, "alpha_divergence", 1e-9), f_divergence_scores(lr, "forward_kl"))
    for a in (0.3, 0.5, 0.7):
        close(
            f_divergence_scores(lr, "alpha_divergence", a),
            f_divergence_scores(lr, "alpha_divergence_paper", 1 - a),
        )
    # the two forms differ away from a = 0.5
    assert (
        f_divergence_scores(lr, "alpha_divergence", 0.3)
        - f_divergence_scores(lr, "alpha_divergence_paper", 0.3)
    ).abs().max() > 1
    for f_type in F_DIVERGENCES:  # every score vanishes where the policy equals the reference
        assert f_divergence_scores(torch.zeros(1, dtype=torch.float64), f_type, 0.3).abs().item() < 1e-12
    # large log-ratios stay finite in float32: the exponent is capped at 80, as in TRL
    for f_type in ("alpha_divergence", "alpha_divergence_paper"):
        assert torch.isfinite(f_divergence_scores(torch.tensor([-500.0, 500.0]), f_type, 0.3)).all()


def test_alpha_divergence_hand_values():
    """u = 4 (log-ratio ln 4). TRL's form at a = 0.5: (4^-0.5 - 1)/(-0.5) = 1; at a = 0.3: (4^-0.7 - 1)/(-0.7)
    = (1 - 2^-1.4)/0.7. The paper's at a = 0.3: (1 - 4^-0.3)/0.3 = (1 - 2^-0.6)/0.3."""
    lr = t(math.log(4.0))
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence", 0.5), t(1.0))
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence_paper", 0.5), t(1.0))
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence", 0.3), t((1 - 2**-1.4) / 0.7))
    torch.testing.assert_close(f_divergence_scores(lr, "alpha_divergence_paper", 0.3), t((1 - 2**-0.6) / 0.3))


# ---------------------------------------------------------------- hand-derived values of the family


def test_family_hand_values():
    """All log-ratios 0 (policy = reference): each loss at its neutral point, derived by hand."""
    z = t(0.0)
    ones = torch.tensor([1])

    def at_zero(loss_type, **kw):
        losses, _, _ = preference_loss(z, z, z, z, beta=0.5, loss_type=loss_type, **kw)
        return losses

    ln2 = math.log(2)
    eps = 0.01
    # EXO: q = (1/2, 1/2): 1/2 (ln 1/2 - ln(1 - eps)) + 1/2 (ln 1/2 - ln eps)
    torch.testing.assert_close(
        at_zero("exo_pair", label_smoothing=eps), t(-ln2 - 0.5 * math.log((1 - eps) * eps))
    )
    torch.testing.assert_close(at_zero("nca_pair"), t(2 * ln2))  # ln 2 + ln2/2 + ln2/2
    torch.testing.assert_close(at_zero("bco_pair"), t(2 * ln2))
    torch.testing.assert_close(at_zero("bco_pair_paper"), t(2 * ln2))  # delta = 0
    torch.testing.assert_close(at_zero("apo_zero"), t(1.0))  # (1 - 1/2) + 1/2
    torch.testing.assert_close(at_zero("apo_down"), t(1.0))  # 1/2 + (1 - 1/2)
    torch.testing.assert_close(at_zero("discopop"), t(0.5 * ln2 + 0.5))  # (1 - 1/2) ln 2 + 1/2 e^0
    torch.testing.assert_close(at_zero("sppo_hard"), t(2.0))  # (0 - 1)^2 + (0 + 1)^2 with 1/(2 beta) = 1
    torch.testing.assert_close(at_zero("sigmoid_norm", chosen_lengths=ones, rejected_lengths=ones), t(ln2))
    torch.testing.assert_close(
        at_zero("ipo", chosen_lengths=ones, rejected_lengths=ones), t(1.0)
    )  # (0 - 1)^2
    torch.testing.assert_close(at_zero("ipo_paper"), t(1.0))


def test_bco_reward_shift_centres_the_classifier():
    """bco_pair_paper with r_w = r_l = delta: both terms are -ln sigmoid(0), 2 ln 2. Without the shift, and in
    TRL's bco_pair whatever reward_shift is passed, the same rewards give -ln sigmoid(1.5) - ln sigmoid(-1.5)."""
    pc, pr, rc, rr = t(-1.0), t(-3.0), t(-4.0), t(-6.0)  # log-ratios 3 and 3
    beta = 0.5
    shift = beta * 3.0
    shifted, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair_paper", reward_shift=shift)
    torch.testing.assert_close(shifted, t(2 * math.log(2)))
    unshifted, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair_paper")
    trl_form, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type="bco_pair", reward_shift=shift)
    expected = -math.log(1 / (1 + math.exp(-1.5))) - math.log(1 / (1 + math.exp(1.5)))  # 1.90
    torch.testing.assert_close(unshifted, t(expected))
    torch.testing.assert_close(trl_form, t(expected))


# ---------------------------------------------------------------- deprecated names of TRL's forms


@pytest.mark.parametrize(("old", "new"), sorted(DEPRECATED_LOSS_NAMES.items()))
def test_deprecated_loss_names_warn_and_compute_trls_form(old, new):
    pc, pr, rc, rr, beta = random_pair_logps("realistic", torch.float64)
    nw, nl = random_lengths(len(pc))
    kw = dict(beta=beta, chosen_lengths=nw, rejected_lengths=nl, reward_shift=0.4)
    with pytest.warns(
        FutureWarning, match=rf"loss_type='{old}' is deprecated.*use loss_type='{new}'.*'{new}_paper'"
    ):
        old_losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=old, **kw)
    new_losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=new, **kw)
    paper_losses, _, _ = preference_loss(pc, pr, rc, rr, loss_type=f"{new}_paper", **kw)
    torch.testing.assert_close(old_losses, new_losses, rtol=0, atol=0)
    assert (old_losses - paper_losses).abs().max() > 1e-3  # the two forms differ on these rows
    with pytest.warns(FutureWarning):
        assert check_loss_settings(["sigmoid", old]) == ["sigmoid", new]
    assert old not in loss_names()


def test_deprecated_f_divergence_name_warns_and_computes_trls_form():
    ((old, new),) = DEPRECATED_F_DIVERGENCES.items()
    pc, pr, rc, rr, beta = random_pair_logps("batch1", torch.float64)
    with pytest.warns(FutureWarning, match=rf"f_divergence_type='{old}' is deprecated.*'{new}'"):
        old_losses, _, _ = preference_loss(
            pc, pr, rc, rr, beta=beta, f_divergence_type=old, f_alpha_divergence_coef=0.3
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # current names do not warn
        new_losses, _, _ = preference_loss(
            pc, pr, rc, rr, beta=beta, f_divergence_type=new, f_alpha_divergence_coef=0.3
        )
    torch.testing.assert_close(old_losses, new_losses, rtol=0, atol=0)
    with pytest.warns(FutureWarning):
        scores = f_divergence_scores(pc - rc, old, 0.3)
    torch.testing.assert_close(scores, f_divergence_scores(pc - rc, new, 0.3), rtol=0, atol=0)
    assert old not in F_DIVERGENCES


def test_deprecated_names_are_replaced_in_the_config(tmp_path):
    from dpo_trainer import DPOConfig

    from conftest import dpo_config

    with pytest.warns(FutureWarning, match=r"DPOConfig.loss_type='ipo_trl' is deprecated.*'ipo'") as record:
        config = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", loss_type="ipo_trl")
    assert config.loss_type == ["ipo"]
    ours = [w for w in record if "is deprecated and will be removed" in str(w.message)]
    assert [w.filename for w in ours] == [__file__]  # the warning names the user's line, not the library's
    with pytest.warns(FutureWarning, match=r"DPOConfig.loss_type='bco_pair_trl' is deprecated"):
        config = dpo_config(
            tmp_path, loss_type=["sigmoid", "bco_pair_trl", "sft"], loss_weights=[0.8, 0.2, 1.0]
        )
    assert config.loss_type == ["sigmoid", "bco_pair", "sft"]
    with pytest.warns(
        FutureWarning, match=r"DPOConfig.f_divergence_type='alpha_divergence_trl' is deprecated"
    ):
        dpo_config(tmp_path, f_divergence_type="alpha_divergence_trl")


def test_needs_reward_shift_only_for_the_papers_bco():
    assert needs_reward_shift("bco_pair_paper") and needs_reward_shift(["sigmoid", "bco_pair_paper", "sft"])
    for loss_type in ("bco_pair", "bco_pair_trl", ["sigmoid", "bco_pair", "sft"], "sigmoid", "ipo_paper"):
        assert not needs_reward_shift(loss_type), loss_type


def test_sppo_hard_minimum_at_its_targets():
    """lr_w = 1/(2 beta), lr_l = -1/(2 beta) is the zero of the SPPO square loss."""
    beta = 0.25
    losses, _, _ = preference_loss(
        t(-3.0 + 2.0), t(-5.0 - 2.0), t(-3.0), t(-5.0), beta=beta, loss_type="sppo_hard"
    )
    torch.testing.assert_close(losses, t(0.0))


def test_sft_batch_mean_is_the_token_mean_nll():
    pc = t(-6.0, -20.0, -3.0)
    lengths = torch.tensor([3, 10, 2])
    losses, _, _ = preference_loss(
        pc,
        t(-1.0, -1.0, -1.0),
        t(-5.0, -5.0, -5.0),
        t(-1.0, -1.0, -1.0),
        loss_type="sft",
        chosen_lengths=lengths,
        rejected_lengths=lengths,
    )
    torch.testing.assert_close(losses.mean(), t(29.0 / 15.0).squeeze())


def test_aot_depends_on_the_batch_not_on_the_order_of_rows():
    """AOT compares sorted quantiles: permuting the rows leaves the sorted per-quantile losses unchanged."""
    pc, pr, rc, rr, beta = random_pair_logps("realistic", torch.float64)
    perm = torch.randperm(len(pc), generator=torch.Generator().manual_seed(0))
    for loss_type in ("aot", "aot_unpaired"):
        base, _, _ = preference_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type)
        permuted, _, _ = preference_loss(
            pc[perm], pr[perm], rc[perm], rr[perm], beta=beta, loss_type=loss_type
        )
        torch.testing.assert_close(base, permuted)


# ---------------------------------------------------------------- combinations (MPO)


def test_weighted_list_is_the_weighted_sum_with_gradients():
    pc, pr, rc, rr, beta = random_pair_logps("realistic", torch.float64)
    nw, nl = random_lengths(len(pc))
    pc.requires_grad_(True)
    kw = dict(beta=beta, chosen_lengths=nw, rejected_lengths=nl)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined, chosen, rejected = preference_loss(pc, pr, rc, rr, loss_type=names, loss_weights=weights, **kw)
    parts = [preference_loss(pc, pr, rc, rr, loss_type=name, **kw)[0] for name in names]
    expected = sum(w * part for w, part in zip(weights, parts))
    torch.testing.assert_close(combined, expected)
    (grad,) = torch.autograd.grad(combined.sum(), pc)
    (expected_grad,) = torch.autograd.grad(expected.sum(), pc)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(chosen, beta * (pc.detach() - rc))  # rewards do not depend on the losses
    unweighted, _, _ = preference_loss(pc, pr, rc, rr, loss_type=names, **kw)
    torch.testing.assert_close(unweighted, sum(parts))


# ---------------------------------------------------------------- validation of the family


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_type="exo_pair"), "exo_pair' needs label_smoothing > 0"),
        (dict(loss_type="sigmoid_norm"), "sigmoid_norm' needs chosen_lengths"),
        (dict(loss_type=["sigmoid", "sft"]), "sft' needs chosen_lengths"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), r"not \['nca_pair'\]"),
        (dict(loss_type="sigmoid", f_divergence_type="chi2"), "unknown f_divergence_type 'chi2'"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "1 weights for 2 loss types"),
        (dict(loss_type=["sigmoid"], loss_weights=[float("nan")]), "finite"),
        (dict(loss_type=[]), "non-empty list"),
        (dict(loss_type=["sigmoid", "nope"]), "unknown loss_type 'nope'"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
        (
            dict(
                loss_type="sigmoid",
                f_divergence_type="alpha_divergence",
                f_alpha_divergence_coef=float("inf"),
            ),
            "finite",
        ),
    ],
)
def test_family_settings_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preference_loss(*pair_with_h(1.0), **kwargs)


def test_lengths_must_match_the_batch():
    with pytest.raises(ValueError, match=r"chosen_lengths must have the log-probs' shape \(1,\), got \(2,\)"):
        preference_loss(
            *pair_with_h(1.0),
            loss_type="sigmoid_norm",
            chosen_lengths=torch.ones(2),
            rejected_lengths=torch.ones(1),
        )


# ---------------------------------------------------------------- DPOConfig: TRL's fields, defaults, validation


def test_config_loss_fields_have_trls_defaults(tmp_path):
    import dataclasses

    import trl

    from dpo_trainer import DPOConfig

    ours = {f.name: f for f in dataclasses.fields(DPOConfig)}
    theirs = {f.name: f for f in dataclasses.fields(trl.DPOConfig)}
    names = [
        "loss_type",
        "loss_weights",
        "discopop_tau",
        "use_weighting",
        "ld_alpha",
        "f_divergence_type",
        "f_alpha_divergence_coef",
        "sync_ref_model",
        "ref_model_mixup_alpha",
        "ref_model_sync_steps",
        "label_smoothing",
        "beta",
    ]

    def default(f):
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    for name in names:
        assert default(ours[name]) == default(theirs[name]), name


def test_config_accepts_a_name_or_a_list(tmp_path):
    from conftest import dpo_config

    assert dpo_config(tmp_path, loss_type="ipo").loss_type == ["ipo"]
    config = dpo_config(tmp_path, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert config.loss_type == ["sigmoid", "bco_pair", "sft"] and config.loss_weights == [0.8, 0.2, 1.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(loss_type="nope"), "unknown DPOConfig.loss_type 'nope'"),
        (
            dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 2.0, 3.0]),
            "DPOConfig.loss_weights must have one",
        ),
        (dict(loss_type="exo_pair"), r"needs DPOConfig.label_smoothing > 0"),
        (dict(loss_type="hinge", label_smoothing=0.1), r"DPOConfig.label_smoothing=0.1 is not used by"),
        (dict(label_smoothing=0.1), r"TRL 1.16's sigmoid ignores .*DPOConfig.loss_type='cdpo'"),
        (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "applies to the losses built on"),
        (dict(f_divergence_type="kl"), "unknown DPOConfig.f_divergence_type"),
        (dict(discopop_tau=0.0), "discopop_tau must be > 0"),
        (dict(use_weighting=True, loss_type="aot"), "aot"),
        (dict(ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
        (dict(ld_alpha=0.5, precompute_ref_log_probs=True), "ld_alpha weighs each batch"),
        (dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]), "ld_alpha with loss_type 'sft'"),
        (dict(sync_ref_model=True, ref_model_mixup_alpha=0.0), r"ref_model_mixup_alpha must be in \(0, 1\]"),
        (
            dict(sync_ref_model=True, ref_model_sync_steps=0),
            "ref_model_sync_steps must be a positive integer",
        ),
        (dict(sync_ref_model=True, precompute_ref_log_probs=True), "precompute_ref_log_probs"),
    ],
)
def test_config_rejects_bad_loss_settings(tmp_path, overrides, message):
    from conftest import dpo_config

    with pytest.raises(ValueError, match=message):
        dpo_config(tmp_path, **overrides)


# ---------------------------------------------------------------- LD-DPO's token weights


@pytest.mark.parametrize("interleaved", [False, True])
def test_ld_token_weights_match_a_loop(interleaved):
    """Weight 1 for the first min_k(len) tokens of each response of an example, alpha after; tokens of different
    responses may be interleaved in the scoring plan (grouped layouts), each response's own tokens in order."""
    from dpo_trainer.losses import ld_token_weights

    gen = torch.Generator().manual_seed(0)
    batch, k, alpha = 5, 3, 0.3
    lengths = torch.randint(0, 7, (batch, k), generator=gen)
    lengths[0] = torch.tensor([4, 4, 4])  # equal lengths: no tail
    seqs = [s for s in range(k * batch) for _ in range(int(lengths[s % batch, s // batch]))]
    if interleaved:  # tokens of one response are alike, so any permutation keeps each response's order
        seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=gen).tolist()]
    expected, seen = [], {}
    for s in seqs:
        position = seen.get(s, 0)
        seen[s] = position + 1
        shared = min(int(length) for length in lengths[s % batch])
        expected.append(1.0 if position < shared else alpha)
    weights = ld_token_weights(torch.tensor(seqs), lengths, alpha)
    torch.testing.assert_close(weights, torch.tensor(expected))
    assert weights.dtype == torch.float32
    torch.testing.assert_close(ld_token_weights(torch.tensor(seqs), lengths, 1.0), torch.ones(len(seqs)))
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        ld_token_weights(torch.tensor(seqs), lengths, 1.5)


# ---------------------------------------------------------------- training with a weighted list (MPO)


def test_training_with_a_weighted_list_of_losses(tmp_path, make_model, tokenizer, pairs):
    """sigmoid + bco_pair_paper + sft with MPO's weights trains; the first loss is the sum derived at policy =
    reference; the evaluation loss equals the pure function on the trained policy with the trainer's BCO reward
    shift."""
    from dpo_trainer import DPOTrainer

    from conftest import dpo_config

    names, weights = ["sigmoid", "bco_pair_paper", "sft"], [0.8, 0.2, 1.0]
    trainer = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, loss_type=names, loss_weights=weights, max_steps=3),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(x) for x in logged)
    # step 1: policy = reference, every reward 0, delta = 0: 0.8 ln 2 + 0.2 (2 ln 2) + sft (> 0)
    assert logged[0] > 1.2 * math.log(2) + 0.5
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    shift = trainer._bco_reward_shift
    assert shift.count == 3 and shift.mean != 0.0  # one update per training batch, rewards moved

    metrics = trainer.evaluate()
    expected = []
    batch_size = trainer.args.per_device_eval_batch_size
    for start in range(0, len(pairs), batch_size):  # sft is a per-batch token mean: same batches as evaluate
        batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(start, start + batch_size)])
        with torch.no_grad():
            policy, reference = trainer.policy_logps(trainer.model, batch), trainer.reference_logps(batch)
        lengths = batch["response_lengths"]
        losses, _, _ = preference_loss(
            policy[:, 0],
            policy[:, 1],
            reference[:, 0],
            reference[:, 1],
            beta=trainer.args.beta,
            loss_type=names,
            loss_weights=weights,
            chosen_lengths=lengths[:, 0],
            rejected_lengths=lengths[:, 1],
            reward_shift=shift.mean,
        )
        expected.append(losses)
    assert metrics["eval_loss"] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)
    assert shift.count == 3  # evaluation reads delta, it does not update it


def test_ld_alpha_gives_the_same_metrics_in_every_layout(tmp_path, make_model, tokenizer, pairs):
    """The scoring plan orders tokens differently per layout; LD-DPO's weights follow each response's own order."""
    from dpo_trainer import DPOTrainer

    from conftest import dpo_config

    policy, reference = make_model(seed=1), make_model(seed=2)
    metrics = {}
    for layout in ("padded", "packed", "shared_prompt"):
        trainer = DPOTrainer(
            copy.deepcopy(policy),
            ref_model=copy.deepcopy(reference),
            args=dpo_config(tmp_path / layout, layout=layout, ld_alpha=0.3, loss_type="sigmoid_norm"),
            train_dataset=pairs,
            eval_dataset=pairs,
            processing_class=tokenizer,
        )
        metrics[layout] = trainer.evaluate()
    plain = DPOTrainer(
        copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=dpo_config(tmp_path / "plain", loss_type="sigmoid_norm"),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
    ).evaluate()
    for layout in ("packed", "shared_prompt"):
        for name in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
            assert metrics[layout][name] == pytest.approx(metrics["padded"][name], rel=1e-4, abs=1e-5), (
                layout,
                name,
            )
    assert (
        metrics["padded"]["eval_logps/chosen"] > plain["eval_logps/chosen"] + 0.1
    )  # the tails were down-weighted


# ---------------------------------------------------------------- WPO


def test_wpo_means_match_the_models_own_logits(tmp_path, make_model, tokenizer, pairs):
    """score_responses(return_wpo_logps=True): mean over each response of log p_t - log sum_v p_v^2, from the
    full logits of the model's own forward pass; the weights are the exp of the per-pair sums."""
    import torch.nn.functional as F

    from dpo_trainer import DPOTrainer
    from dpo_trainer.logprobs import score_responses
    from dpo_trainer.losses import wpo_weights

    from conftest import dpo_config

    trainer = DPOTrainer(
        make_model(),
        args=dpo_config(tmp_path, layout="padded"),
        train_dataset=pairs,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
    model = trainer.model
    with torch.no_grad():
        aligned = score_responses(model, batch, chunk_size=7, return_wpo_logps=True).wpo_logps
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    flat = logits.reshape(-1, logits.shape[-1])[batch["score_index"]]
    log_probs = F.log_softmax(flat, dim=-1)
    token = log_probs.gather(1, batch["score_target"][:, None]).squeeze(1)
    log_sum_sq = torch.log((log_probs.exp() ** 2).sum(-1))
    b, k = batch["response_lengths"].shape
    sums = torch.zeros(k * b, dtype=torch.float64).index_add(0, batch["score_seq"], token - log_sum_sq)
    expected = (sums / batch["response_lengths"].T.reshape(-1).clamp_min(1)).view(k, b).T
    torch.testing.assert_close(aligned.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wpo_weights(aligned).double(), expected.sum(1).exp(), rtol=1e-4, atol=1e-6)


def test_trainer_keeps_the_bco_reward_shift_only_for_the_papers_form(tmp_path, make_model, tokenizer, pairs):
    """δ is updated by training batches of a selection with bco_pair_paper and fed to it; TRL's bco_pair (and
    any other selection) leaves it untouched and computes without it, even when a δ is already held."""
    from dpo_trainer import DPOTrainer

    from conftest import dpo_config

    trainer = DPOTrainer(
        make_model(), args=dpo_config(tmp_path), train_dataset=pairs, processing_class=tokenizer
    )
    gen = torch.Generator().manual_seed(0)
    policy = -20 + torch.randn(4, 2, generator=gen)
    reference = -20 + torch.randn(4, 2, generator=gen)
    lengths = torch.randint(1, 9, (4, 2), generator=gen)
    beta = trainer.args.beta
    batch_mean = (beta * (policy - reference)).mean().item()
    trainer.model.train()
    for names, keeps in [
        (["bco_pair"], False),
        (["sigmoid", "bco_pair", "sft"], False),
        (["sigmoid"], False),
        (["bco_pair_paper"], True),
        (["sigmoid", "bco_pair_paper", "sft"], True),
    ]:
        trainer.args.loss_type = names
        trainer._bco_reward_shift = shift = RunningMean()
        shift.update(1.5)  # a delta held from earlier batches
        losses, _ = trainer.dpo_loss(policy, reference, lengths)
        assert shift.count == (2 if keeps else 1), names
        delta = (1.5 + batch_mean) / 2 if keeps else 0.0
        expected, _, _ = preference_loss(
            *policy.unbind(1),
            *reference.unbind(1),
            beta=beta,
            loss_type=names,
            chosen_lengths=lengths[:, 0],
            rejected_lengths=lengths[:, 1],
            reward_shift=delta,
        )
        torch.testing.assert_close(losses, expected)
    trainer.model.eval()  # evaluation reads delta, it does not update it
    losses, _ = trainer.dpo_loss(policy, reference, lengths)
    assert shift.count == 2
