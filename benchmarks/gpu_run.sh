#!/usr/bin/env bash
# The GPU benchmarks, for a machine with an NVIDIA GPU and this project installed (pip install -e .):
#   bash benchmarks/gpu_run.sh [name]     # name prefixes the result files (default: the GPU's name, e.g.
#                                         # nvidia_h100_80gb_hbm3; the files in the repository used h100)
# 1. <name>_gpu: training step, inference and the training loader on the GPU (benchmark.py train,infer,loader);
# 2. train.py on CUDA with AMP for a few epochs (cuda_smoke.py: passes or fails, log only);
# 3. <name>_gpu_ensemble: the old path vs shared inputs on the GPU, in the template's fp16 and in fp32;
# 4. <name>_host_cpu: per-slice inference on all the host's CPUs, fp32 vs bf16 where the CPU has bf16 units;
# 5. <name>_host_2cpu_ensemble: the ensemble on 2 of the host's CPUs (PyTorch, and OpenVINO where installed),
#    as the CPU claims count cores.
# Each benchmark writes its result file (figures with the command, commit, GPU, CPU and library versions) to
# benchmarks/results/ (RESULTS=<folder> to change) and its log to logs/ there; the end lists what was written.
# A step that fails is reported and the others still run.
set -u
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
name=${1:-$(python -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', torch.cuda.get_device_name(0).lower()))")}
results=${RESULTS:-benchmarks/results}
logs=$results/logs
mkdir -p "$logs"
failed=0

step() {  # step <label> <command...>: its output to <results>/logs/<name>_<label>.log; reports its status
  local label=$1 log="$logs/${name}_$1.log"
  shift
  echo "== $label"
  "$@" > "$log" 2>&1
  local rc=$?
  grep -E "^(detected|train|infer|loader|ensemble|\{\"cuda_smoke)" "$log" | tail -n 30
  [ $rc -eq 0 ] || { echo "$label failed (exit $rc): see $log"; failed=1; }
}

step gpu python benchmarks/benchmark.py --sections train,infer,loader --device cuda --train-batch 32 \
  --train-steps 10 --loader-workers 8,15 --volume-slices 32 --infer-batch 16 --infer-repeats 3 \
  --out "$results/${name}_gpu.json"
step smoke python benchmarks/cuda_smoke.py
step gpu_ensemble python benchmarks/benchmark.py --sections ensemble --device cuda --ensemble-members 2 \
  --ensemble-slices 32 --ensemble-repeats 2 --ensemble-paths old,new_torch --ensemble-screen-share 0.38 \
  --ensemble-fp32 --out "$results/${name}_gpu_ensemble.json"
CUDA_VISIBLE_DEVICES= step host_cpu python benchmarks/benchmark.py --sections infer --device cpu --volume-slices 4 \
  --infer-batch 4 --out "$results/${name}_host_cpu.json"
# 2 of the CPUs this process may use; lscpu shows whether they share a core
cpus=$(python -c "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0))[:2])))")
lscpu -e=CPU,CORE,SOCKET 2> /dev/null | awk -v c=",$cpus," 'NR == 1 || index(c, "," $1 ",")'
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 step host_2cpu_ensemble taskset -c "$cpus" python benchmarks/benchmark.py \
  --sections ensemble --device cpu --ensemble-members 1 --ensemble-slices 16 \
  --ensemble-paths old,new_torch,new_openvino --ensemble-screen-share 0.38 \
  --out "$results/${name}_host_2cpu_ensemble.json"

echo "== result files (redraw the plots with: python benchmarks/plot.py)"
ls -l "$results/${name}"_*.json 2> /dev/null
exit $failed
