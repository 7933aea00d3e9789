#!/bin/bash
# GPU batch: continue the 1,000-step block-FT LoRA (block copies only) for 1,000 more steps; evaluate it and the
# 1,000-step adapter on every answerable evaluation-split question; the full fine-tuning 1:1 row at 250 steps.
K=/root/keep
cd $K/tree
export PYTHONPATH=/tmp/site:$K/tree PYTHONUNBUFFERED=1 SKIP_BASE=1 BLOCKRAG_COMMIT=$(cat .gpu/commit)
A=benchmarks/results/finetune_real_gpu/blockft_1000steps_lora_block_adapter
F="python benchmarks/finetune_real.py"
stage() { name=$1; shift; echo "[$(date +%T)] start $name" >> $K/out/stages.log; "$@" > $K/out/$name.log 2>&1;
          echo "[$(date +%T)] end $name rc=$?" >> $K/out/stages.log; tar -C $K/out -czf $K/out/$name.tgz $name $name.log; }
stage cont $F run --model $K/model.gguf --prepared .gpu/prepared --out $K/out/cont --preset gpu --runs lora_block \
    --steps ${STEPS:-1000} --init-adapter $A --time-limit-s 5000
stage evalall_cont $F evaluate --model $K/out/cont/lora_block_adapter --prepared .gpu/prepared_all --out $K/out/evalall_cont
stage fullft $F run --model $K/model.gguf --prepared .gpu/prepared --out $K/out/fullft --preset gpu --runs full_ft \
    --steps 250 --time-limit-s 5000
stage evalall_1000 $F evaluate --model $A --prepared .gpu/prepared_all --out $K/out/evalall_1000
touch $K/out/done
