#!/bin/bash
# Run from the repository root on the device after setup.sh; --resume continues a run cut by the time limit.
# GPU batch: recovery on answers with passages encoded after the instruction block (a diagnostic), n=640 x 3 sets.
# Usage: bash .gpu/job.sh [--resume]
K=/root/keep
export PYTHONPATH=$K/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $K/rr
python benchmarks/recovery_real.py run --model smollm2-135m --prepared .gpu/recovery --splits eval,train \
  --sources disflqa,quac,narrativeqa --out $K/rr --batch 64 --time-limit-s ${LIMIT:-530} \
  --selections block+prefixed,deviation:0.2@16+prefixed,deviation:0.2@16,deviation:0.2,deviation:0.1@16+prefixed,deviation:0.2@2+prefixed \
  "$@" > $K/rr/run$([ "$1" = --resume ] && echo 2).log 2>&1
echo "rc=$?"
