"""The native Dice kernel (ops/dice_cpu.cpp) against Dice's formula evaluated in float64: values, batch
statistics, gradients of the input and of alpha, on random shapes (odd widths exercise the vector loops'
remainders), bf16 inputs, degenerate columns, several threads."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.activations import Dice
from din_torchrec.ops import fused_dice, native

needs_kernel = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")


def _formula(
    x: torch.Tensor, alpha: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    var = x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return x * (alpha + (1 - alpha) * p), mean, var


def _reference(x: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor, eps: float):
    """Values and gradients of the formula in float64."""
    x64 = x.detach().double().requires_grad_()
    a64 = alpha.detach().double().requires_grad_()
    out, mean, var = _formula(x64, a64, eps)
    (out * g.double()).sum().backward()
    return out, mean, var, x64.grad, a64.grad


def _kernel(x: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor, eps: float):
    x = x.detach().clone().requires_grad_()
    alpha = alpha.detach().clone().requires_grad_()
    out, mean, var = fused_dice.dice_train(x, alpha, eps)
    (out.float() * g.float()).sum().backward()
    return out, mean, var, x.grad, alpha.grad


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 700),
    h=st.integers(1, 70),
    scale=st.floats(0.1, 20.0),
    shift=st.floats(-5.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_the_float64_formula(n: int, h: int, scale: float, shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g) * scale + shift
    alpha = torch.rand(h, generator=g) * 2 - 1
    grad = torch.randn(n, h, generator=g)
    out, mean, var, gx, ga = _kernel(x, alpha, grad, 1e-8)
    r_out, r_mean, r_var, r_gx, r_ga = _reference(x, alpha, grad, 1e-8)
    assert out.dtype == torch.float32 and gx.dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(out.double(), r_out, **tol)
    torch.testing.assert_close(mean.double(), r_mean, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(var.double(), r_var, rtol=1e-4, atol=1e-5 * scale * scale)
    if (
        n > 1
    ):  # one row: the normalised value is 0 whatever x is, its gradient is ill-conditioned (1/sqrt(eps))
        torch.testing.assert_close(gx.double(), r_gx, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ga.double(), r_ga, rtol=1e-3, atol=1e-3 * scale * (n**0.5))


@needs_kernel
def test_kernel_in_bf16_matches_the_formula_on_the_rounded_input() -> None:
    torch.manual_seed(0)
    x = (torch.randn(3000, 80) * 2 + 0.5).bfloat16()
    alpha = torch.rand(80) - 0.5
    grad = torch.randn(3000, 80).bfloat16()
    out, _, _, gx, ga = _kernel(x, alpha, grad, 1e-8)
    r_out, _, _, r_gx, r_ga = _reference(x.float(), alpha, grad.float(), 1e-8)
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16 and ga.dtype == torch.float32
    # One bf16 rounding of each output (relative 2^-8), computed in float32 inside.
    torch.testing.assert_close(out.double(), r_out, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(gx.double(), r_gx, rtol=8e-3, atol=2e-2)
    torch.testing.assert_close(ga.double(), r_ga, rtol=1e-3, atol=1e-2)


@needs_kernel
def test_constant_column_and_huge_values_stay_finite() -> None:
    x = torch.randn(500, 6) * 1e4
    x[:, 2] = 3.0  # zero batch variance: z = 0 everywhere, p = 1/2
    alpha = torch.full((6,), 0.25)
    grad = torch.randn(500, 6)
    out, _, var, gx, ga = _kernel(x, alpha, grad, 1e-8)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all() and torch.isfinite(ga).all()
    assert float(var[2]) == 0.0  # the shifted moments of a constant column are exactly 0
    torch.testing.assert_close(out[:, 2], torch.full((500,), 3.0 * (0.25 + 0.75 * 0.5)))


@needs_kernel
def test_batch_variance_keeps_its_precision_far_from_zero_mean() -> None:
    """|mean| = 1000 std: E[x^2] - E[x]^2 in float would lose the variance to cancellation."""
    torch.manual_seed(4)
    x = torch.randn(20000, 8) + 1000.0
    _, mean, var, _, _ = _kernel(x, torch.zeros(8), torch.randn(20000, 8), 1e-8)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), x64.var(0, unbiased=False), rtol=1e-3, atol=1e-4)


@needs_kernel
def test_several_threads_give_the_single_thread_result() -> None:
    torch.manual_seed(1)
    x, grad = torch.randn(5000, 37), torch.randn(5000, 37)
    alpha = torch.rand(37)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kernel(x, alpha, grad, 1e-8)
        torch.set_num_threads(2)
        two = _kernel(x, alpha, grad, 1e-8)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_dice_module_takes_the_kernel_in_training_and_updates_running_estimates() -> None:
    torch.manual_seed(2)
    d = Dice(9, eps=1e-6, momentum=0.2)
    torch.nn.init.uniform_(d.alpha, -1, 1)
    x = torch.randn(400, 9) * 2 + 1
    calls: list[int] = []
    real = fused_dice.dice_train

    def spy(*args):
        calls.append(1)
        return real(*args)

    fused_dice.dice_train, saved = spy, fused_dice.dice_train
    try:
        out = d(x)
    finally:
        fused_dice.dice_train = saved
    assert calls == [1]
    want, mean, var = _formula(x, d.alpha.detach(), 1e-6)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d.running_mean, 0.2 * mean)
    torch.testing.assert_close(d.running_var, 0.8 + 0.2 * var, rtol=1e-5, atol=1e-6)
