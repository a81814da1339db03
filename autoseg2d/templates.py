"""Where the driver finds the segresnet2d template: `algorithm_templates/` of the checkout it runs from.

The template is a plain folder that BundleGen copies, not an installed package, so the
driver needs a source checkout (`pip install -e .`). SEGRESNET2D_TEMPLATES points elsewhere,
e.g. at an edited copy of the template.
"""

from __future__ import annotations

import os
from pathlib import Path

ALGO_NAME = "segresnet2d"
ENV_VARIABLE = "SEGRESNET2D_TEMPLATES"
CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[1] / "algorithm_templates"


def templates_root() -> Path:
    """The folder holding segresnet2d/ (what BundleGen's templates_path_or_url takes)."""
    root = Path(os.environ.get(ENV_VARIABLE) or CHECKOUT_TEMPLATES)
    if not (root / ALGO_NAME / "scripts" / "algo.py").is_file():
        raise FileNotFoundError(
            f"the {ALGO_NAME} template is not in {root}: run the driver from a source checkout installed with"
            f" `pip install -e .`, or set {ENV_VARIABLE} to a folder that holds {ALGO_NAME}/")
    return root


def template_dir() -> Path:
    return templates_root() / ALGO_NAME


def template_config() -> Path:
    return template_dir() / "configs" / "hyper_parameters.yaml"
