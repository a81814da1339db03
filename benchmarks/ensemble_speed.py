"""The ensemble section of benchmark.py: seconds per 512 x 512 x 32 scan, old path vs new, and peak memory."""

from __future__ import annotations

import resource
import shutil
import threading
import time
from pathlib import Path

import torch

from bench_common import (SCAN_SLICES, SLICE_PX, TEMPLATE, default_ensemble, kept_slices, paper_inputs, screened_work,
                          template_config)
from autoseg2d.synthetic.head_ct import make_head_ct, write_case  # noqa: E402  (after bench_common's sys.path)
from autoseg2d.datalist import case_name  # noqa: E402
from autoseg2d.run.fold_probabilities import mean_foreground, store_foreground  # noqa: E402
from autoseg2d.templates import bundle_files  # noqa: E402
from bundle_contract import BundleFiles  # noqa: E402
from network import NetworkSettings, build_network, trained_network  # noqa: E402
from predictor import autocast_dtype, inference_device  # noqa: E402
from runtime import OpenVINONetwork, openvino_installed  # noqa: E402
from volumes import Volume, load_volume  # noqa: E402


class PeakRss:
    """Highest resident memory of this process while the block runs (sampled every 20 ms), in GiB."""

    def __enter__(self):
        self.peak, self.running = rss_gib(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_gib())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


# The precisions the ensemble rows run in, as the predictor's dtype (None: fp32).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def ensemble_precisions(device: torch.device, also_fp32: bool) -> list[str]:
    """The precision the template's config picks on `device` (predictor.autocast_dtype), then fp32 too where
    asked and different."""
    config = template_config()
    chosen = autocast_dtype(device, config["amp"])
    default = next(name for name, dtype in PRECISION_DTYPES.items() if dtype == chosen)
    return [default] + (["fp32"] if also_fp32 and default != "fp32" else [])


def rss_gib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**30


def random_weight_bundles(work: Path, count: int) -> list[Path]:
    """`count` copies of the template with paper-model checkpoints of random weights (variant both)."""
    config, _, plan = paper_inputs()
    channels = len(plan)
    inputs = {key: config[key] for key in ("modality", "input_variant", "num_adjacent_slices", "ct_windows_hu",
                                           "output_classes", "network")}
    bundles = []
    for index in range(count):
        bundle = work / f"member_{index}" / "segresnet2d_0"
        shutil.copytree(TEMPLATE, bundle)
        files = bundle_files(bundle)
        files.ckpt_path.mkdir()
        torch.manual_seed(index)
        model = build_network(NetworkSettings.from_config(config), channels)
        torch.save({"state_dict": model.state_dict(), "inputs": inputs}, files.model)
        bundles.append(bundle)
    return bundles


ENSEMBLE_PATHS = ("old", "new_torch_whole_batch", "new_torch", "new_openvino")


def ensemble_paths(bundles: list[Path], precision: str, wanted=ENSEMBLE_PATHS) -> dict:
    """The ensemble before the shared passes (each member reads and windows the scan, PyTorch on whole batches,
    every slice) and after them (members share inputs, air-only slices skipped: the template's default), in
    PyTorch (whole batches as before, and calls of at most one 512 x 512 slice now) and, where installed,
    OpenVINO. Only the `wanted` paths are loaded (an 18-member path alone fits in memory where all of them
    would not)."""
    from autoseg2d.pipeline.predict import EnsemblePredictor
    from autoseg2d.run.inference import load_inferer

    def members(runtime: str, skip_air_slices: bool = True, whole_torch_batches: bool = False) -> list:
        loaded = [load_inferer(bundle, infer_cpu_runtime="torch", infer_skip_air_slices=skip_air_slices)
                  for bundle in bundles]  # the engine is attached below
        for member in loaded:
            member.predictor.dtype = PRECISION_DTYPES[precision]
            if whole_torch_batches:  # as before PyTorch got a batch in calls of bounded size
                member.predictor.pixels_per_call = None
            member.predictor.network = OpenVINONetwork(member.predictor.model, len(member.predictor.plan),
                                                       bundle_cache(member), precision != "fp32") \
                if runtime == "openvino" else None
        return loaded

    def ensemble(loaded: list):
        predictor = EnsemblePredictor.__new__(EnsemblePredictor)
        predictor.members, predictor.mode, predictor.postprocessing, predictor.screen = loaded, "mean", None, None
        return predictor.probabilities

    builders = {"new_torch_whole_batch": lambda: members("torch", whole_torch_batches=True),
                "new_torch": lambda: members("torch")}
    if openvino_installed() and inference_device().type == "cpu":  # OpenVINO runs CPU members only
        builders["new_openvino"] = lambda: members("openvino")
    paths, loaded_by_path, setup = {}, {}, {}
    if "old" in wanted:
        old = members("torch", skip_air_slices=False, whole_torch_batches=True)
        paths["old"] = lambda image: sum(m.infer(str(image)).numpy() for m in old) / len(old)
    for name, build in builders.items():
        if name in wanted:
            started = time.perf_counter()
            loaded_by_path[name] = build()
            paths[name] = ensemble(loaded_by_path[name])
            setup[f"{name}_load_s_per_member"] = round((time.perf_counter() - started) / len(bundles), 1)
    return {"paths": paths, "setup": setup, "members": loaded_by_path}


