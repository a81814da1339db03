"""planning.py: data statistics -> settings, on literal DataAnalyzer-shaped dicts."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

TEMPLATE = Path(__file__).resolve().parents[2] / "algorithm_templates" / "segresnet2d"


def _load_planning():
    spec = importlib.util.spec_from_file_location("segresnet2d_planning", TEMPLATE / "scripts" / "planning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


planning = _load_planning()
DEFAULTS = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())


def _intensity(low: float, high: float) -> dict:
    return {"max": high + 5, "mean": (low + high) / 2, "median": (low + high) / 2, "min": low - 5, "stdev": 10.0,
            "percentile_00_5": low, "percentile_10_0": low + 1, "percentile_90_0": high - 1, "percentile_99_5": high}


def summary_stats(shape=(512, 512, 30), labels=(0, 1), fg_hu=(40.0, 85.0), image_hu=(-1024.0, 1800.0), n_cases=100):
    """datastats.yaml as DataAnalyzer writes it, with only the keys planning may read."""
    return {"stats_summary": {
        "image_stats": {"shape": {"median": list(shape), "mean": list(shape)},
                        "spacing": {"median": [0.45, 0.45, 5.0]},
                        "intensity": _intensity(*image_hu)},
        "image_foreground_stats": {"intensity": _intensity(*fg_hu)},
        "label_stats": {"labels": list(labels)},
        "n_cases": n_cases,
    }}


def case_stats(shape=(512, 512, 30), labels=(0, 1), fg_hu=(40.0, 85.0), image_hu=(-1024.0, 1800.0)):
    """One entry of datastats_by_case.yaml's stats_by_cases (per-channel lists, as MONAI writes them)."""
    return {"image_filepath": "case.nii.gz",
            "image_stats": {"shape": [list(shape)], "channels": 1, "intensity": [_intensity(*image_hu)]},
            "image_foreground_stats": {"intensity": [_intensity(*fg_hu)]},
            "label_stats": {"labels": list(labels)}}


def derive(stats, by_case=None, **kwargs):
    return planning.derive_settings(stats, by_case, planning.PlanningDefaults.from_config(DEFAULTS), **kwargs)


def test_thick_slice_512_ct_reproduces_the_paper_geometry():
    settings, notes = derive(summary_stats(), device="cuda", gpu_memory_gb=80.0)
    assert settings["roi_size"] == DEFAULTS["roi_size"] == [384, 384]
    assert settings["network"] == {"blocks_down": DEFAULTS["network"]["blocks_down"]}
    assert settings["batch_size"] == DEFAULTS["batch_size"]
    assert settings["output_classes"] == 2
    # 40..85 HU widened by 25 % of 45 HU on each side, rounded outwards to 5 HU
    assert settings["ct_windows_hu"] == [[25, 100], [-80, 160], [-1025, 1800]]
    assert set(settings) == {"output_classes", "ct_windows_hu", "roi_size", "network", "batch_size", "num_epochs"}
    assert len(notes) == 1 + 1 + 3 + 4  # source, classes, three windows, roi, blocks, batch, epochs
    assert any("roi_size [384, 384]" in n and "[512, 512]" in n for n in notes)


def test_gpu_memory_and_cpu_limit_the_batch():
    small_gpu, notes = derive(summary_stats(), device="cuda:0", gpu_memory_gb=8.0)
    assert small_gpu["batch_size"] == int((8.0 * 0.85 - 0.5) / 0.331) == 19
    assert any("19 fit in" in n for n in notes)
    cpu, _ = derive(summary_stats(), device="cpu")
    assert cpu["batch_size"] == planning.CPU_BATCH_SIZE


def test_small_64_ct_scales_crop_levels_batch_and_epochs():
    stats = summary_stats(shape=(64, 64, 8), n_cases=5)
    settings, notes = derive(stats, device="cuda", gpu_memory_gb=80.0)
    assert settings["roi_size"] == [48, 48]
    assert settings["network"]["blocks_down"] == DEFAULTS["network"]["blocks_down"][:4]
    assert settings["batch_size"] == 40  # more pixels would fit, but there are only 5 x 8 slices
    assert settings["num_epochs"] == 4 * DEFAULTS["num_epochs"]
    assert any("4 levels" in n for n in notes)


@pytest.mark.parametrize("side", [1, 3, 4, 7, 10, 33, 64, 100, 250, 511, 512, 700, 1024])
def test_crop_fits_slice_and_halves_evenly_at_every_level(side):
    roi, _ = planning.derive_roi_size([(side, side)], [384, 384], 5)
    blocks, _ = planning.derive_blocks_down(roi, [2, 4, 4, 4, 4])
    divisor = 2 ** (len(blocks) - 1)
    assert all(r % divisor == 0 and divisor <= r <= max(side, 1) for r in roi)


def test_crop_uses_the_median_slice_and_reports_smaller_ones():
    roi, note = planning.derive_roi_size([(512, 512)] * 4 + [(256, 256)], [384, 384], 5)
    assert roi == [384, 384]
    assert "1 of 5 cases have smaller slices" in note


