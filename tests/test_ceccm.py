"""CECCM (paper eqs. 4-6, 20) against hand-computed cases, and the release's plain L1."""

from __future__ import annotations

import math

import pytest
import torch

from wpcrack.method.ceccm import centre_enhance, centre_gaussian, centre_of_mass, ceccm_loss


def _map(height, width, *pixels):
    m = torch.zeros(1, 1, height, width)
    for i, j in pixels:
        m[0, 0, i, j] = 1.0
    return m


def test_centre_of_mass_pixel_centres_in_units_of_larger_side():
    assert torch.allclose(centre_of_mass(_map(2, 4, (1, 3))), torch.tensor([[1.5 / 4, 3.5 / 4]]))
    assert torch.allclose(centre_of_mass(_map(3, 3, (0, 0), (0, 2))), torch.tensor([[1 / 6, 1 / 2]]))


def test_all_zero_cam_falls_back_to_map_centre():
    assert torch.allclose(centre_of_mass(torch.zeros(1, 1, 2, 4)), torch.tensor([[0.25, 0.5]]))
    assert torch.allclose(centre_of_mass(torch.zeros(2, 5, 5)), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))


def test_gaussian_is_round_on_non_square_maps():
    g = centre_gaussian(_map(2, 4, (1, 3)), sigma=0.25)[0, 0]
    assert g[1, 3] == pytest.approx(1.0)
    one_step = math.exp(-(0.25**2) / (2 * 0.25**2))
    assert g[0, 3] == pytest.approx(one_step)  # one row up
    assert g[1, 2] == pytest.approx(one_step)  # one column left


def test_hand_computed_loss():
    """cls CAM: pixels (0,0) and (0,2) of a 3x3 map -> centre (1/6, 1/2), each pixel 1/3 away:
    G = exp(-(1/9) / (2 * 0.25^2)) = exp(-8/9). rec CAM: pixel (2,1), its own centre, G = 1.
    Disjoint supports: loss = (2 exp(-8/9) + 1) / 9."""
    cls, rec = _map(3, 3, (0, 0), (0, 2)), _map(3, 3, (2, 1))
    enhanced = centre_enhance(cls, 0.25)[0, 0]
    assert enhanced[0, 0] == pytest.approx(math.exp(-8 / 9))
    assert ceccm_loss(cls, rec, sigma=0.25) == pytest.approx((2 * math.exp(-8 / 9) + 1) / 9)
    assert ceccm_loss(cls, rec, sigma=0.25, mode="release") == pytest.approx(3 / 9)


def test_release_mode_is_plain_mean_l1():
    a, b = torch.rand(3, 1, 5, 6), torch.rand(3, 1, 5, 6)
    assert ceccm_loss(a, b, mode="release") == pytest.approx(float((a - b).abs().mean()))
    assert ceccm_loss(a, b, sigma=1e4) == pytest.approx(float((a - b).abs().mean()), rel=1e-5)
    with pytest.raises(ValueError, match="mode"):
        ceccm_loss(a, b, mode="other")


def test_gaussian_is_a_prior_without_gradient():
    m = torch.rand(2, 1, 4, 5, requires_grad=True)
    centre_enhance(m, 0.25).sum().backward()
    assert torch.allclose(m.grad, centre_gaussian(m.detach(), 0.25))


@pytest.mark.parametrize("mode", ["paper", "release"])
def test_all_zero_cams_give_finite_loss_and_gradients(mode):
    zero = torch.zeros(2, 1, 4, 4, requires_grad=True)
    other = torch.rand(2, 1, 4, 4, requires_grad=True)
    loss = ceccm_loss(zero, other, mode=mode)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(zero.grad).all() and torch.isfinite(other.grad).all()
    assert ceccm_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), mode=mode) == 0


def test_empty_batch_is_zero_and_backpropagates():
    a = torch.zeros(0, 1, 4, 4, requires_grad=True)
    loss = ceccm_loss(a, torch.zeros(0, 1, 4, 4))
    loss.backward()
    assert loss == 0


def test_shape_checks():
    with pytest.raises(ValueError, match="differ"):
        ceccm_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="expected"):
        ceccm_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))
