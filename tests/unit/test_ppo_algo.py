"""The PPO math of trainer_client.ppo.algo, checked against values worked out by hand.

Tensors are float64 so the hand arithmetic in the comments matches to many digits. The usual
shape is B=2 rows by T=3 positions with the second row padded.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainer_client.ppo.algo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)

LN = math.log


def t(rows: object) -> torch.Tensor:
    """A float64 tensor from nested lists of numbers."""
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected: object) -> None:
    expected_tensor = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected_tensor, rtol=1e-12, atol=1e-12)


# Row 0 has three real tokens; row 1 two, then one padding position.
MASK = t([[1, 1, 1], [1, 1, 0]])


# ---------------------------------------------------------------- logprobs and entropy


def test_logprobs_pick_the_labels_log_softmax() -> None:
    # Position 0: logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4).
    # Position 1: logits [ln 2, ln 2] -> [1/2, 1/2]; label 0 -> ln(1/2).
    logits = t([[[0.0, LN(3)], [LN(2), LN(2)]]])
    labels = torch.tensor([[1, 0]])
    close(logprobs_from_logits(logits, labels), [[LN(0.75), LN(0.5)]])


def test_logprobs_of_half_precision_logits_come_back_in_float32() -> None:
    logits = torch.zeros(1, 1, 4, dtype=torch.bfloat16)
    result = logprobs_from_logits(logits, torch.tensor([[2]]))
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.tensor([[LN(0.25)]]))


def test_entropy_in_nats_and_finite_with_filtered_logits() -> None:
    # [0, ln 3] -> p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3.
    # [0, 0, -inf] (a top-k filtered position) -> uniform over two: H = ln 2.
    # [0, -inf, -inf] -> one certain token: H = 0 (not NaN from 0 * -inf).
    logits = t([[[0.0, LN(3), -math.inf], [0.0, 0.0, -math.inf], [0.0, -math.inf, -math.inf]]])
    close(entropy_from_logits(logits), [[LN(4) - 0.75 * LN(3), LN(2), 0.0]])


# ---------------------------------------------------------------- masked statistics


VALUES = t([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
VALUES_MASK = t([[1, 1, 0], [1, 0, 0]])  # real: 1, 2, 4; the 100s are padding


def test_masked_mean_all_and_along_a_dim() -> None:
    close(masked_mean(VALUES, VALUES_MASK), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(VALUES, VALUES_MASK, dim=1), [1.5, 4.0])  # (1 + 2) / 2, 4 / 1
    # Columns: (1 + 4) / 2, 2 / 1, and an empty column that gives 0, not NaN.
    close(masked_mean(VALUES, VALUES_MASK, dim=0), [2.5, 2.0, 0.0])


def test_masked_mean_accepts_a_bool_mask_and_an_empty_one() -> None:
    close(masked_mean(VALUES, VALUES_MASK.bool()), 7 / 3)
    close(masked_mean(VALUES, torch.zeros_like(VALUES)), 0.0)


def test_masked_var_biased_and_unbiased() -> None:
    # Mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9 = 14/3.
    close(masked_var(VALUES, VALUES_MASK, unbiased=False), 14 / 9)  # / 3
    close(masked_var(VALUES, VALUES_MASK), 7 / 3)  # / (3 - 1)
    # One real position: no spread, and no division by zero for the correction.
    close(masked_var(VALUES, t([[0, 0, 0], [1, 0, 0]])), 0.0)


def test_whitening_ignores_masked_positions_and_zeroes_them() -> None:
    # Over 1, 2, 4: mean 7/3, unbiased variance 7/3 (above), so x -> (x - 7/3) / sqrt(7/3).
    std = math.sqrt(7 / 3)
    whitened = masked_whiten(VALUES, VALUES_MASK)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    torch.testing.assert_close(whitened, t(expected), rtol=1e-8, atol=1e-8)
    close(masked_mean(whitened, VALUES_MASK), 0.0)
    torch.testing.assert_close(masked_var(whitened, VALUES_MASK), t(1.0), rtol=1e-8, atol=0)


def test_whitening_without_shift_keeps_the_mean() -> None:
    std = math.sqrt(7 / 3)
    whitened = masked_whiten(VALUES, VALUES_MASK, shift_mean=False)
    mean = 7 / 3
    expected = [
        [(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0],
        [(4 - mean) / std + mean, 0.0, 0.0],
    ]
    torch.testing.assert_close(whitened, t(expected), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand() -> None:
    # logp - ref = [0.5, -1.0]: the policy likes token 0 more than the reference, token 1 less.
    logp, ref = t([[-1.0, -2.0]]), t([[-1.5, -1.0]])
    close(kl_per_token(logp, ref), [[0.5, -1.0]])  # k1 is the default
    close(kl_per_token(logp, ref, "k2"), [[0.125, 0.5]])  # 0.5 * 0.25, 0.5 * 1
    # k3 with ref - logp = [-0.5, 1.0]: e^-0.5 + 0.5 - 1 and e^1 - 1 - 1.
    close(kl_per_token(logp, ref, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2]])


def test_k1_is_positive_where_the_policy_is_more_likely_than_the_reference() -> None:
    more_likely = kl_per_token(t([LN(0.5)]), t([LN(0.25)]))
    less_likely = kl_per_token(t([LN(0.25)]), t([LN(0.5)]))
    close(more_likely, [LN(2)])
    close(less_likely, [-LN(2)])


def test_unknown_estimator_is_refused() -> None:
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(t([0.0]), t([0.0]), "k4")  # type: ignore[arg-type]


logprob_pairs = st.lists(st.tuples(st.floats(-30, 0), st.floats(-30, 0)), min_size=1, max_size=32)


@given(logprob_pairs)
def test_k2_and_k3_are_never_negative_and_zero_where_equal(
    pairs: list[tuple[float, float]],
) -> None:
    logp = t([p for p, _ in pairs])
    ref = t([r for _, r in pairs])
    for estimator in ("k2", "k3"):
        kl = kl_per_token(logp, ref, estimator)
        assert bool((kl >= 0).all()), (estimator, kl)
        assert bool((kl[logp == ref] == 0).all())
    # k1 takes the sign of logp - ref.
    k1 = kl_per_token(logp, ref, "k1")
    assert torch.equal(torch.sign(k1), torch.sign(logp - ref))


# ---------------------------------------------------------------- token rewards


def test_token_rewards_put_the_score_at_each_rows_last_real_token() -> None:
    scores = t([1.0, -2.0])
    kl = t([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])  # 9.0 sits on padding
    # kl_coef 0.5: row 0 -> [-0.05, -0.1, -0.15 + 1] ; row 1 -> [-0.2, -0.25 - 2, 0].
    rewards = token_rewards(scores, kl, MASK, kl_coef=0.5)
    torch.testing.assert_close(rewards, t([[-0.05, -0.1, 0.85], [-0.2, -2.25, 0.0]]))


def test_token_rewards_with_a_bool_mask_and_an_empty_row() -> None:
    # Row 1 has no real token: no penalty and nowhere to put its score.
    mask = torch.tensor([[True, False, False], [False, False, False]])
    rewards = token_rewards(t([3.0, 5.0]), t([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), mask, 0.1)
    torch.testing.assert_close(rewards, t([[-0.1 + 3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_token_rewards_refuse_mismatched_scores() -> None:
    with pytest.raises(ValueError, match="scores"):
        token_rewards(t([1.0, 2.0, 3.0]), torch.zeros(2, 3, dtype=torch.float64), MASK, 0.1)


# ---------------------------------------------------------------- GAE


def test_gae_with_discount_and_a_padded_row() -> None:
    # gamma 0.9, lam 0.8, so gamma * lam = 0.72.
    rewards = t([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]])  # 7.0 and 9.0 below sit on padding
    values = t([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]])
    # Row 0 (value after the last token is 0):
    #   t=2: delta = 2 + 0.9 * 0 - 1.5 = 0.5;         A = 0.5
    #   t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35;      A = 0.35 + 0.72 * 0.5 = 0.71
    #   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4;       A = 1.4 + 0.72 * 0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # Row 1 (t=2 is padding: its value and advantage do not leak back):
    #   t=1: delta = 3 + 0.9 * 0 - 1.0 = 2.0;         A = 2.0
    #   t=0: delta = 0 + 0.9 * 1.0 - 2.0 = -1.1;      A = -1.1 + 0.72 * 2.0 = 0.34
    #   returns = A + V = [0.34 + 2.0, 2.0 + 1.0, 0] = [2.34, 3.0, 0]
    advantages, returns = gae(rewards, values, MASK, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, t([[1.9112, 0.71, 0.5], [0.34, 2.0, 0.0]]))
    torch.testing.assert_close(returns, t([[2.4112, 1.71, 2.0], [2.34, 3.0, 0.0]]))


def test_gae_returns_targets_without_gradient() -> None:
    values = t([[0.5, 1.0, 1.5], [2.0, 1.0, 9.0]]).requires_grad_()
    advantages, returns = gae(torch.ones(2, 3, dtype=torch.float64), values, MASK, 1.0, 0.95)
    assert not advantages.requires_grad
    assert not returns.requires_grad


def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value() -> None:
    # gamma = lam = 1: A_t = sum of rewards from t on - V_t. Row 0: rewards 1, 0, 2.
    #   A = [3 - 0.5, 2 - 1.0, 2 - 1.5] = [2.5, 1.0, 0.5]
    rewards = t([[1.0, 0.0, 2.0]])
    values = t([[0.5, 1.0, 1.5]])
    advantages, returns = gae(rewards, values, t([[1, 1, 1]]), gamma=1.0, lam=1.0)
    close(advantages, [[2.5, 1.0, 0.5]])
    close(returns, [[3.0, 2.0, 2.0]])


# ---------------------------------------------------------------- policy loss


def policy_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four real tokens a, b (row 0) and c, e (row 1); old logprobs 0, so ratio = exp(logp)."""
    ratios = t([[1.5, 0.5, 3.0], [1.1, 0.5, 3.0]])  # the 3.0s sit on padding
    advantages = t([[1.0, -1.0, 100.0], [2.0, 1.0, 100.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    return ratios.log().requires_grad_(), torch.zeros_like(ratios), advantages, mask


def test_policy_loss_takes_the_clipped_branch_for_either_advantage_sign() -> None:
    logprobs, old, advantages, mask = policy_case()
    # eps = 0.2: max(-A * r, -A * clip(r, 0.8, 1.2)) per token:
    #   a: A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2  (clipped, positive advantage)
    #   b: A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8  (clipped, negative advantage)
    #   c: A=+2, r=1.1 -> max(-2.2, -2.2) = -2.2  (inside the range)
    #   e: A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5  (outside, but the unclipped one is worse)
    #   loss = (-1.2 + 0.8 - 2.2 - 0.5) / 4 = -0.775
    result = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    close(result.loss.detach(), -0.775)
    # Gradient wrt logp: 0 where the clipped branch won; -A * r / 4 elsewhere (c: -0.55,
    # e: -0.125); 0 on padding.
    (grad,) = torch.autograd.grad(result.loss, logprobs)
    close(grad, [[0.0, 0.0, 0.0], [-0.55, -0.125, 0.0]])


def test_policy_clip_fraction_and_approx_kl() -> None:
    logprobs, old, advantages, mask = policy_case()
    result = policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # |r - 1| > 0.2 for a (0.5), b (0.5) and e (0.5), not c (0.1); padding not counted.
    close(result.clip_fraction, 0.75)
    # 0.5 * mean of (ln r)^2 over a, b, c, e.
    expected_kl = 0.5 * (LN(1.5) ** 2 + LN(0.5) ** 2 + LN(1.1) ** 2 + LN(0.5) ** 2) / 4
    close(result.approx_kl, expected_kl)
    assert not result.clip_fraction.requires_grad
    assert not result.approx_kl.requires_grad


# ---------------------------------------------------------------- value loss


def test_value_loss_takes_the_clipped_branch_and_counts_clips() -> None:
    # c = 0.2; v_clipped = old + clamp(v - old, -0.2, 0.2); per token max((v-R)^2, (vc-R)^2):
    #   t1: v=1.0, old=0.5, R=2 -> vc=0.7: max(1.0, 1.69) = 1.69  (clipped branch)
    #   t2: v=0.4, old=0.5, R=0 -> vc=0.4: max(0.16, 0.16) = 0.16 (inside the range)
    #   t3: v=0.0, old=1.0, R=0 -> vc=0.8: max(0.0, 0.64) = 0.64  (clipped branch)
    #   t4: v=3.0, old=1.0, R=0 -> vc=1.2: max(9.0, 1.44) = 9.0   (clip moved it, unclipped worse)
    #   loss = 0.5 * (1.69 + 0.16 + 0.64 + 9.0) / 4 = 1.43625
    values = t([[1.0, 0.4, 50.0], [0.0, 3.0, 50.0]]).requires_grad_()  # 50s sit on padding
    old = t([[0.5, 0.5, 0.0], [1.0, 1.0, 0.0]])
    returns = t([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 1, 0]])
    result = value_loss(values, old, returns, mask, clip_range_value=0.2)
    close(result.loss.detach(), 1.43625)
    # |v - old| > 0.2 at t1, t3 and t4.
    close(result.clip_fraction, 0.75)
    # Gradient: 0 through the clamp where the clipped branch won; (v - R) / 4 elsewhere.
    (grad,) = torch.autograd.grad(result.loss, values)
    close(grad, [[0.0, 0.1, 0.0], [0.0, 0.75, 0.0]])


# ---------------------------------------------------------------- KL controllers


def test_fixed_controller_never_moves() -> None:
    controller = FixedKLController(0.05)
    controller.update(current_kl=100.0, n_steps=10_000)
    assert controller.value == 0.05


def test_adaptive_controller_update_formula() -> None:
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    # error = 6.6 / 6 - 1 = 0.1 (inside +-0.2): coef = 0.1 * (1 + 0.1 * 256 / 10000) = 0.100256
    controller.update(current_kl=6.6, n_steps=256)
    assert controller.value == pytest.approx(0.100256, rel=1e-12)
    # error = 3 / 6 - 1 = -0.5 -> clipped to -0.2: coef *= 1 - 0.2 * 256 / 10000 = 0.99488
    controller.update(current_kl=3.0, n_steps=256)
    assert controller.value == pytest.approx(0.100256 * 0.99488, rel=1e-12)


@pytest.mark.parametrize(
    ("current_kl", "factor"),
    [
        (60.0, 1 + 0.2 * 500 / 1000),  # 60 / 6 - 1 = 9 -> +0.2
        (0.0, 1 - 0.2 * 500 / 1000),  # 0 / 6 - 1 = -1 -> -0.2
        (6.0, 1.0),  # on target: unchanged
    ],
)
def test_adaptive_controller_clips_the_error(current_kl: float, factor: float) -> None:
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=1000)
    controller.update(current_kl=current_kl, n_steps=500)
    assert controller.value == pytest.approx(0.2 * factor, rel=1e-12)


def test_controllers_state_dict_round_trip() -> None:
    trained = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    trained.update(current_kl=12.0, n_steps=10)
    resumed = AdaptiveKLController(init_kl_coef=0.5, target=6.0, horizon=100)
    resumed.load_state_dict(trained.state_dict())
    assert resumed.value == trained.value
    trained.update(current_kl=1.0, n_steps=10)
    resumed.update(current_kl=1.0, n_steps=10)
    assert resumed.value == trained.value

    fixed = FixedKLController(0.3)
    fixed.load_state_dict(FixedKLController(0.07).state_dict())
    assert fixed.value == 0.07


@pytest.mark.parametrize(
    "build",
    [
        lambda: FixedKLController(-0.1),
        lambda: AdaptiveKLController(0.1, target=0.0, horizon=100),
        lambda: AdaptiveKLController(0.1, target=6.0, horizon=0),
        lambda: AdaptiveKLController(math.nan, target=6.0, horizon=100),
    ],
)
def test_controllers_refuse_bad_settings(build: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        build()  # type: ignore[operator]


def test_controller_refuses_a_state_without_a_value() -> None:
    with pytest.raises(ValueError, match="value"):
        FixedKLController(0.1).load_state_dict({})


# ---------------------------------------------------------------- running moments


def test_running_moments_by_hand() -> None:
    moments = RunningMoments()
    assert (moments.count, moments.mean, moments.std, moments.mean_abs) == (0, 0.0, 0.0, 0.0)
    moments.update([1.0, 2.0])
    moments.update([])  # nothing to fold in
    moments.update([3.0, 4.0, 5.0])
    # 1..5: mean 3; squared deviations 4 + 1 + 0 + 1 + 4 = 10; population var 10 / 5 = 2.
    assert moments.count == 5
    assert moments.mean == pytest.approx(3.0, rel=1e-15)
    assert moments.std == pytest.approx(math.sqrt(2.0), rel=1e-15)
    assert moments.mean_abs == pytest.approx(3.0, rel=1e-15)


def test_running_mean_abs_differs_from_the_mean_with_negatives() -> None:
    moments = RunningMoments()
    moments.update([-1.0, 2.0])
    moments.update([-3.0])
    assert moments.mean == pytest.approx(-2 / 3, rel=1e-15)  # (-1 + 2 - 3) / 3
    assert moments.mean_abs == pytest.approx(2.0, rel=1e-15)  # (1 + 2 + 3) / 3


def test_running_moments_refuse_non_finite_values() -> None:
    moments = RunningMoments()
    with pytest.raises(ValueError, match="non-finite"):
        moments.update([1.0, math.nan])
    assert moments.count == 0


batches_st = st.lists(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), max_size=20), min_size=1, max_size=8
).filter(lambda batches: sum(len(batch) for batch in batches) > 0)


