"""train.py under torchrun: two gloo processes on CPU train in step and write their outputs once."""

import csv
import os
import re
import subprocess
import sys

import yaml

from tests.conftest import FAST_TRAINING, SCRIPTS


def test_two_processes_train_the_same_weights_and_write_once(bundle):
    config_file = bundle / "configs" / "hyper_parameters.yaml"
    settings = {**FAST_TRAINING, "num_epochs": 2, "num_epochs_per_validation": 1, "roi_size": "32,32", "batch_size": 4}
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(bundle / "scripts" / "train.py"), "run", f"--config_file={config_file}", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    assert re.search(r"weights agree across 2 processes \(checksum [-+.\de]+\)", output)
    log = (bundle / "model" / "training.log").read_text()
    assert log.count("epoch 2/2") == 1  # rank 1 neither logs to the file nor writes rows
    assert "x 2 processes" in log
    # The same optimizer steps as one process alone would make, each of 2 x 4 samples.
    from bundle_config import load_config
    from trainer import Trainer

    alone = Trainer(load_config(str(config_file), **{k: v for k, v in settings.items() if k != "roi_size"},
                                roi_size=[32, 32]))
    steps = re.search(r"budget: ([\d,]+) optimizer steps .* \((\d+) per step\)", log)
    assert steps and int(steps.group(1).replace(",", "")) == alone.budget.total_steps
    assert int(steps.group(2)) == 2 * alone.budget.samples_per_step
    rows = list(csv.DictReader((bundle / "model" / "training_log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    progress = yaml.safe_load((bundle / "model" / "progress.yaml").read_text())
    assert len(progress) == len({p["best_epoch"] for p in progress}) >= 1
    assert sorted(p.name for p in (bundle / "model").iterdir() if p.name.endswith(".tmp")) == []
    assert (bundle / "model" / "model.pt").is_file() and (bundle / "model" / "model_last.pt").is_file()


def test_rank_seeds_differ_per_rank():
    sys.path.insert(0, str(SCRIPTS))
    from distributed import rank_seed

    assert rank_seed(5, 0) == 5 and rank_seed(5, 1) != 5 and rank_seed(5, 1) == rank_seed(5, 1)


def test_two_nodes_on_one_machine_train_as_one_job(bundle):
    """Two torchrun launches (--nnodes=2, one process each) meet at a local c10d rendezvous, as two
    machines would at the first one's address; gloo joins them and only global rank 0 writes.

    The rendezvous store is this test's own, bound to a free port and held for the whole run (is_host=false:
    both launches are its clients), so no other process can take the port between choosing and binding it."""
    from torch.distributed import TCPStore

    config_file = bundle / "configs" / "hyper_parameters.yaml"
    settings = {**FAST_TRAINING, "num_epochs": 2, "num_epochs_per_validation": 1, "roi_size": "32,32", "batch_size": 4}
    args = [f"--{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in settings.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{store.port}",
                  "--rdzv_conf=is_host=false", "--rdzv_id=two-nodes-test"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--node_rank={rank}",
                               str(bundle / "scripts" / "train.py"), "run", f"--config_file={config_file}", *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert re.search(r"weights agree across 2 processes", outputs[0] + outputs[1])
    log = (bundle / "model" / "training.log").read_text()
    assert log.count("epoch 2/2") == 1 and "x 2 processes" in log
    assert [int(r["epoch"]) for r in csv.DictReader((bundle / "model" / "training_log.csv").open())] == [1, 2]
    assert (bundle / "model" / "model.pt").is_file()
