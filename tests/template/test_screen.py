"""The ensemble's screening pass (screen.py) and members of several input variants on one pass (predictor.py)."""

import numpy as np
import pytest
import torch
from inputs import channel_plan
from predictor import SlicePredictor, predict_together
from screen import Screen, screened_together
from volumes import Volume

WINDOW = [(0.0, 100.0)]  # HU 0..100 -> 0..1
PLAN = channel_plan("slices", 1, 3)


class Brightness(torch.nn.Module):
    """Foreground logit gain * (centre channel - level) at each pixel plus the centre channel's mean over the
    whole slice (so any change to a slice's input shows in every pixel); counts the slices it is run on."""

    def __init__(self, level: float, gain: float = 40.0):
        super().__init__()
        self.level, self.gain, self.slices_seen = level, gain, 0

    def forward(self, x):
        self.slices_seen += x.shape[0]
        centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        logit = self.gain * (centre - self.level) + centre.mean(dim=(-2, -1), keepdim=True)
        return torch.cat([torch.zeros_like(centre), logit], dim=1)


def head_with_bleed() -> Volume:
    """Air slices 0 and 5; head tissue (40 HU) on slices 1..4, widest on slice 1; a bright spot (80 HU) on
    slice 2 only."""
    image = np.full((64, 64, 6), -1000, np.int16)
    image[20:36, 10:50, 1:5] = 40
    image[8:56, 4:60, 1] = 40
    image[24:30, 20:30, 2] = 80
    return Volume("h", image, None, np.eye(4))


def predictors(*models, plan=PLAN, windows=WINDOW) -> list[SlicePredictor]:
    """Members as the template's defaults run them: air-only slices left out."""
    return [SlicePredictor(m, plan, windows, 8, 2, torch.device("cpu"), amp=False, tta=False, skip_air_slices=True)
            for m in models]


def test_later_members_run_only_where_the_screen_sees_foreground():
    """Two screening members see the bright spot (slice 2) only; three later members, which would call all
    head tissue foreground, run on slice 2 alone. Slice 2 is the whole ensemble's; the skipped slices carry
    the screening members' mean; air slices are nobody's."""
    screening, later = [Brightness(0.6), Brightness(0.6)], [Brightness(0.3) for _ in range(3)]
    volume = head_with_bleed()
    result = screened_together(predictors(*screening, *later), volume, Screen(members=(0, 1), below=0.05),
                               keep_masks=True)
    assert result.skipped == [1, 3, 4]
    assert [m.slices_seen for m in later] == [1, 1, 1] and [m.slices_seen for m in screening] == [4, 4]
    for model in screening + later:
        model.slices_seen = 0
    full, full_masks = predict_together(predictors(*screening, *later), volume, keep_masks=True)
    np.testing.assert_allclose(result.total[..., 2], full[..., 2], atol=1e-6)
    screen_sum, _ = predict_together(predictors(*screening), volume)
    np.testing.assert_allclose(result.total[..., [1, 3, 4]], screen_sum[..., [1, 3, 4]] * 5 / 2, atol=1e-5)
    np.testing.assert_array_equal(result.total[0, ..., [0, 5]], 5.0)  # air: background by every member
    assert not (result.total[1, ..., [1, 3, 4]] > 2.5).any() and (full[1, ..., [1, 3, 4]] > 2.5).any()
    for mask, whole in zip(result.masks[:2], full_masks[:2]):
        np.testing.assert_array_equal(mask, whole)
    assert result.masks[2:] == [None, None, None]  # they skipped slices: no whole mask to report


def test_complete_if_runs_the_skipped_slices_and_gives_the_whole_ensemble():
    screening, later = [Brightness(0.6)], [Brightness(0.3), Brightness(0.5)]
    volume, asked = head_with_bleed(), []

    def complete(total):
        asked.append(total.copy())
        return True

    result = screened_together(predictors(*screening, *later), volume, Screen(members=(0,), below=0.05),
                               keep_masks=True, complete_if=complete)
    full, full_masks = predict_together(predictors(*screening, *later), volume, keep_masks=True)
    np.testing.assert_allclose(result.total, full, atol=1e-5)
    for mask, whole in zip(result.masks, full_masks):
        np.testing.assert_array_equal(mask, whole)
    assert result.skipped == [] and len(asked) == 1 and asked[0].shape == full.shape
    assert [m.slices_seen for m in later] == [4 + 4, 4 + 4]  # slice 2, then 1, 3 and 4; again for `full`


def test_nothing_is_skipped_when_the_screen_sees_foreground_everywhere_or_screens_with_every_member():
    volume = head_with_bleed()
    result = screened_together(predictors(Brightness(0.3), Brightness(0.6)), volume, Screen((0,), 0.05))
    assert result.skipped == []
    full, _ = predict_together(predictors(Brightness(0.3), Brightness(0.6)), volume)
    np.testing.assert_allclose(result.total, full, atol=1e-6)
    alone = screened_together(predictors(Brightness(0.6)), volume, Screen((0,), 0.05), keep_masks=True)
    assert alone.skipped == [] and alone.masks[0] is not None


