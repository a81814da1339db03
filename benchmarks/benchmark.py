"""Speed and memory of the segresnet2d template; prints a JSON and a Markdown summary.

    python benchmarks/benchmark.py                       # everything, sized for a 2-core CPU
    python benchmarks/benchmark.py --sections infer,loader --volume-slices 32
    python benchmarks/benchmark.py --device cuda --train-batch 32 --out results.json

Sections: train (samples/s of one optimizer step at 384^2, CPU and paper profiles), loader
(ms per training sample in one process, and steady-state samples/s of the DataLoader with
persistent workers, measured after a warm-up epoch),
infer (s per 512^2 slice and per volume, fp32 vs reduced precision, with and without flip
TTA), dice (Dice of reduced-precision vs fp32 predictions of a briefly trained model),
analyzer (DataAnalyzer + BundleGen time for generated 512 x 512 x 30 cases), ensemble (s per
512 x 512 x 32 scan of the 18-member ensemble before and after members shared their inputs, in
PyTorch and OpenVINO where installed; measured on fewer members
of random weights and scaled; plus, per runtime, the members on --ensemble-screen-share of the
head slices against all of them, and the screened 18-member scan from those; --ensemble-paths picks
paths, so --ensemble-members 18 can measure one path directly), floor (the paper network's FLOPs and
each of its convolutions timed alone: how fast any runtime could run the 18-member scan here). Timings are
wall-clock medians after warm-up; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

# bench_common first: it puts the template on sys.path
from bench_common import REPO, SLICE_PX, TEMPLATE, paper_inputs, template_config  # noqa: F401
from bench_common import print_machine, write_result
from compute_floor import bench_floor  # noqa: E402
from ensemble_speed import ENSEMBLE_PATHS, bench_ensemble  # noqa: E402
from autoseg2d.datalist import read_datalist  # noqa: E402
from autoseg2d.synthetic.head_ct import write_dataset  # noqa: E402
from cache import cached_volume  # noqa: E402
from network import NetworkSettings, build_loss, build_network, shape_divisor  # noqa: E402
from predictor import SlicePredictor, cpu_bf16_units, cpu_has_native_bf16, onednn_cap  # noqa: E402
from runtime import openvino_installed  # noqa: E402
from slice_dataset import Augmentation, SliceDataset, SliceSampler, foreground_pixels  # noqa: E402

ROI_PX = 384
# The CPU profile is the small network the tests train; the paper profile is the default config.
PROFILES = {
    "cpu": {"init_filters": 8, "blocks_down": [1, 1, 1, 1], "dsdepth": 3},
    "paper": {"init_filters": 32, "blocks_down": [2, 4, 4, 4, 4], "dsdepth": 4},
}


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() after warm-up calls (CUDA work is synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_train(args, device: torch.device) -> list[dict]:
    rows = []
    for name, network in PROFILES.items():
        config = template_config(network=network, input_variant="both")
        for channels_last in (False, True):
            model = build_network(NetworkSettings.from_config(config), 9).to(device)
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=memory_format)
            loss_fn = build_loss(config["network"]["dsdepth"])
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            amp = device.type == "cuda"
            scaler = torch.amp.GradScaler("cuda", enabled=amp)
            batch = args.train_batch
            x = torch.rand(batch, 9, ROI_PX, ROI_PX, device=device).to(memory_format=memory_format)
            y = (torch.rand(batch, 1, ROI_PX, ROI_PX, device=device) > 0.95).float()

            def step():
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(step, args.train_steps, warmup=2)
            row = {"profile": name, "batch": batch, "roi_px": ROI_PX, "channels_last": channels_last, "amp": amp,
                   "step_s": round(seconds, 4), "samples_per_s": round(batch / seconds, 2)}
            if device.type == "cuda":
                row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
            print("train", row, flush=True)
    return rows


def generated_volumes(root: Path, num_cases: int, num_slices: int, size: int = SLICE_PX, mmap: bool = False):
    datalist = write_dataset(root, num_train=num_cases, num_test=0, num_folds=1, size=size, num_slices=num_slices)
    entries = read_datalist(datalist)["training"]
    cache_dir = root / "cache" if mmap else None
    return [cached_volume(root / e["image"], root / e["label"], "ct", cache_dir) for e in entries]


def bench_loader(args, device: torch.device, work: Path) -> dict:
    """The trainer's loader: SliceSampler + SliceDataset, 9 channels, 384^2 crops of 512^2 slices, batch 32."""
    config, windows, plan = paper_inputs(roi_size=[ROI_PX, ROI_PX])
    result = {"roi_px": ROI_PX, "slice_px": SLICE_PX, "channels": len(plan)}
    for mmap in (False, True):
        volumes = generated_volumes(work / f"loader_{mmap}", 4, 32, mmap=mmap)
        foreground = [foreground_pixels(v) for v in volumes]
        sampler = SliceSampler(foreground, [v.num_slices for v in volumes], 10.0, seed=0)  # every slice
        dataset = SliceDataset(volumes, foreground, plan, windows, config["roi_size"], config["foreground_crop_ratio"],
                               Augmentation.from_config(config))
        items = list(sampler)
        key = "mmap" if mmap else "memory"
        sample_s = timed(lambda: [dataset[item] for item in items[:32]], 3) / 32
        result[f"{key}_sample_ms_main_process"] = round(sample_s * 1000, 2)
        for workers in args.loader_workers:
            loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=workers,
                                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)
            rates = []
            for epoch in range(1 + args.loader_epochs):  # epoch 0 starts the workers and is not counted
                sampler.set_epoch(epoch)
                start = time.perf_counter()
                count = sum(len(batch["image"]) for batch in loader)
                rates.append(count / (time.perf_counter() - start))
            result[f"{key}_samples_per_s_{workers}_workers"] = round(statistics.median(rates[1:]), 1)
            del loader
    result["samples_per_epoch"] = len(items)
    print("loader", result, flush=True)
    return result


