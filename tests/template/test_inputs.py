import numpy as np
import pytest
from inputs import apply_window, channel_plan, make_channels, slice_offsets, windows_for

WINDOWS = [(0.0, 100.0), (-20.0, 180.0), (-1000.0, 2000.0)]


def volume_with_slice_ids(depth: int = 5) -> np.ndarray:
    """Each axial slice z is filled with the HU value 10 * z, so a channel tells which slice it came from."""
    return np.broadcast_to(np.arange(depth) * 10.0, (4, 4, depth)).copy()


@pytest.mark.parametrize(("variant", "channels"), [("slices", 3), ("windows", 3), ("both", 9)])
def test_channel_counts(variant, channels):
    assert len(channel_plan(variant, len(windows_for("ct", WINDOWS)), 3)) == channels


def test_slices_variant_takes_neighbours_at_first_window():
    out = make_channels(volume_with_slice_ids(), 2, channel_plan("slices", 3, 3), WINDOWS)
    np.testing.assert_allclose(out[:, 0, 0], [0.1, 0.2, 0.3])  # slices 1, 2, 3 at window [0, 100]


def test_windows_variant_takes_centre_slice_at_each_window():
    out = make_channels(volume_with_slice_ids(), 2, channel_plan("windows", 3, 3), WINDOWS)
    np.testing.assert_allclose(out[:, 0, 0], [20 / 100, 40 / 200, 1020 / 3000], rtol=1e-6)


def test_both_variant_is_windows_times_slices():
    out = make_channels(volume_with_slice_ids(), 2, channel_plan("both", 3, 3), WINDOWS)
    expected = [(10 * (2 + o) - low) / (high - low) for low, high in WINDOWS for o in (-1, 0, 1)]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize(("z", "expected_slices"), [(0, [0, 0, 1]), (4, [3, 4, 4])])
def test_edge_slices_are_replicated(z, expected_slices):
    out = make_channels(volume_with_slice_ids(), z, channel_plan("slices", 3, 3), WINDOWS)
    np.testing.assert_allclose(out[:, 0, 0], [s / 10 for s in expected_slices])


def test_window_clips_to_unit_range():
    np.testing.assert_allclose(apply_window(np.array([-50.0, 50.0, 500.0]), (0.0, 100.0)), [0.0, 0.5, 1.0])


def test_non_ct_uses_one_identity_channel_per_slice():
    assert windows_for("mri", WINDOWS) == [None]
    assert len(channel_plan("both", len(windows_for("MRI", WINDOWS)), 3)) == 3


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="slices, windows, both"):
        channel_plan("rgb", 3, 3)


def test_even_slice_count_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        slice_offsets(4)


def test_a_window_must_be_wider_than_zero():
    with pytest.raises(ValueError, match=r"ct_windows_hu entry \[100.0, 100.0\] must have high > low"):
        windows_for("ct", [[0, 80], [100, 100]])