def test_a_scan_the_screen_sees_nothing_on_runs_no_later_member_at_all():
    image = head_with_bleed().image.copy()
    image[image == 80] = 40  # no bright spot: nothing for the screening member to see
    volume = Volume("normal", image, None, np.eye(4))
    screening, later = Brightness(0.6), Brightness(0.3)
    result = screened_together(predictors(screening, later), volume, Screen((0,), 0.05), keep_masks=True)
    assert result.skipped == [1, 2, 3, 4] and later.slices_seen == 0 and result.masks[1] is None
    alone, _ = predict_together(predictors(Brightness(0.6)), volume)
    np.testing.assert_allclose(result.total, alone * 2, atol=1e-5)


def test_screening_members_need_not_come_first_and_masks_stay_in_the_members_order():
    volume = head_with_bleed()
    models = [Brightness(0.3), Brightness(0.6), Brightness(0.3)]
    result = screened_together(predictors(*models), volume, Screen(members=(1,), below=0.05), keep_masks=True)
    alone = predictors(Brightness(0.6))[0].predict_slices_last(volume)
    assert result.skipped == [1, 3, 4] and [m.slices_seen for m in models] == [1, 4, 1]
    assert result.masks[0] is None and result.masks[2] is None
    np.testing.assert_array_equal(result.masks[1], alone.argmax(0))


@pytest.mark.parametrize("settings, message", [
    ({"members": [0, 0], "below": 0.05}, r"\[0, 0\] are not distinct member indices 0..2"),
    ({"members": [3], "below": 0.05}, "not distinct member indices 0..2"),
    ({"members": [-1], "below": 0.05}, "not distinct member indices"),
    ({"members": [], "below": 0.05}, "not distinct member indices"),
    ({"members": [True], "below": 0.05}, "not distinct member indices"),
    ({"members": [0]}, "below None is not a probability between 0 and 0.5"),
    ({"members": [0], "below": 0.5}, "below 0.5 is not a probability"),
    ({"members": [0], "below": 0}, "below 0 is not a probability"),
])
def test_a_bad_screen_entry_names_its_file_and_the_fix(settings, message):
    with pytest.raises(ValueError, match=message + r".*fix it in ensemble.json or set \"screen\" to null"):
        Screen.from_settings(settings, 3, "ensemble.json")
    assert Screen.from_settings({"members": [2, 0], "below": 0.25}, 3, "x") == Screen((2, 0), 0.25)


def test_members_of_several_input_variants_share_one_pass():
    """A 'slices' member (3 adjacent slices, one window) and a 'windows' member (one slice, 3 windows) cut the
    scan alike: together they give the sum of what each gives alone; their channels are built apart."""
    torch.manual_seed(0)
    windows = [(0.0, 100.0), (-50.0, 150.0), (20.0, 60.0)]
    slices_member = predictors(torch.nn.Conv2d(3, 2, 1))[0]
    windows_member = predictors(torch.nn.Conv2d(3, 2, 1), plan=channel_plan("windows", 3, 1), windows=windows)[0]
    assert slices_member.batch_key == windows_member.batch_key
    assert slices_member.input_key != windows_member.input_key
    volume = head_with_bleed()
    alone = [p.predict_slices_last(volume) for p in (slices_member, windows_member)]
    total, masks = predict_together([slices_member, windows_member], volume, keep_masks=True)
    np.testing.assert_allclose(total, alone[0] + alone[1], atol=1e-5)
    for mask, probabilities in zip(masks, alone):
        np.testing.assert_array_equal(mask, probabilities.argmax(0))


def test_a_slice_whose_peak_is_exactly_the_screens_probability_is_run_by_every_member():
    """Skipped are the slices whose screening mean stays below `below`; one that reaches it is not."""
    volume = head_with_bleed()
    screen_sum, _ = predict_together(predictors(Brightness(0.9, gain=10.0)), volume)
    peaks = (1.0 - screen_sum[0]).reshape(-1, screen_sum.shape[-1]).max(axis=0)
    assert 0.05 < peaks[2] < 0.5 and (peaks[[1, 3, 4]] < peaks[2] / 2).all()  # a faint spot on slice 2 alone
    members = [Brightness(0.9, gain=10.0), Brightness(0.3)]
    result = screened_together(predictors(*members), volume, Screen((0,), float(peaks[2])))
    assert result.skipped == [1, 3, 4] and members[1].slices_seen == 1
    full, _ = predict_together(predictors(Brightness(0.9, gain=10.0), Brightness(0.3)), volume)
    np.testing.assert_allclose(result.total[..., 2], full[..., 2], atol=1e-6)  # the later member's answer there
