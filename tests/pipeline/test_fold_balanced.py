"""Fold-balanced ensemble members: where the size % k extra places go."""

from __future__ import annotations

from collections import Counter

from autoseg2d.pipeline.ensemble import select_members

PAPER_FOLD_DICE = (0.730, 0.851, 0.821, 0.762, 0.816)  # the paper's five cross-validation fold means
# Step between a fold's bundles, by fold: folds 0 and 3 are tight (their 4th bundle is within 1% of their best),
# fold 4 middling, folds 1 and 2 spread out (their 4th bundle, though higher in raw Dice, is 9% below their best).
SPREAD = (0.002, 0.03, 0.03, 0.002, 0.01)


def paper_records(runs: int = 9) -> list[dict]:
    """45 bundles (9 per fold) whose fold means are the paper's, the j-th best at mean + spread * (4 - j)."""
    return [{"bundle": f"f{fold}-r{j}", "score": mean + spread * (runs // 2 - j), "fold": fold, "seed": j % 3,
             "variant": f"v{j // 3}"}
            for fold, (mean, spread) in enumerate(zip(PAPER_FOLD_DICE, SPREAD)) for j in range(runs)]


def test_the_three_extra_places_go_one_each_to_the_folds_closest_to_their_own_best():
    records = paper_records()
    members = select_members(records, 18)
    per_fold = Counter(m["fold"] for m in members)
    # Ratios of each fold's 4th bundle to its best: f3 0.992, f0 0.992, f4 0.965, f1 0.907, f2 0.904. Without the
    # limit, fold 3's 5th (0.990) and fold 0's 5th (0.989) would outrank fold 4's 4th; with raw Dice the extras
    # would go to folds 1, 2 and 4, whose 4th bundles score highest.
    assert per_fold == {0: 4, 1: 3, 2: 3, 3: 4, 4: 4}
    assert sorted(per_fold.values(), reverse=True) == [4, 4, 4, 3, 3]
    extras = sorted(m["fold"] for m in members if m["reason"].startswith("extra"))
    assert extras == [0, 3, 4]
    for fold in range(5):  # each fold's members are its best bundles
        scores = sorted((r["score"] for r in records if r["fold"] == fold), reverse=True)
        assert sorted((m["score"] for m in members if m["fold"] == fold), reverse=True) == scores[:per_fold[fold]]


def test_a_fold_short_of_bundles_gives_its_places_to_the_others_one_per_fold_per_round():
    records = [r for r in paper_records() if r["fold"] != 1 or r["bundle"] == "f1-r0"]  # fold 1: one bundle
    per_fold = Counter(m["fold"] for m in select_members(records, 18))
    assert per_fold[1] == 1 and sum(per_fold.values()) == 18
    assert max(per_fold.values()) - min(c for f, c in per_fold.items() if f != 1) <= 1
