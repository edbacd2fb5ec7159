"""WeightAverage: hand-computed averages, warm-up of the decay, swapping weights in and out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wpcrack.train.averaging import WeightAverage, averaged


def _model(value: float) -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(value)
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model[0].weight.fill_(value)


def test_the_average_follows_the_warmed_up_decay():
    model = _model(0.0)
    average = WeightAverage(model, decay=0.9)
    expected = 0.0
    for n, value in enumerate([10.0, 20.0, 30.0], start=1):
        _set(model, value)
        model[1].num_batches_tracked += 1
        average.update(model)
        d = min(0.9, (1 + n) / (10 + n))  # 2/11, 3/12, 4/13
        expected = d * expected + (1 - d) * value
        assert average.shadow["0.weight"].item() == pytest.approx(expected)
    assert average.shadow["1.num_batches_tracked"].item() == 3  # integers are copied, not averaged
    assert average.updates == 3


def test_applied_swaps_the_average_in_and_the_live_weights_back():
    model = _model(1.0)
    average = WeightAverage(model, decay=0.5)
    _set(model, 5.0)
    with average.applied(model):
        assert model[0].weight.item() == 1.0
        _set(model, -7.0)  # changes inside the block do not leak out
    assert model[0].weight.item() == 5.0
    with averaged(None, model):
        assert model[0].weight.item() == 5.0


def test_state_round_trips_and_reset_restarts():
    model = _model(2.0)
    average = WeightAverage(model, decay=0.5)
    _set(model, 4.0)
    average.update(model)
    copy = WeightAverage(_model(0.0), decay=0.5)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 1 and torch.equal(copy.shadow["0.weight"], average.shadow["0.weight"])
    average.reset(model)
    assert average.updates == 0 and average.shadow["0.weight"].item() == 4.0


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_model(0.0), decay=1.0)
