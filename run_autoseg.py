"""Command line for the segresnet2d Auto3DSeg pipeline; each subcommand calls one library function.

    python run_autoseg.py --demo                                   # the built-in synthetic demo
    python run_autoseg.py --datalist datalists/instance22.json --dataroot /data   # every stage
    python run_autoseg.py predict --input scans/ --output masks/ --work_dir work
    python run_autoseg.py predict --input scans/ --output masks/ --allow_empty   # screening: empty masks allowed
    python run_autoseg.py evaluate --pred masks/ --gt labels/
    python run_autoseg.py export --work_dir work --output ich_bundle/         # the ensemble as a MONAI bundle
    python run_autoseg.py datalist --root /data/instance22 --output datalist.json
    python run_autoseg.py COMMAND --help                           # the options of one command

Errors print one message; add --debug (or set AUTOSEG2D_DEBUG=1) for the traceback.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from autoseg2d.console import call_with_options, main
from autoseg2d.evaluation.evaluate import evaluate_folders
from autoseg2d.run.context import check_only, make_datalist
from autoseg2d.pipeline.demo import run_demo
from autoseg2d.export.bundle import export_bundle
from autoseg2d.pipeline.runner import STAGE_NAMES, predict, run_pipeline


def run(demo: bool = False, **options):
    """Run every stage (check, analyze, sweep, crossval, ensemble, distill, predict); --demo: generated CT.

    Options: --datalist, --dataroot, --work_dir (default work), --profile (gpu | cpu | demo | your YAML),
    --modality, --num_folds, --storage (an Optuna RDB URL shared by several machines),
    --skip_bad (skip bad cases instead of stopping), --until (the last stage to run). A rerun takes what
    it is not given from the work dir's run.json; a first run, from the defaults in
    autoseg2d/run/profiles.yaml (profile, folds) and the template (modality).
    """
    call_with_options(run_demo if demo else run_pipeline, options, "--demo" if demo else "run")


@functools.wraps(evaluate_folders)
def evaluate(*args, **options) -> None:
    summary = evaluate_folders(*args, **options)
    print(Path(summary["output"], "summary.md").read_text().split("## Cases")[0].strip(), flush=True)
    print(f"per-case metrics and the full summary: {summary['output']}", flush=True)


def _stage(name: str):
    # not functools.wraps(run_pipeline): fire would read run_pipeline's signature through __wrapped__ and
    # pass every option positionally to this keyword-only command
    def command(**options):
        call_with_options(run_pipeline, {**options, "until": name}, name)

    command.__doc__ = f"Run the stages up to and including {name}; options as for run."
    return command


COMMANDS = {
    "run": run,
    "demo": functools.wraps(run_demo)(lambda **options: run(demo=True, **options)),
    "check": check_only,  # the inputs alone; the pipeline's check stage also records the run
    **{name: _stage(name) for name in STAGE_NAMES[1:-1]},  # analyze, sweep, crossval, ensemble
    "predict": predict,  # new scans; the pipeline's predict stage does the datalist's testing images
    "evaluate": evaluate,
    "datalist": make_datalist,
    "export": export_bundle,
}

if __name__ == "__main__":
    sys.exit(main(COMMANDS))
