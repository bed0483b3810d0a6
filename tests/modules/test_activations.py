"""Dice against its formula (DIN paper eq. 8), in training and in evaluation."""

import torch

from din_torchrec.modules.activations import Dice, make_activation


def _dice_formula(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, alpha: torch.Tensor, eps: float
) -> torch.Tensor:
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return p * x + (1 - p) * alpha * x


def test_dice_training_uses_batch_statistics_and_updates_running_estimates() -> None:
    torch.manual_seed(0)
    d = Dice(5, eps=1e-6, momentum=0.1)
    with torch.no_grad():
        d.alpha.copy_(torch.linspace(-0.5, 0.7, 5))
    x = torch.randn(64, 5) * 3 + 1
    out = d(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    torch.testing.assert_close(out, _dice_formula(x, mean, var, d.alpha, 1e-6), rtol=1e-5, atol=1e-5)
    # running = (1 - momentum) * initial + momentum * batch
    torch.testing.assert_close(d.running_mean, 0.1 * mean)
    torch.testing.assert_close(d.running_var, 0.9 * torch.ones(5) + 0.1 * var)


def test_dice_eval_uses_running_statistics_not_the_batch() -> None:
    d = Dice(3, eps=1e-8)
    with torch.no_grad():
        d.alpha.fill_(0.25)
        d.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        d.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    d.eval()
    x = torch.randn(10, 3)
    out = d(x)
    torch.testing.assert_close(out, _dice_formula(x, d.running_mean, d.running_var, d.alpha, 1e-8))
    # A single row gives the same answer in eval (no dependence on the batch).
    torch.testing.assert_close(d(x[:1]), out[:1])
    assert torch.equal(d.running_mean, torch.tensor([1.0, -2.0, 0.5]))


def test_dice_over_leading_dims_and_gradients_reach_alpha() -> None:
    torch.manual_seed(1)
    d = Dice(4)
    x = torch.randn(3, 7, 4, requires_grad=True)
    out = d(x)
    flat = x.reshape(-1, 4)
    ref = _dice_formula(x, flat.mean(0), flat.var(0, unbiased=False), d.alpha, 1e-8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert d.alpha.grad is not None and d.alpha.grad.abs().sum() > 0


def test_make_activation_names() -> None:
    assert isinstance(make_activation("dice", 3), Dice)
    assert isinstance(make_activation("prelu", 3), torch.nn.PReLU)
    try:
        make_activation("swish", 3)
    except ValueError as e:
        assert "swish" in str(e)
    else:
        raise AssertionError("unknown activation accepted")


def test_dice_gate_in_bf16_equals_the_bf16_formula_bit_for_bit() -> None:
    """DiceGate computes a bf16 gate through an fp32 addcmul (a faster CPU path); the values must be those
    of the plain bf16 ``x * (alpha + (1 - alpha) * sigmoid(z))``, so training in bf16 is unchanged by it."""
    from din_torchrec.modules.activations import DiceGate

    g = torch.Generator().manual_seed(3)
    x, z = (torch.randn(300, 24, generator=g).bfloat16() for _ in range(2))
    alpha = torch.rand(24, generator=g).bfloat16()
    p = torch.sigmoid(z)
    want = x * torch.addcmul(alpha, p, 1 - alpha)
    assert torch.equal(DiceGate.apply(x, z, alpha), want)
