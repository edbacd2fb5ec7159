"""The promotion gate's rule, on hand-made scores: the benchmark and each field set within their
tolerances, and a gain somewhere."""

from __future__ import annotations

import pytest

from wpcrack.config import PromotionConfig
from wpcrack.errors import WpcrackError
from wpcrack.tracking.gate import Scores, decide

TOL = PromotionConfig(field_tolerance=1.0, benchmark_tolerance=0.5)


def test_without_a_champion_the_challenger_wins():
    assert decide(None, Scores(10.0), TOL).promoted


def test_without_field_sets_not_worse_on_the_benchmark_is_enough():
    champion = Scores(69.31)
    assert decide(champion, Scores(69.31), TOL).promoted  # a tie keeps today's rule: not worse
    verdict = decide(champion, Scores(69.30), TOL)
    assert not verdict.promoted and "worse (no field sets)" in verdict.reasons[0]


def test_a_field_gain_buys_a_benchmark_loss_within_its_tolerance():
    champion = Scores(69.31, {"town": 17.3})
    verdict = decide(champion, Scores(68.91, {"town": 28.9}), TOL)  # -0.40 on DeepCrack, +11.6 on the town
    assert verdict.promoted
    assert verdict.reasons == ("field town 28.90 vs 17.30 (+11.60)", "benchmark 68.91 vs 69.31 (-0.40)")


def test_a_loss_beyond_either_tolerance_keeps_the_champion():
    champion = Scores(69.31, {"town": 17.3, "bridge": 40.0})
    beyond_benchmark = decide(champion, Scores(68.71, {"town": 30.0, "bridge": 40.0}), TOL)  # -0.60 > 0.5
    assert not beyond_benchmark.promoted and beyond_benchmark.reasons[-1].endswith("loses more than 0.5")
    one_set_worse = decide(champion, Scores(70.0, {"town": 30.0, "bridge": 38.9}), TOL)  # bridge -1.1 > 1.0
    assert not one_set_worse.promoted
    assert one_set_worse.reasons[0] == "field bridge 38.90 vs 40.00 (-1.10): loses more than 1"


def test_no_gain_anywhere_keeps_the_champion():
    verdict = decide(Scores(69.31, {"town": 17.3}), Scores(69.31, {"town": 17.0}), TOL)
    assert not verdict.promoted and verdict.reasons[-1] == "no gain on any field set or the benchmark"


def test_a_champion_that_cannot_be_compared_is_kept_and_missing_scores_are_errors():
    assert not decide(Scores(None), Scores(90.0), TOL).promoted
    with pytest.raises(WpcrackError, match="no score on field set"):
        decide(Scores(60.0), Scores(61.0, {"town": 20.0}), TOL)
    with pytest.raises(WpcrackError, match="evaluate it first"):
        decide(Scores(60.0), Scores(None), TOL)


def test_tolerances_are_checked_in_params():
    from pathlib import Path

    from wpcrack.config import ConfigError, load_config

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    assert load_config(params).promotion == PromotionConfig()  # the documented defaults
    with pytest.raises(ConfigError, match="promotion.field_tolerance: -1.0 must be >= 0"):
        load_config(params, overrides=("promotion.field_tolerance=-1",))
