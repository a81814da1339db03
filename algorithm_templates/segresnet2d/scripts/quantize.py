"""INT8 inference on CPUs: the OpenVINO model quantized by NNCF, kept only where it agrees with the float one.

Calibration and the agreement check use this bundle's own training scans, cut as inference cuts them
(whole slices, or the head's box with infer_crop_to_head), so the activation ranges are those the
network meets; a kept INT8 model is reused only for the same cut. Each scan's slices
alternate between the two sets (calibration, check), which therefore come from the same scans but
never share a slice. The INT8 model is used only where its foreground masks on the check slices
agree with the float model's (Dice >= min_agreement); otherwise the float model runs and the
report says why. Model and report are kept beside the checkpoint, like the float conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle_contract import BundleFiles, save_openvino_model, write_text_atomic
from datalist_split import read_datalist, split_by_fold


class QuantizationError(RuntimeError):
    """INT8 was asked for and cannot be made; the message says what is missing and the fix."""


@dataclass(frozen=True)
class Int8Settings:
    calibration_slices: int  # slices whose activations set the INT8 ranges
    calibration_scans: int  # training scans those slices (and as many check slices) are taken from
    min_agreement: float  # foreground Dice between INT8 and float masks needed to use INT8
    slices_cut: str  # how inference cuts the slices those come from (the predictor's HeadCrop): whole or boxes

    def __post_init__(self):
        if self.calibration_slices < 1:
            raise ValueError(f"infer_int8_calibration_slices is {self.calibration_slices} in the bundle's "
                             "configs/hyper_parameters.yaml; INT8 needs at least 1 training slice to calibrate on")
        if self.calibration_scans < 1:
            raise ValueError(f"infer_int8_calibration_scans is {self.calibration_scans} in the bundle's "
                             "configs/hyper_parameters.yaml; INT8 needs at least 1 training scan to calibrate on")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"infer_int8_min_agreement is {self.min_agreement} in the bundle's "
                             "configs/hyper_parameters.yaml; it is a Dice between 0 and 1 "
                             "(0 uses INT8 whatever it agrees, 1 only where its masks equal the float ones)")

    @classmethod
    def from_config(cls, config: dict, slices_cut: str) -> Int8Settings:
        return cls(int(config["infer_int8_calibration_slices"]), int(config["infer_int8_calibration_scans"]),
                   float(config["infer_int8_min_agreement"]), slices_cut)

    def calibration(self) -> dict:
        """What the INT8 model depends on besides the checkpoint (min_agreement only decides on it)."""
        return {"calibration_slices_requested": self.calibration_slices,
                "calibration_scans": self.calibration_scans, "slices_cut": self.slices_cut}


def nncf_installed() -> bool:
    return importlib.util.find_spec("nncf") is not None


def calibration_images(datalist_path: str, base_dir: str, fold: int, count: int) -> list[str]:
    """Up to count training images of this bundle's fold (spread over the list); [] without a datalist (an
    exported bundle: the caller says what to do), an error naming the file where it cannot be used."""
    if not datalist_path:
        return []
    try:
        training, _ = split_by_fold(read_datalist(datalist_path), base_dir, fold, datalist_path)
    except (OSError, ValueError) as err:
        raise QuantizationError(f"infer_cpu_int8 calibrates on the training scans of data_list_file_path "
                                f"{datalist_path}, which cannot be used: {err}. Fix it, or set infer_cpu_int8 "
                                "to false") from err
    picks = np.linspace(0, len(training) - 1, min(count, len(training))).round().astype(int)
    return [training[index]["image"] for index in sorted(set(picks))]


def calibration_inputs(predictor, volumes, count: int,
                       num_volumes: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration, check) single-slice inputs (1, C, rows, cols) from the volumes, count of each
    (fewer where the volumes have too few head slices).

    Slices are taken evenly over each volume's head slices, so the skull base, the middle and the
    vertex all appear; consecutive picks go to the two sets in turn. volumes may be a generator that reads
    each scan when it is reached (then num_volumes says how many it gives).
    """
    calibration, check = [], []
    num_volumes = len(volumes) if num_volumes is None else num_volumes
    per_volume = 2 * max(-(-count // max(num_volumes, 1)), 1)  # even: both sets get as many from each volume
    for volume in volumes:
        # batches come largest head first; ordered by axial index, the picks reach both ends of the head
        slices = sorted(((batch, index) for batch in predictor.batches(volume) for index in range(len(batch.slices))),
                        key=lambda pair: pair[0].slices[pair[1]])
        picks = np.linspace(0, len(slices) - 1, min(per_volume, len(slices))).round().astype(int)
        for order, pick in enumerate(picks):
            batch, index = slices[pick]
            (calibration if order % 2 == 0 else check).append(batch.x[index:index + 1].numpy())
    return calibration[:count], check[:count]


def foreground_agreement(reference, candidate, inputs: list[np.ndarray]) -> float:
    """Dice of the foreground (argmax > 0) masks of two compiled models over all inputs; 1.0 where both
    find none."""
    overlap = total = 0
    for x in inputs:
        a, b = reference(x)[0].argmax(1) > 0, candidate(x)[0].argmax(1) > 0
        overlap, total = overlap + int(np.sum(a & b)), total + int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * overlap / total


def quantize_model(float_model, calibration: list[np.ndarray]):
    """The float OpenVINO model with INT8 weights and activations (NNCF post-training quantization)."""
    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)  # its progress bars and notes would flood the console
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nncf.quantize(float_model, nncf.Dataset(calibration), subset_size=len(calibration))


@dataclass(frozen=True)
class Int8Request:
    """What quantizing one member needs: the settings, where to keep the result (None: nowhere), and the
    (calibration, check) inputs, made only when no kept conversion can be read."""

    settings: Int8Settings
    files: BundleFiles | None
    make_inputs: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]]


