"""train.py on CUDA with AMP for a few epochs on a generated set (run where a GPU is lent)."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autoseg2d.synthetic.head_ct import write_dataset  # noqa: E402
from autoseg2d.templates import bundle_files  # noqa: E402


def main() -> None:
    assert torch.cuda.is_available(), "this smoke check needs a GPU"
    work = Path(tempfile.mkdtemp())
    datalist = write_dataset(work / "data", num_train=8, num_test=0, num_folds=2, size=128, num_slices=12)
    bundle = work / "segresnet2d_0"
    shutil.copytree(REPO / "algorithm_templates" / "segresnet2d", bundle)
    command = [sys.executable, str(bundle / "scripts" / "train.py"), "run",
               f"--config_file={bundle / 'configs' / 'hyper_parameters.yaml'}",
               f"--data_list_file_path={datalist}", f"--data_file_base_dir={datalist.parent}",
               "--num_epochs=6", "--num_epochs_per_validation=3", "--roi_size=96,96", "--batch_size=16",
               "--num_workers=4",
               "--cache_in_memory=false", "--amp=true"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    print(done.stdout[-3000:], done.stderr[-3000:])
    assert done.returncode == 0
    log = bundle_files(bundle).text_log.read_text()
    assert "on cuda" in log and "epoch 6/6" in log
    assert any((bundle / "cache").glob("*.image.npy")), "memory-mapped cache not written"
    print(json.dumps({"cuda_smoke": "ok", "device": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
