"""A driver that dies takes its trainer with it; two drivers never train one bundle at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from autoseg2d.run.bundles import TrainingError, exclusive

# A driver stand-in: starts a long "trainer" the way train_bundle does and prints its pid.
DRIVER = """
import subprocess, sys, time
from autoseg2d.run.bundles import _die_with_parent
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], preexec_fn=_die_with_parent)
print(child.pid, flush=True)
time.sleep(3600)
"""
DEATH_WAIT_S = 60  # the kernel signals the trainer at once; this bound only stops a failing test


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead too
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_a_killed_driver_takes_its_trainer_with_it():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    trainer = int(driver.stdout.readline())
    assert alive(trainer)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + DEATH_WAIT_S
    while alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = alive(trainer)
    if survived:  # a trainer without the parent-death signal would outlive the test by an hour
        os.kill(trainer, signal.SIGKILL)
    assert not survived


def test_a_bundle_in_training_cannot_be_trained_twice(tmp_path):
    with exclusive(tmp_path):
        with pytest.raises(TrainingError, match="is being trained by another process"):
            with exclusive(tmp_path):
                pass
    with exclusive(tmp_path):  # released afterwards
        pass