def paper_predictor(device: torch.device, batch_size: int, **options) -> SlicePredictor:
    config, windows, plan = paper_inputs()
    torch.manual_seed(0)
    model = build_network(NetworkSettings.from_config(config), len(plan)).to(device)
    return SlicePredictor(model, plan, windows, shape_divisor(config["network"]["blocks_down"]), batch_size, device,
                          **options)


def inference_modes(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"fp32": {"amp": False}, "amp_fp16": {"amp": True}}
    modes = {"fp32": {"amp": False}}  # amp is float16 on CUDA, bf16 on a CPU with native bf16
    modes["bf16" if cpu_has_native_bf16() else "bf16_emulated"] = {"amp": True}
    return modes


def bench_infer(args, device: torch.device, work: Path) -> list[dict]:
    volume = generated_volumes(work / "infer", 1, args.volume_slices)[0]
    rows = []
    for mode, options in inference_modes(device).items():
        for tta in (False, True):
            predictor = paper_predictor(device, args.infer_batch, tta=tta, **options)
            if mode == "bf16_emulated":
                predictor.dtype = torch.bfloat16  # what the detector refuses here, measured to show why
            seconds = timed(lambda: predictor.predict_slices_last(volume), args.infer_repeats)
            row = {"mode": mode, "precision": predictor.precision, "tta": tta, "slices": args.volume_slices,
                   "batch": args.infer_batch, "s_per_volume": round(seconds, 3),
                   "s_per_slice": round(seconds / args.volume_slices, 4),
                   "s_per_512x512x32_volume": round(32 * seconds / args.volume_slices, 2)}
            rows.append(row)
            print("infer", row, flush=True)
    return rows


def bench_dice(args, device: torch.device, work: Path) -> dict:
    """Train briefly with the template's Trainer, then compare reduced-precision and fp32 Dice."""
    from bundle_config import load_config
    from trainer import Trainer, volume_dice

    datalist = write_dataset(work / "dice_data", num_train=8, num_test=0, num_folds=4, size=args.dice_size,
                             num_slices=args.dice_slices)
    bundle = work / "dice_bundle"
    shutil.copytree(TEMPLATE, bundle)
    network = PROFILES[args.dice_profile]
    roi = min(ROI_PX, args.dice_size)
    overrides = {"data_list_file_path": str(datalist), "data_file_base_dir": str(datalist.parent),
                 "roi_size": [roi, roi], "num_epochs": args.dice_epochs, "num_epochs_per_validation": args.dice_epochs,
                 "batch_size": args.train_batch, "num_workers": args.dice_workers,
                 "deterministic": False, **{f"network#{k}": v for k, v in network.items()}}
    if args.dice_profile == "cpu":
        overrides["learning_rate"] = 0.003  # the tests' small network; 0.003 makes the paper network diverge
    trainer = Trainer(load_config(str(bundle / "configs" / "hyper_parameters.yaml"), **overrides))
    started = time.perf_counter()
    trainer.fit()
    result = {"profile": args.dice_profile, "slice_px": args.dice_size, "epochs": args.dice_epochs,
              "train_s": round(time.perf_counter() - started, 1)}
    for mode, options in inference_modes(device).items():
        predictor = SlicePredictor(trainer.model, trainer.plan, trainer.windows,
                                   shape_divisor(trainer.config["network"]["blocks_down"]), args.infer_batch, device,
                                   tta=False, **options)
        if mode == "bf16_emulated":
            predictor.dtype = torch.bfloat16
        result[f"dice_{mode}"] = [round(volume_dice(predictor.predict_slices_last(v), v.label), 5)
                                  for v in trainer.val_volumes]
    reduced = [k for k in result if k.startswith("dice_") and k != "dice_fp32"][0]
    result["max_abs_dice_difference"] = float(np.max(np.abs(np.subtract(result[reduced], result["dice_fp32"]))))
    print("dice", result, flush=True)
    return result


