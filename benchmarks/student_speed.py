"""Seconds per 512 x 512 x 32 scan: the distilled student (one network) against the 18-member ensemble.

    python benchmarks/student_speed.py --out benchmarks/results/student_speed_cpu.json

Both are the paper's network (input variant both, random weights: the time does not depend on them) run as
predict runs them (members sharing their inputs, air-only slices skipped). Each row runs in its own process:
the CPU as it is (the precision the template picks here: bf16 where native, else fp32) and capped at AVX2 with
ONEDNN_MAX_CPU_ISA (what an AVX2-only CPU gets: fp32). The student is always timed whole; the ensemble is
timed with --ensemble_members members (at least 2) and scaled to 18: members run one after another on the
same batches, so each adds the same time beyond the student's (the scan is read and windowed once);
--ensemble_members 18 times it whole.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401  (the repository and the template's scripts on sys.path)
from bench_common import SCAN_SLICES, SLICE_PX, default_ensemble, print_machine, write_result

ISA_CAPS = ("none", "AVX2")  # none: the CPU as it is
HEAD_MM = (160.0, 190.0)  # an adult head's width and length, as benchmark.py's ensemble rows (--head-mm)
MEASURED = "measured_s"


def time_one(members: int, runtime: str, repeats: int) -> dict:
    """In this process: seconds for `members` paper-network members on one 512 x 512 x 32 head CT, best of
    `repeats` after a warm-up scan (oneDNN and OpenVINO pick their kernels on the first calls)."""
    import torch
    from ensemble_speed import ensemble_paths, ensemble_precisions, random_weight_bundles

    from autoseg2d.synthetic.head_ct import make_head_ct, write_case

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        image, warmup = work / "scan.nii.gz", work / "warmup.nii.gz"
        write_case(make_head_ct(SLICE_PX, SCAN_SLICES, seed=0, head_mm=HEAD_MM), image, None)
        write_case(make_head_ct(SLICE_PX, 2, seed=1, head_mm=HEAD_MM), warmup, None)
        precision = ensemble_precisions(torch.device("cpu"), also_fp32=False)[0]
        path_name = {"torch": "new_torch", "openvino": "new_openvino"}[runtime]
        built = ensemble_paths(random_weight_bundles(work, members), precision, [path_name])
        if path_name not in built["paths"]:
            return {"skipped": f"{runtime} cannot run here (not installed?)"}
        predict = built["paths"][path_name]
        predict(warmup)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            predict(image)
            seconds.append(time.perf_counter() - started)
    return {"precision": precision, "members": members, MEASURED: round(min(seconds), 2)}


def run_row(cap: str, members: int, runtime: str, repeats: int) -> dict:
    """time_one in a new process with oneDNN capped at `cap` (the cap is read when oneDNN starts)."""
    env = {key: value for key, value in os.environ.items() if key != "ONEDNN_MAX_CPU_ISA"}
    if cap != "none":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    result = subprocess.run([sys.executable, __file__, "--one", json.dumps([members, runtime, repeats])], env=env,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the row ({cap}, {members} members, {runtime}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ensemble_members", type=int, default=3, help="members timed, scaled to the default 18")
    parser.add_argument("--runtimes", default="torch,openvino", help="torch and/or openvino (where installed)")
    parser.add_argument("--caps", default=",".join(ISA_CAPS), help="oneDNN caps to run under: none,AVX2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a row's own process
    args = parser.parse_args()
    if not args.one and args.ensemble_members < 2:
        parser.error("--ensemble_members: at least 2 (the time one more member adds is what is scaled)")
    if args.one:
        print(json.dumps(time_one(*json.loads(args.one))), flush=True)
        return
    print_machine()
    size = default_ensemble()[0]
    rows = []
    for cap in args.caps.split(","):
        for runtime in args.runtimes.split(","):
            if cap != "none" and runtime == "openvino":
                continue  # OpenVINO brings its own kernels: ONEDNN_MAX_CPU_ISA does not imitate a smaller CPU there
            student = run_row(cap, 1, runtime, args.repeats)
            ensemble = run_row(cap, args.ensemble_members, runtime, args.repeats)
            if "skipped" in student:
                print(f"{cap} {runtime}: {student['skipped']}", flush=True)
                continue
            # each member adds (timed - student) / (members - 1); reading and windowing the scan are paid once
            per_member = (ensemble[MEASURED] - student[MEASURED]) / (args.ensemble_members - 1)
            row = {"onednn_cap": cap, "runtime": runtime, "precision": student["precision"],
                   "student_s": student[MEASURED], "ensemble_members_timed": args.ensemble_members,
                   "ensemble_timed_s": ensemble[MEASURED],
                   f"ensemble_{size}_members_s": round(student[MEASURED] + per_member * (size - 1), 1)}
            row["speed_up"] = round(row[f"ensemble_{size}_members_s"] / row["student_s"], 1)
            rows.append(row)
            print("row", row, flush=True)
    lines = [f"| oneDNN cap | runtime | precision | student s | ensemble of {size} s | speed-up |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['onednn_cap']} | {r['runtime']} | {r['precision']} | {r['student_s']:.1f} | "
              f"{r[f'ensemble_{size}_members_s']:.1f} | {r['speed_up']:.1f}x |" for r in rows]
    print("\n".join(lines), flush=True)
    if args.out:
        write_result(args.out, {"scan": f"{SLICE_PX} x {SLICE_PX} x {SCAN_SLICES}", "rows": rows})


if __name__ == "__main__":
    main()
