"""The tables' bootstrap intervals and paired differences against explicit loops (and scikit-learn's AP)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from train.stats import chance_level, draw_indices, interval, paired_difference


def _example(seed: int = 0, seeds: int = 2, videos: int = 7, classes: int = 3, skill: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, videos)
    scores = rng.normal(size=(seeds, videos, classes))
    scores[:, np.arange(videos), labels] += skill  # better than chance, not perfect
    return scores, labels


def test_interval_matches_an_explicit_loop_over_the_same_draws():
    scores, labels = _example()
    seed_idx, video_idx = draw_indices(2, 7, draws=200)
    by_hand = []
    for seeds, videos in zip(seed_idx, video_idx, strict=True):
        accs = []
        for s in seeds:
            hits = [int(np.argmax(scores[s, v]) == labels[v]) for v in videos]
            accs.append(sum(hits) / len(hits))
        by_hand.append(sum(accs) / len(accs))
    ci = interval(scores, labels, "acc1", draws=200)
    assert ci.low == pytest.approx(np.percentile(by_hand, 2.5)) and ci.high == pytest.approx(
        np.percentile(by_hand, 97.5)
    )
    own = np.mean([np.mean(np.argmax(scores[s], 1) == labels) for s in range(2)])
    assert ci.estimate == pytest.approx(own)
    # mAP: recomputed on every draw, against scikit-learn's AP per class
    positives = np.eye(3, dtype=bool)[labels]
    by_hand = []
    seed_idx, video_idx = draw_indices(2, 7, draws=30)
    for seeds, videos in zip(seed_idx, video_idx, strict=True):
        maps = []
        for s in seeds:
            y, x = positives[videos], scores[s][videos]
            aps = [average_precision_score(y[:, c], x[:, c]) for c in range(3) if y[:, c].any()]
            maps.append(np.mean(aps))
        by_hand.append(np.mean(maps))
    ci = interval(scores, labels, "map", draws=30)
    assert ci.low == pytest.approx(np.percentile(by_hand, 2.5)) and ci.high == pytest.approx(
        np.percentile(by_hand, 97.5)
    )


def test_the_interval_shrinks_as_the_test_split_grows():
    scores, labels = _example(videos=40, seeds=3)
    small = interval(scores, labels, "acc1")
    big = interval(np.tile(scores, (1, 16, 1)), np.tile(labels, 16), "acc1")  # the same videos, 16 times as many
    assert big.estimate == pytest.approx(small.estimate)
    assert (big.high - big.low) < 0.5 * (small.high - small.low)


def test_a_row_against_itself_differs_by_exactly_zero():
    scores, labels = _example(videos=30, seeds=3)
    for metric in ("acc1", "map"):
        d = paired_difference(scores, scores, labels, metric, draws=100)
        assert d.estimate == 0.0 and d.low == 0.0 and d.high == 0.0 and not d.excludes_zero()


def test_a_clearly_better_row_is_resolved_and_pairing_narrows_the_interval():
    base, labels = _example(videos=200, seeds=3, skill=0.5)
    better = base.copy()
    better[:, np.arange(200), labels] += 1.5  # the same videos and noise, a stronger signal
    d = paired_difference(better, base, labels, "acc1")
    assert d.excludes_zero() and d.low > 0
    a, b = interval(better, labels, "acc1"), interval(base, labels, "acc1")
    assert (d.high - d.low) < (a.high - a.low) + (b.high - b.low)  # shared videos cancel in the pairing


def test_chance_levels():
    labels = np.array([0, 1, 2, 2])
    assert chance_level(labels, "acc1", 4) == 0.25 and chance_level(labels, "acc5", 4) == 1.0
    multi = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert chance_level(multi, "map", 3) == pytest.approx((3 / 4 + 1 / 4) / 2)  # class 2 has no positive


def test_the_order_confusion_against_a_hand_count():
    """Same-set pairs (0, 1) and (2, 3); class 4 has no partner. The order confusion is the share of videos
    whose top-1 class is their class's partner, with the same draws as Acc@1."""
    partner = np.array([1, 0, 3, 2, -1])
    labels = np.array([0, 0, 1, 2, 3, 3])
    top = np.array([[1, 0, 1, 2, 2, 4], [0, 0, 0, 3, 2, 2]])  # (S, N) seed s's top-1 per video
    scores = np.eye(5)[top]  # (S, N, C)
    # seed 0: videos 0 (0->1) and 4 (3->2) confused: 2/6; seed 1: 2 (1->0), 3 (2->3), 4 and 5 (3->2): 4/6
    assert interval(scores, labels, "order", partner=partner).estimate == pytest.approx((2 / 6 + 4 / 6) / 2)
    seed_idx, video_idx = draw_indices(2, 6, draws=100)
    confused = top == partner[labels][None]  # (S, N)
    by_hand = [np.mean([confused[s, v].mean() for s in seeds]) for seeds, v in zip(seed_idx, video_idx, strict=True)]
    ci = interval(scores, labels, "order", draws=100, partner=partner)
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    assert paired_difference(scores, scores, labels, "order", partner=partner).estimate == 0.0
    assert chance_level(labels, "order", 5) == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="partner"):
        interval(scores, np.array([4, 0, 1, 2, 3, 3]), "order", partner=partner)  # class 4 has no partner
