"""What every benchmark script shares: the repository on sys.path, the template and its config."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "algorithm_templates" / "segresnet2d"
sys.path[:0] = [str(REPO), str(TEMPLATE / "scripts")]

SLICE_PX = 512


def template_config(**changes) -> dict:
    config = yaml.safe_load((TEMPLATE / "configs" / "hyper_parameters.yaml").read_text())
    network = {**config["network"], **changes.pop("network", {})}
    config.update(changes, network=network)
    return config
