"""Focal loss and label smoothing against their formulas and against BCE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from din_torchrec.training.losses import click_loss, focal_loss, smooth_labels


def _data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3, torch.randint(0, 2, (n,), generator=g).float()


def test_focal_with_gamma_0_and_alpha_half_is_half_bce() -> None:
    logits, labels = _data()
    bce = F.binary_cross_entropy_with_logits(logits, labels)
    focal = click_loss(logits, labels, kind="focal", focal_alpha=0.5, focal_gamma=0.0)
    torch.testing.assert_close(focal, 0.5 * bce)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.75, 0.5), (0.5, 5.0)])
def test_focal_matches_numpy_formula(alpha: float, gamma: float) -> None:
    logits, labels = _data(seed=1)
    z, y = logits.double().numpy(), labels.double().numpy()
    p = 1 / (1 + np.exp(-z))
    p_t = np.where(y == 1, p, 1 - p)
    a_t = np.where(y == 1, alpha, 1 - alpha)
    expected = -a_t * (1 - p_t) ** gamma * np.log(p_t)
    got = focal_loss(logits.double(), labels.double(), alpha, gamma).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Well-classified samples are down-weighted more than hard ones, relative to BCE.
    ce = -np.log(p_t)
    easy, hard = p_t > 0.9, p_t < 0.3
    if easy.any() and hard.any() and gamma > 0:
        ratio = got / (ce * a_t)  # the modulating factor (1 - p_t)^gamma
        assert ratio[easy].max() < ratio[hard].min()


def test_label_smoothing_is_bce_on_smoothed_targets() -> None:
    logits, labels = _data(seed=2)
    eps = 0.1
    smoothed = labels * 0.9 + 0.05
    torch.testing.assert_close(smooth_labels(labels, eps), smoothed)
    expected = F.binary_cross_entropy_with_logits(logits, smoothed)
    torch.testing.assert_close(click_loss(logits, labels, label_smoothing=eps), expected)
    assert not torch.allclose(click_loss(logits, labels), expected)


def test_weights_drop_padding_rows_and_unknown_kind_is_refused() -> None:
    logits, labels = _data(n=10, seed=3)
    w = torch.tensor([1.0] * 6 + [0.0] * 4)
    torch.testing.assert_close(
        click_loss(logits, labels, w), F.binary_cross_entropy_with_logits(logits[:6], labels[:6])
    )
    with pytest.raises(ValueError, match="focal"):
        click_loss(logits, labels, kind="hinge")
