"""wpcrack scale-check: the views, the table, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wpcrack.config import load_config
from wpcrack.errors import ConfigError
from wpcrack.diagnostics.scale_check import blur, check, scale_check, shrink

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


class SizeJudge(torch.nn.Module):
    """A classifier that looks only at scale: any image narrower than 48 px is 'crack'."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), 1.0 if x.shape[-1] < 48 else 0.0)


def test_views_keep_or_change_the_size():
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    assert shrink(rgb, 2).shape == (32, 40, 3)
    soft = blur(rgb, 2)
    assert soft.shape == rgb.shape and soft.std() < rgb.std()  # same size, fine detail gone


def test_a_scale_judging_classifier_is_caught():
    rng = np.random.default_rng(1)
    crack = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    nocrack = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    table = scale_check(SizeJudge(), crack, nocrack, factor=2)
    called = {(r["images"], r["seen"]): r["called crack"] for _, r in table.iterrows()}
    assert called[("crack-free", "as prepared")] == 0.0 and called[("crack-free", "shrunk 2x")] == 1.0
    assert called[("crack", "blurred 2x (shrunk, enlarged back)")] == 0.0
    assert list(table["count"]) == [3, 3, 3, 2, 2, 2]


def test_refuses_the_test_split_and_a_factor_that_does_not_shrink(tmp_path):
    cfg = load_config(PARAMS, dataset="synthetic")
    with pytest.raises(ConfigError, match="test split"):
        check(cfg, tmp_path, split="test")
    with pytest.raises(ConfigError, match="above 1"):
        check(cfg, tmp_path, factor=1.0)
