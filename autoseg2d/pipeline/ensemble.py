"""Stage 5: the best-N checkpoint ensemble, its post-processing, and case-by-case prediction.

Members are loaded once; each case's probabilities are summed member by member, so memory
holds one case at a time whatever the number of cases. Finished output files are skipped,
so an interrupted prediction run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np

from autoseg2d.evaluation.postprocess import apply_postprocessing, choose_postprocessing
from autoseg2d.pipeline.crossval import validation_cases
from autoseg2d.pipeline.inference import case_name, load_inferer, read_mask
from autoseg2d.atomic_files import atomic_path, write_text_atomic
from autoseg2d.pipeline.workdir import WorkDir

logger = logging.getLogger(__name__)


def select_members(records: list[dict], size: int) -> list[dict]:
    """The `size` bundles with the best validation Dice, across variants, runs and folds."""
    ranked = sorted(records, key=lambda r: r["score"], reverse=True)[:size]
    return [{k: r[k] for k in ("bundle", "score", "fold", "seed", "variant")} for r in ranked]


class EnsemblePredictor:
    def __init__(self, work: WorkDir, ensemble: dict):
        self.members = [load_inferer(work.absolute(m["bundle"])) for m in ensemble["members"]]
        self.mode = ensemble["mode"]
        self.postprocessing = ensemble.get("postprocessing")

    def probabilities(self, image: Path, members: list | None = None) -> np.ndarray:
        """Mean class probabilities (mode mean) or vote fractions (mode vote), (C, X, Y, Z) in the file grid."""
        total = None
        for inferer in members or self.members:
            probs = inferer.infer(str(image)).numpy()
            if self.mode == "vote":
                probs = np.eye(probs.shape[0], dtype=np.float32)[probs.argmax(0)].transpose(3, 0, 1, 2)
            total = probs if total is None else total + probs
        return total / len(members or self.members)

    def mask(self, probabilities: np.ndarray, spacing_mm: tuple) -> np.ndarray:
        if self.postprocessing and probabilities.shape[0] == 2:
            return apply_postprocessing(probabilities[1], spacing_mm, self.postprocessing)
        return probabilities.argmax(0).astype(np.uint8)


def out_of_fold_cases(predictor: EnsemblePredictor, ensemble: dict, run: dict) -> list[dict]:
    """Each training case predicted by the members that did not train on it (those of its fold)."""
    cases = []
    for fold in sorted({m["fold"] for m in ensemble["members"]}):
        members = [inferer for inferer, m in zip(predictor.members, ensemble["members"]) if m["fold"] == fold]
        for case in validation_cases(run, fold):
            truth, spacing = read_mask(case["label"])
            probs = predictor.probabilities(case["image"], members)
            cases.append({"case_id": case_name(case["image"]), "prob": probs[1].astype(np.float16),
                          "truth": truth, "spacing_mm": spacing})
    return cases


def build_ensemble(work: WorkDir, run: dict, records: list[dict], size: int, mode: str) -> dict:
    """Pick members and post-processing (by cross-validation), store them in ensemble/ensemble.json."""
    if work.ensemble_file.exists():
        logger.info(f"ensemble: reusing {work.relative(work.ensemble_file)}")
        return json.loads(work.ensemble_file.read_text())
    ensemble = {"mode": mode, "members": select_members(records, size), "postprocessing": None}
    predictor = EnsemblePredictor(work, ensemble)
    logger.info(f"ensemble: {len(ensemble['members'])} members ({mode}); choosing post-processing on "
                "out-of-fold predictions")
    cases = out_of_fold_cases(predictor, ensemble, run) if _binary(predictor) else []
    if cases:
        choice = choose_postprocessing(cases)  # float16 probabilities: no second, float32 copy of every case
        ensemble["postprocessing"] = choice
        before, after = choice["baseline"]["dice_mean"], choice["selected"]["dice_mean"]
        logger.info(f"ensemble: post-processing steps {choice['steps'] or 'none'} "
                    f"(out-of-fold Dice {before:.4f} -> {after:.4f})")
    write_text_atomic(work.ensemble_file, json.dumps(ensemble, indent=1, default=float))
    return ensemble


def _binary(predictor: EnsemblePredictor) -> bool:
    return int(predictor.members[0].config["output_classes"]) == 2


def write_mask(mask: np.ndarray, source: Path, target: Path) -> None:
    """uint8 mask with the source's affine and header, written to a temporary name and renamed."""
    image = nib.load(str(source))
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header["scl_slope"], header["scl_inter"] = 1, 0
    with atomic_path(target) as temporary:
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), image.affine, header), str(temporary))


def predict_images(predictor: EnsemblePredictor, images: list[Path], output_dir: Path) -> list[dict]:
    """Predict each image into output_dir under its own file name; finished files are kept, not redone."""
    clashes = sorted(name for name, count in Counter(image.name for image in images).items() if count > 1)
    if clashes:
        raise ValueError(f"file names occur more than once among the images to predict ({', '.join(clashes[:5])}):"
                         " each prediction is saved under its image's file name, so rename them")
    if any(image.resolve().parent == output_dir.resolve() for image in images):
        raise ValueError(f"the output folder {output_dir} holds the input images; choose another output folder")
    results = []
    for index, image in enumerate(images, 1):
        target = output_dir / image.name
        if target.exists():
            logger.info(f"predict {index}/{len(images)} {image.name}: done before, kept")
            continue
        started = time.time()
        spacing = tuple(float(z) for z in nib.load(str(image)).header.get_zooms()[:3])
        mask = predictor.mask(predictor.probabilities(image), spacing)
        write_mask(mask, image, target)
        volume_ml = float((mask > 0).sum()) * float(np.prod(spacing)) / 1000.0
        seconds = time.time() - started
        results.append({"case": case_name(image), "volume_ml": volume_ml, "seconds": seconds, "output": str(target)})
        print(f"predict {index}/{len(images)} {image.name}: hemorrhage {volume_ml:.2f} mL, {seconds:.1f}s",
              flush=True)
    return results
