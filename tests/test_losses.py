"""Tests for dpo_trainer.losses: hand-derived values, naive float64 references, invariants, registry."""

import math

import pytest
import torch
import torch.nn.functional as F

from dpo_trainer.losses import LOSSES, loss_names, plackett_luce_loss, preference_loss, register_loss

BUILTINS = ("hinge", "ipo", "robust", "sigmoid")
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


def test_cdpo_hand_value():
    """eps = 1/4, beta h = ln 3: sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4.
    loss = -(3/4) ln(3/4) - (1/4) ln(1/4) = (3/4) ln(4/3) + (1/4) ln 4."""
    losses, _, _ = preference_loss(*pair_with_h(math.log(3)), beta=1.0, label_smoothing=0.25)
    torch.testing.assert_close(losses, t(0.75 * math.log(4 / 3) + 0.25 * math.log(4)))


def test_ipo_hand_values():
    """beta = 1/4 so 1/(2 beta) = 2: h = 5 gives (5 - 2)^2 = 9, h = 2 gives 0, h = -1 gives 9."""
    for h, expected in [(5.0, 9.0), (2.0, 0.0), (-1.0, 9.0)]:
        losses, _, _ = preference_loss(*pair_with_h(h), beta=0.25, loss_type="ipo")
        torch.testing.assert_close(losses, t(expected))


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


def test_robust_and_cdpo_with_zero_eps_equal_sigmoid():
    """eps = 0: both extra terms vanish and the divisor is 1, leaving -log sigmoid(beta h)."""
    gen = torch.Generator().manual_seed(0)
    logps = [-100 * torch.rand(9, generator=gen, dtype=torch.float64) for _ in range(4)]
    reference, _, _ = preference_loss(*logps, beta=0.3)
    robust, _, _ = preference_loss(*logps, beta=0.3, loss_type="robust", label_smoothing=0.0)
    torch.testing.assert_close(robust, reference, rtol=0, atol=0)


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
        return -(1 - eps) * log_sig - eps * log_sig_neg
    if loss_type == "robust":
        return (-(1 - eps) * log_sig + eps * log_sig_neg) / (1 - 2 * eps)
    if loss_type == "ipo":
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
    ("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)]
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


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_rejected_by_losses_that_ignore_it(loss_type):
    with pytest.raises(ValueError, match="label_smoothing applies to sigmoid and robust"):
        preference_loss(*pair_with_h(1.0), loss_type=loss_type, label_smoothing=0.1)


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
