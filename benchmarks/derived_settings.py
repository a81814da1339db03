"""Print the settings planning.py derives for generated CT sets, with the numbers behind them.

    python benchmarks/derived_settings.py            # 10 cases of 512 x 512 x 30 and of 64 x 64 x 8

Runs MONAI's DataAnalyzer on each generated set, then planning.derive_settings for a CPU and
for an 80 GB GPU; prints the settings and the notes that go into the filled config's header.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "algorithm_templates" / "segresnet2d"
sys.path[:0] = [str(REPO), str(TEMPLATE / "scripts")]

from monai.apps.auto3dseg import DataAnalyzer  # noqa: E402

from autoseg2d.synthetic.head_ct import write_dataset  # noqa: E402
from planning import PlanningDefaults, derive_settings  # noqa: E402

SETS = ((512, 30), (64, 8))
NUM_CASES = 10


def main() -> None:
    config = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    defaults = PlanningDefaults.from_config(config)  # once: the same for every set and device
    with tempfile.TemporaryDirectory() as tmp:
        for size, slices in SETS:
            root = Path(tmp) / f"ct{size}"
            datalist = write_dataset(root, num_train=NUM_CASES, num_test=0, num_folds=5, size=size,
                                     num_slices=slices)
            stats = root / "datastats.yaml"
            DataAnalyzer(str(datalist), str(root), output_path=str(stats), device="cpu",
                         worker=0).get_all_case_stats()
            data_stats = yaml.safe_load(stats.read_text())
            by_case = yaml.safe_load((root / "datastats_by_case.yaml").read_text())
            for device, gpu_gb in (("cpu", None), ("cuda", 80.0)):
                settings, notes = derive_settings(data_stats, by_case, defaults, "ct", device, gpu_gb)
                print(f"\n## {NUM_CASES} generated cases of {size} x {size} x {slices}, "
                      f"{device}{f' ({gpu_gb:g} GB)' if gpu_gb else ''}")
                print(yaml.safe_dump(settings, default_flow_style=None, sort_keys=False).strip())
                print("\n".join(f"  - {note}" for note in notes))


if __name__ == "__main__":
    main()