@given(batches_st)
def test_running_moments_merged_in_batches_equal_the_whole(batches: list[list[float]]) -> None:
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = [value for batch in batches for value in batch]
    scale = 1.0 + max(abs(value) for value in everything)
    assert moments.count == len(everything)
    assert math.isclose(moments.mean, statistics.fmean(everything), abs_tol=1e-12 * scale)
    assert math.isclose(moments.std, statistics.pstdev(everything), abs_tol=1e-6 * scale)
    expected_abs = float(np.mean(np.abs(np.array(everything))))
    assert math.isclose(moments.mean_abs, expected_abs, abs_tol=1e-12 * scale)


def test_running_moments_state_dict_round_trip() -> None:
    original = RunningMoments()
    original.update([0.5, -1.5, 4.0])
    resumed = RunningMoments()
    resumed.load_state_dict(original.state_dict())
    assert resumed.state_dict() == original.state_dict()
    original.update([2.0, 7.0])
    resumed.update([2.0, 7.0])
    assert resumed.state_dict() == original.state_dict()
    assert resumed.count == 5


@pytest.mark.parametrize(
    "state",
    [
        {"count": 1.0, "mean": 0.0, "m2": 0.0},
        {"count": -1.0, "mean": 0.0, "m2": 0.0, "mean_abs": 0.0},
    ],
)
def test_running_moments_refuse_a_bad_state(state: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="RunningMoments state"):
        RunningMoments().load_state_dict(state)


# ---------------------------------------------------------------- import discipline


def test_importing_the_trainer_package_leaves_torch_out() -> None:
    code = (
        "import sys, trainer_client, trainer_client.ppo; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'trainer_client.ppo.algo' not in sys.modules, 'algo was imported'"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