def slices_skipped(predictor, volume: Volume) -> dict:
    """The slices a path leaves out (air only: infer_skip_air_slices)."""
    run = sum(len(slices) for slices in predictor.batch_slices(volume))
    return {"slices_skipped": volume.num_slices - run}


def bundle_cache(member) -> Path:
    return BundleFiles(Path(member.config["ckpt_path"])).openvino_model


def convert_for_openvino(bundles: list[Path]) -> float:
    """Convert each member once (cached beside its checkpoint, as InferClass does); seconds per member."""
    from autoseg2d.run.inference import load_inferer

    started = time.perf_counter()
    for bundle in bundles:
        member = load_inferer(bundle, infer_cpu_runtime="torch")  # converted once, here
        OpenVINONetwork(member.predictor.model, len(member.predictor.plan), bundle_cache(member), True)
    return (time.perf_counter() - started) / len(bundles)


def bench_ensemble(args, device: torch.device, work: Path) -> list[dict]:
    """Seconds per 512 x 512 x S scan for M members of random weights, the paths alternating, scaled to the
    default ensemble (18 members, 32 slices) by members x slices."""
    members_on = inference_device().type  # where InferClass puts every member
    if device.type != members_on:
        raise SystemExit(f"--device {device.type}: the ensemble's members run on {members_on} here (InferClass "
                         f"takes the GPU where there is one); for the CPU on a GPU machine run with "
                         f"CUDA_VISIBLE_DEVICES= set empty")
    case = make_head_ct(SLICE_PX, args.ensemble_slices, head_mm=tuple(args.head_mm), seed=0)
    image, warmup = work / "ensemble_case.nii.gz", work / "ensemble_warmup.nii.gz"
    write_case(case, image, None)
    write_case(make_head_ct(SLICE_PX, 2, head_mm=tuple(args.head_mm), seed=1), warmup, None)
    bundles = random_weight_bundles(work, args.ensemble_members)
    conversion_s = convert_for_openvino(bundles) if openvino_installed() and members_on == "cpu" else None
    precisions = ensemble_precisions(device, also_fp32=args.ensemble_fp32)
    scale = (default_ensemble()[0] / args.ensemble_members) * (SCAN_SLICES / args.ensemble_slices)
    rows = [member_load_row(bundles, device, scale_members=default_ensemble()[0])]
    print("ensemble", rows[0], flush=True)
    for precision in precisions:
        built = ensemble_paths(bundles, precision, args.ensemble_paths)
        if not built["paths"]:
            raise SystemExit(f"none of the ensemble paths {args.ensemble_paths} can run here (OpenVINO not "
                             "installed?)")
        volume = load_volume(image, None, "ct")
        skipped = {name: slices_skipped(loaded[0].predictor, volume) for name, loaded in built["members"].items()}
        for path in built["paths"].values():
            path(warmup)  # oneDNN and OpenVINO pick their kernels on the first calls
        for repeat in range(args.ensemble_repeats):
            for name, path in built["paths"].items():
                before = rss_gib()
                if members_on == "cuda":
                    gpu_before = torch.cuda.memory_allocated()  # the members' weights, loaded for every path
                    torch.cuda.reset_peak_memory_stats()
                with PeakRss() as memory:
                    started = time.perf_counter()
                    probabilities = path(image)
                    seconds = time.perf_counter() - started
                held = rss_gib() - before  # what the members keep after the pass (OpenVINO's request memory)
                row = {"path": name, "precision": precision, "repeat": repeat, "members": args.ensemble_members,
                       "slices": args.ensemble_slices, "measured_s": round(seconds, 2),
                       "s_per_512x512x32_scan_18_members": round(seconds * scale, 1),
                       "peak_rss_gib": round(memory.peak, 2), "peak_above_start_gib": round(memory.peak - before, 2),
                       "held_after_gib_per_member": round(held / args.ensemble_members, 2)}
                if members_on == "cuda":
                    row["peak_gpu_above_start_gib"] = round((torch.cuda.max_memory_allocated() - gpu_before) / 2**30,
                                                            2)
                if name != "old":
                    row.update(skipped[name])
                if name == "new_openvino":
                    row["conversion_s_per_member_once"] = round(conversion_s, 1)
                rows.append(row)
                print("ensemble", row, flush=True)
        row = stored_maps_row(bundles, image, probabilities, precision, scale)
        rows.append(row)
        print("ensemble", row, flush=True)
        for name, loaded in built["members"].items():
            for row in screened_rows(name, loaded, volume, args.ensemble_screen_share, precision, scale):
                rows.append(row)
                print("ensemble", row, flush=True)
        built = loaded = None  # the next precision's members load without these beside them
    return rows


