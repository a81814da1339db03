#!/usr/bin/env bash
# One prepared run on a lent GPU machine (device tool): wheels for what its image lacks, then
# the benchmark on the GPU, the host CPU's inference (bf16 where it is native) and a CUDA smoke
# run of train.py. Results land in $OUT (JSON + Markdown) for benchmarks/RESULTS.md.
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
