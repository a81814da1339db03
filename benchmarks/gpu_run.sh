#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): wheels for what its image lacks, then the
# training step, inference and loader sections on the GPU, a CUDA smoke run of train.py, the ensemble
# on the GPU (old path vs new in the template's fp16; 2 members measured, scaled to 18) and the
# ensemble on 2 of the host's CPUs (AMX where it has it; PyTorch: OpenVINO is too large to carry).
# The timeouts add up to about 7 minutes, so a start and one rerun fit the 15 device minutes.
# Everything lands in one archive, $OUT/gpu_run.tgz (JSON, Markdown, logs), for benchmarks/RESULTS.md;
# the key lines are printed too.
# Prepare here, once (the image has Python 3.12, torch and numpy; it reaches no registry):
#   pip download -d .whl --no-deps --only-binary :all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 monai fire termcolor nibabel pydicom optuna sqlalchemy alembic mako \
#     colorlog greenlet
# then call the device tool's run with carry [".whl"] and the command `bash benchmarks/gpu_run.sh`.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
RES=/tmp/gpu_run; mkdir -p $RES $OUT
trap 'tar czf $OUT/gpu_run.tgz -C $RES .' EXIT  # what ran comes back even where a later step hangs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
grep -m1 "model name" /proc/cpuinfo; grep -o -w -E "amx_bf16|avx512_bf16" /proc/cpuinfo | sort | uniq -c; nproc
timeout 140 python3 benchmarks/benchmark.py --sections train,infer,loader --device cuda --train-batch 32 \
  --train-steps 10 --loader-workers 8,15 --volume-slices 32 --infer-batch 16 \
  --infer-repeats 3 --out $RES/gpu.json > $RES/gpu.log 2>&1; echo "gpu benchmark rc $?"; tail -n 40 $RES/gpu.log
timeout 50 python3 benchmarks/cuda_smoke.py > $RES/smoke.log 2>&1; echo "smoke rc $?"; tail -n 5 $RES/smoke.log
timeout 90 python3 benchmarks/benchmark.py --sections ensemble --device cuda --ensemble-members 2 \
  --ensemble-slices 32 --ensemble-repeats 2 --ensemble-paths old,new_torch --ensemble-screen-share 0.38 \
  --ensemble-fp32 --out $RES/gpu_ensemble.json > $RES/gpu_ensemble.log 2>&1; echo "gpu ensemble rc $?"
grep -E "^ensemble" $RES/gpu_ensemble.log
# 2 of the CPUs this process may use, as the CPU goals count cores; lscpu shows whether they share a core
cpus=$(python3 -c "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0))[:2])))")
lscpu -e=CPU,CORE,SOCKET 2> /dev/null | awk -v c=",$cpus," 'NR == 1 || index(c, "," $1 ",")'
CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 timeout 150 taskset -c $cpus python3 benchmarks/benchmark.py \
  --sections ensemble --device cpu --ensemble-members 1 --ensemble-slices 16 --ensemble-paths old,new_torch \
  --ensemble-screen-share 0.38 --out $RES/host_2cpu_ensemble.json > $RES/host_2cpu_ensemble.log 2>&1
echo "host 2-CPU ensemble rc $?"; grep -E "detected|^ensemble" $RES/host_2cpu_ensemble.log