def screened_rows(name: str, loaded: list, volume: Volume, shares: list[float], precision: str,
                  scale: float) -> list[dict]:
    """What screening costs the members that run only on kept slices: the members over a middle block of
    each `share` of the head slices (a bleed spans neighbouring slices) against all of them, alternating, and
    the default ensemble's screened scan from both (bench_common.screened_work: its screening members on every
    slice, the others on the share). The kept slices run packed into full batches where a batch does not change
    their input (whole slices), and as before, in the batches of a pass over every slice (emulated: one
    predict_together per batch, each allocating its own output volume, so slightly slower than the old code).
    Random weights cannot say which slices a trained screen keeps (benchmarks/screening.py measures the share
    on trained members)."""
    from predictor import predict_together

    predictors = [m.predictor for m in loaded]
    head = sorted(z for slices in predictors[0].batch_slices(volume) for z in slices)
    kept_by_share = {}
    for share in shares:
        count = kept_slices(share, len(head))
        kept_by_share[share] = set(head[(len(head) - count) // 2:][:count])

    def in_whole_pass_batches(kept):  # how screening batched kept slices before: a whole pass's batches
        for slices in predictors[0].batch_slices(volume):
            if kept.intersection(slices):
                predict_together(predictors, volume, only=kept.intersection(slices))

    runs = [("all", lambda: predict_together(predictors, volume))]
    for share, kept in kept_by_share.items():
        runs += [(share, lambda kept=kept: predict_together(predictors, volume, only=kept)),
                 ((share, "before"), lambda kept=kept: in_whole_pass_batches(kept))]
    timings = {key: [] for key, _ in runs}
    for _ in range(2):
        for key, run in runs:
            started = time.perf_counter()
            run()
            timings[key].append(time.perf_counter() - started)
    every = min(timings["all"])  # the second pass: shapes seen
    rows = []
    for share, kept in kept_by_share.items():
        some, before = min(timings[share]), min(timings[share, "before"])
        rows.append({"path": f"{name}_later_members_on_kept_slices", "precision": precision,
                     "members": len(loaded), "head_slices": len(head), "kept_slices": len(kept),
                     "measured_all_s": round(every, 1),
                     "measured_kept_s": round(some, 1), "measured_kept_in_whole_pass_batches_s": round(before, 1),
                     "kept_vs_proportional": round(some / (every * len(kept) / len(head)), 2),
                     # the later members' cost on the kept slices, as a share of a whole pass's
                     "s_per_512x512x32_scan_18_members_screened": round(every * scale * screened_work(some / every), 1),
                     "s_per_512x512x32_scan_18_members_screened_whole_pass_batches": round(
                         every * scale * screened_work(before / every), 1),
                     "s_per_512x512x32_scan_18_members_unscreened": round(every * scale, 1)})
    return rows


def member_load_row(bundles: list[Path], device: torch.device, scale_members: float) -> dict:
    """What building a member's network from its checkpoint costs on `device`, before (built with random initial
    weights, moved there, then loaded) and now (network.trained_network: built on the meta device, the
    checkpoint's tensors assigned), interleaved per bundle, three rounds, the fastest of each; the checkpoint
    read onto the device is timed apart (both do it). A one-scan predict pays this once per member."""
    config, _, plan = paper_inputs()
    settings, channels = NetworkSettings.from_config(config), len(plan)

    def timed(work) -> tuple[float, object]:
        started = time.perf_counter()
        result = work()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, result

    timings = {"read": [], "before": [], "now": []}
    for _ in range(3):
        for bundle in bundles:
            seconds, checkpoint = timed(lambda: torch.load(bundle_files(bundle).model, map_location=device,
                                                           weights_only=False))
            timings["read"].append(seconds)
            state = checkpoint["state_dict"]
            timings["before"].append(timed(lambda: build_network(settings, channels).to(device).load_state_dict(
                state))[0])
            timings["now"].append(timed(lambda: trained_network(settings, channels, state, device=device))[0])
    fastest = {key: min(values) for key, values in timings.items()}
    return {"path": "member_network_from_checkpoint", "device": device.type, "members": len(bundles),
            "checkpoint_read_s_per_member": round(fastest["read"], 3),
            "before_build_then_load_s_per_member": round(fastest["before"], 3),
            "now_built_on_meta_s_per_member": round(fastest["now"], 3),
            "before_s_18_members": round(fastest["before"] * scale_members, 1),
            "now_s_18_members": round(fastest["now"] * scale_members, 1)}


def stored_maps_row(bundles: list[Path], image: Path, probabilities, precision: str, scale: float) -> dict:
    """What an out-of-fold case costs the ensemble stage now: its members' maps, stored by cross-validation,
    read and averaged (before, the members ran on the scan: the rows above). Read right after writing, so
    from the page cache; scaled like the rows above."""
    case_id = case_name(image)
    for bundle in bundles:
        store_foreground(bundle, case_id, probabilities)
    started = time.perf_counter()
    mean_foreground(bundles, case_id)
    seconds = time.perf_counter() - started
    return {"path": "out_of_fold_case_from_stored_maps", "precision": precision, "members": len(bundles),
            "slices": probabilities.shape[-1], "measured_s": round(seconds, 2),
            "s_per_512x512x32_scan_18_members": round(seconds * scale, 2)}