def test_epochs_scale_with_training_slices():
    assert planning.derive_num_epochs(planning.REFERENCE_TRAINING_SLICES, 300, 5)[0] == 300
    assert planning.derive_num_epochs(planning.REFERENCE_TRAINING_SLICES * 4, 300, 5)[0] == 150
    assert planning.derive_num_epochs(10**7, 300, 5)[0] == 75
    assert planning.derive_num_epochs(1, 300, 5)[0] == 1200


def test_mri_gets_no_windows():
    settings, notes = derive(summary_stats(fg_hu=(200.0, 900.0), image_hu=(0.0, 1500.0)), modality="MRI")
    assert settings["ct_windows_hu"] == []
    assert any("z-score" in n for n in notes)


def test_multi_class_labels_keep_a_channel_per_id():
    settings, notes = derive(summary_stats(labels=(0, 1, 2, 4)))
    assert settings["output_classes"] == 5
    assert any("ids [3] never occur" in n for n in notes)


def test_no_foreground_label_is_an_error():
    with pytest.raises(planning.PlanningError, match="no foreground label"):
        derive(summary_stats(labels=(0,)))


def test_by_case_median_ignores_cases_without_a_label():
    cases = [case_stats(fg_hu=(40.0, 85.0))] * 3 + [case_stats(labels=(0,), fg_hu=(0.0, 0.0))] * 2
    settings, notes = derive(summary_stats(fg_hu=(24.0, 51.0)), cases)
    assert settings["ct_windows_hu"][0] == [25, 100]
    assert "median over 5 cases, 3 with a label" in notes[0]


def test_by_case_file_dict_is_accepted():
    cases = [case_stats(shape=(256, 256, 20))] * 2
    settings, _ = derive(summary_stats(), {"stats_by_cases": cases})
    assert settings["roi_size"] == [192, 192]


@pytest.mark.parametrize("fg_hu, reason", [((-1000.0, 1200.0), "spans more than"), ((80.0, 40.0), "not an increasing")])
def test_implausible_foreground_falls_back_to_config_windows(fg_hu, reason):
    settings, notes = derive(summary_stats(fg_hu=fg_hu))
    assert settings["ct_windows_hu"][:2] == DEFAULTS["ct_windows_hu"][:2]
    assert any("standard window" in n and reason in n for n in notes)


def test_missing_intensity_stats_fall_back_with_a_note():
    stats = summary_stats()
    del stats["stats_summary"]["image_foreground_stats"]
    del stats["stats_summary"]["image_stats"]["intensity"]
    settings, notes = derive(stats)
    assert settings["ct_windows_hu"] == DEFAULTS["ct_windows_hu"]
    assert sum("standard window" in n for n in notes) == 3


@pytest.mark.parametrize("remove, message", [
    (lambda s: s.pop("stats_summary"), "datastats.yaml has no key 'stats_summary'"),
    (lambda s: s["stats_summary"].pop("label_stats"), "no key 'stats_summary.label_stats'"),
    (lambda s: s["stats_summary"]["image_stats"].pop("shape"), "no key 'stats_summary.image_stats.shape'"),
])
def test_missing_required_summary_keys_name_the_key_and_file(remove, message):
    stats = summary_stats()
    remove(stats)
    with pytest.raises(planning.PlanningError, match=message) as err:
        derive(stats)
    assert "datastats.yaml" in str(err.value) and "DataAnalyzer" in str(err.value)


def test_missing_by_case_key_names_the_case():
    case = case_stats()
    del case["image_stats"]
    with pytest.raises(planning.PlanningError, match=r"datastats_by_case.yaml case 1 \(case.nii.gz\).*image_stats"):
        derive(summary_stats(), [case_stats(), case])


def test_missing_default_names_the_config_file():
    defaults = copy.deepcopy(DEFAULTS)
    del defaults["network"]["blocks_down"]
    message = "hyper_parameters.yaml has no key 'network.blocks_down'.*restore it"
    with pytest.raises(planning.PlanningError, match=message):
        planning.PlanningDefaults.from_config(defaults)


def test_device_errors_list_the_options():
    with pytest.raises(planning.PlanningError, match=r"valid device types are \['cpu', 'cuda'\]"):
        derive(summary_stats(), device="tpu")
    with pytest.raises(planning.PlanningError, match="gpu_memory_gb"):
        derive(summary_stats(), device="cuda")


def test_real_data_analyzer_output(tmp_path):
    from monai.apps.auto3dseg import DataAnalyzer

    from autoseg2d.synthetic.head_ct import write_dataset

    datalist = write_dataset(tmp_path, num_train=2, num_test=0, num_folds=2, size=32, num_slices=4)
    output = tmp_path / "datastats.yaml"
    DataAnalyzer(str(datalist), str(tmp_path), output_path=str(output), device="cpu", worker=0).get_all_case_stats()
    stats = yaml.safe_load(output.read_text())
    by_case = yaml.safe_load((tmp_path / "datastats_by_case.yaml").read_text())["stats_by_cases"]
    settings, notes = derive(stats, by_case)
    assert settings["output_classes"] == 2
    assert settings["roi_size"] == [24, 24]
    low, high = settings["ct_windows_hu"][0]
    assert low < 70 < high  # synthetic blood is ~70 HU
    assert "median over 2 cases, 2 with a label" in notes[0]
