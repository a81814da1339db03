#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): wheels for what its image lacks, then
# the benchmark on the GPU, a CUDA smoke run of train.py, the 18-member ensemble on the GPU (old
# path vs new, the template's fp16), the host CPU's inference, and the ensemble on 2 of the host's
# cores (AMX where it has it; PyTorch: OpenVINO is too large to carry). Results land in $OUT (JSON +
# Markdown) for benchmarks/RESULTS.md. The timeouts add up to under 10 minutes, one device call.
# Prepare here, once (the image has Python 3.12, torch and numpy; it reaches no registry):
#   pip download -d .whl --no-deps --only-binary :all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 monai fire termcolor nibabel pydicom optuna sqlalchemy alembic mako \
#     colorlog greenlet   (14 MiB; the carried tree may hold 64 MiB in all)
# then call the device tool's run with carry [".whl"] and the command `bash benchmarks/gpu_run.sh`.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
grep -m1 "model name" /proc/cpuinfo; grep -o -w -E "amx_bf16|avx512_bf16" /proc/cpuinfo | sort | uniq -c; nproc
timeout 140 python3 benchmarks/benchmark.py --sections train,infer,loader --device cuda --train-batch 32 \
  --train-steps 10 --loader-samples 480 --loader-workers 8,15 --volume-slices 32 --infer-batch 16 \
  --infer-repeats 3 --out $OUT/gpu.json > $OUT/gpu.log 2>&1; echo "gpu benchmark rc $?"; tail -n 40 $OUT/gpu.log
timeout 50 python3 benchmarks/cuda_smoke.py > $OUT/smoke.log 2>&1; echo "smoke rc $?"; tail -n 5 $OUT/smoke.log
timeout 60 python3 benchmarks/benchmark.py --sections dice --device cuda --dice-profile paper --dice-size 256 \
  --dice-slices 16 --dice-epochs 25 --train-batch 16 --dice-workers 8 --out $OUT/dice.json > $OUT/dice.log 2>&1
echo "dice rc $?"; grep -E "^dice" $OUT/dice.log | tail -n 2
OMP_NUM_THREADS=16 timeout 45 python3 benchmarks/benchmark.py --sections infer --device cpu --volume-slices 4 \
  --infer-batch 4 --out $OUT/host_cpu.json > $OUT/host_cpu.log 2>&1; echo "host cpu rc $?"; grep -E "^infer" $OUT/host_cpu.log
timeout 90 python3 benchmarks/benchmark.py --sections ensemble --device cuda --ensemble-members 2 \
  --ensemble-slices 32 --ensemble-repeats 2 --ensemble-paths old,new_torch --ensemble-screen-share 0.38 \
  --ensemble-fp32 --out $OUT/gpu_ensemble.json > $OUT/gpu_ensemble.log 2>&1; echo "gpu ensemble rc $?"
grep -E "^ensemble" $OUT/gpu_ensemble.log | cut -c1-240
pin=""; command -v taskset > /dev/null && pin="taskset -c 0,1"  # 2 cores, as the CPU goals say
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout 150 $pin python3 benchmarks/benchmark.py --sections ensemble \
  --device cpu --ensemble-members 1 --ensemble-slices 16 --ensemble-paths old,new_torch \
  --ensemble-screen-share 0.38 --out $OUT/host_2core_ensemble.json > $OUT/host_2core_ensemble.log 2>&1
echo "host 2-core ensemble rc $?"; grep -E "detected|^ensemble" $OUT/host_2core_ensemble.log | cut -c1-240