def checkpoint_digest(path: Path) -> str | None:
    """sha256 of the checkpoint's bytes (None without one): what a kept INT8 model was made from. Not its
    time, which a copy without -p, an unzip or a container build resets."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_report(files: BundleFiles, settings: Int8Settings) -> dict | None:
    """The kept report of an INT8 conversion of this very checkpoint with these calibration settings, or None."""
    try:
        report = json.loads(files.int8_report.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: quantize (again)
        return None
    made_from = {"checkpoint_sha256": checkpoint_digest(files.model), **settings.calibration()}
    return report if all(report.get(key) == value for key, value in made_from.items()) else None


def int8_or_float(float_model, float_compiled, compile_model, request: Int8Request):
    """(the compiled INT8 model, or None where it disagrees with float_compiled; the report).

    A kept report of the same checkpoint and calibration settings decides without quantizing again,
    unless min_agreement was lowered below a rejected model's figure (that model was not kept: made
    again). float_compiled() compiles the float model; it is called only where the float model is
    needed (the check, or a refusal), not where a kept INT8 model runs.
    """
    files, settings = request.files, request.settings
    where = files.model if files is not None else "this network"
    kept = load_report(files, settings) if files is not None else None
    if kept is not None:
        if kept["agreement"] < settings.min_agreement:
            warn_refused(where, kept["agreement"], kept["check_slices"], settings.min_agreement)
            return None, {**kept, "min_agreement": settings.min_agreement, "used": False}
        xml = files.openvino_int8_model
        if kept["used"] and xml.is_file() and xml.with_suffix(".bin").is_file():
            import openvino as ov

            model = ov.Core().read_model(str(xml))
            return compile_model(model), {**kept, "min_agreement": settings.min_agreement}
    if not nncf_installed():
        raise QuantizationError("infer_cpu_int8 is true but the nncf package is not installed: pip install nncf "
                                "(or the plugin's [cpu] extra), or set infer_cpu_int8 to false")
    calibration, check = request.make_inputs()
    if not calibration or not check:
        raise QuantizationError(f"infer_cpu_int8 is true but no training scans of {where} could be read to "
                                "calibrate INT8 on (an exported bundle has none): set data_list_file_path and "
                                "data_file_base_dir in its config to its training data, or set infer_cpu_int8 "
                                "to false")
    quantized = quantize_model(float_model, calibration)
    candidate = compile_model(quantized)
    agreement = round(foreground_agreement(float_compiled(), candidate, check), 4)  # kept reports decide on this
    report = {"agreement": agreement, "min_agreement": settings.min_agreement,
              "calibration_slices": len(calibration), "check_slices": len(check),
              "used": agreement >= settings.min_agreement,
              "checkpoint_sha256": checkpoint_digest(files.model) if files is not None else None,
              **settings.calibration()}
    if not report["used"]:
        warn_refused(where, agreement, len(check), settings.min_agreement)
    if files is not None:
        try:
            if report["used"]:
                save_openvino_model(quantized, files.openvino_int8_model)
            write_text_atomic(files.int8_report, json.dumps(report, indent=1))  # after the model: see load_report
        except OSError as err:  # a read-only model folder (an exported bundle): quantize again next time
            warnings.warn(f"could not keep the INT8 model at {files.openvino_int8_model} ({err}); "
                          "it is quantized on every start")
    return (candidate if report["used"] else None), report


def warn_refused(where, agreement: float, check_slices: int, min_agreement: float) -> None:
    warnings.warn(f"the INT8 model of {where} agrees with the float model on {agreement} of the foreground "
                  f"(Dice over {check_slices} training slices), below infer_int8_min_agreement {min_agreement}: "
                  "the float model runs (lower that key to use INT8 anyway, or set infer_cpu_int8 to false)")