def bench_analyzer(args, work: Path) -> dict:
    from monai.apps.auto3dseg import BundleGen, DataAnalyzer

    started = time.perf_counter()
    datalist = write_dataset(work / "analyzer_data", num_train=args.analyzer_cases, num_test=0, num_folds=5,
                             size=SLICE_PX, num_slices=30)
    generated = time.perf_counter() - started
    stats = work / "datastats.yaml"
    started = time.perf_counter()
    DataAnalyzer(str(datalist), str(datalist.parent), output_path=str(stats), device="cpu",
                 worker=0).get_all_case_stats()
    analyzer_s = time.perf_counter() - started
    data_src = work / "data_src.yaml"
    data_src.write_text(yaml.safe_dump({"modality": "CT", "datalist": str(datalist), "dataroot": str(datalist.parent)}))
    started = time.perf_counter()
    gen = BundleGen(algo_path=str(work / "bundles"), algos=["segresnet2d"], templates_path_or_url=str(TEMPLATE.parent),
                    data_stats_filename=str(stats), data_src_cfg_name=str(data_src))
    gen.generate(str(work / "bundles"), num_fold=5)
    result = {"cases": args.analyzer_cases, "shape": [SLICE_PX, SLICE_PX, 30], "generate_s": round(generated, 1),
              "data_analyzer_s": round(analyzer_s, 1), "bundle_gen_s": round(time.perf_counter() - started, 1)}
    print("analyzer", result, flush=True)
    return result


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or "?",
            "cpu_threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),
            **{f"cpu_{unit}": found for unit, found in cpu_bf16_units().items()},
            "onednn_max_cpu_isa": onednn_cap() or "none",
            "openvino": openvino_installed()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"### {machine.get('gpu', machine['cpu'])} ({results['device']})", "",
             "detected: " + ", ".join(f"{key} {value}" for key, value in machine.items() if key not in ("gpu", "cpu")),
             ""]
    for section, value in results.items():
        if section in ("machine", "device"):
            continue
        rows = value if isinstance(value, list) else [value]
        keys = list(dict.fromkeys(k for row in rows for k in row))
        lines += [f"**{section}**", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows] + [""]
    return "\n".join(lines)


def argument_parser() -> argparse.ArgumentParser:
    """The command line (also what tests check gpu_run.sh's commands against)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="train,loader,infer,dice,analyzer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--loader-epochs", type=int, default=2, help="timed epochs after the warm-up one")
    parser.add_argument("--loader-workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2])
    parser.add_argument("--volume-slices", type=int, default=8)
    parser.add_argument("--infer-batch", type=int, default=4)
    parser.add_argument("--infer-repeats", type=int, default=1)
    parser.add_argument("--dice-profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--dice-size", type=int, default=128)
    parser.add_argument("--dice-slices", type=int, default=12)
    parser.add_argument("--dice-epochs", type=int, default=20)
    parser.add_argument("--dice-workers", type=int, default=0)
    parser.add_argument("--analyzer-cases", type=int, default=20)
    parser.add_argument("--ensemble-members", type=int, default=2, help="members measured (18 is extrapolated)")
    parser.add_argument("--ensemble-slices", type=int, default=32, help="slices of the measured scan")
    parser.add_argument("--ensemble-repeats", type=int, default=1)
    parser.add_argument("--ensemble-paths", type=lambda text: text.split(","), default=list(ENSEMBLE_PATHS),
                        help=f"comma-separated ensemble paths to measure, of {','.join(ENSEMBLE_PATHS)} "
                             "(those this machine can run)")
    parser.add_argument("--ensemble-fp32", action="store_true",
                        help="also fp32 where the template picks bf16 (a CPU with native bf16) or fp16 (a GPU)")
    parser.add_argument("--ensemble-screen-share", type=float, nargs="+", default=[0.4],
                        help="shares of head slices the later members run on in the screened rows (one row each)")
    parser.add_argument("--floor-repeats", type=int, default=3, help="timed calls per convolution (median)")
    parser.add_argument("--head-mm", type=float, nargs=2, default=[160.0, 190.0],
                        help="width and length of the generated head (mm) at its widest slice")
    parser.add_argument("--out", help="also write the JSON here (with the command, commit, machine and versions)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser()
    args = parser.parse_args(argv)
    print_machine()
    device = torch.device(args.device)
    sections = [s for s in args.sections.split(",") if s]
    results: dict = {"machine": machine(), "device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runners = {"train": lambda: bench_train(args, device), "loader": lambda: bench_loader(args, device, work),
                   "infer": lambda: bench_infer(args, device, work), "dice": lambda: bench_dice(args, device, work),
                   "analyzer": lambda: bench_analyzer(args, work),
                   "ensemble": lambda: bench_ensemble(args, device, work), "floor": lambda: bench_floor(args, device)}
        unknown_paths = [p for p in args.ensemble_paths if p not in ENSEMBLE_PATHS]
        if unknown_paths:
            parser.error(f"unknown ensemble paths {unknown_paths}; choose from {', '.join(ENSEMBLE_PATHS)}")
        unknown = [s for s in sections if s not in runners]
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {', '.join(runners)}")
        for section in sections:
            results[section] = runners[section]()
    max_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["peak_memory"] = {"process_max_rss_gib": round(max_rss_gib, 2)}
    if device.type == "cuda":
        results["peak_memory"]["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    text = markdown(results)
    print(json.dumps(results, indent=1))
    print(text)
    if args.out:
        write_result(args.out, results)
    return results


if __name__ == "__main__":
    main()
