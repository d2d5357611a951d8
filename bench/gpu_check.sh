#!/usr/bin/env bash
# The prepared GPU check (issue 9). A session whose task is lent a GPU runs it once, early, through the
# device tool, from the repository root:
#     bash bench/gpu_check.sh            (with `.whl` carried: deepspeed and what it needs, see below)
# It installs nothing from the network. The device machine has PyTorch; deepspeed (a pure-Python wheel
# built here with `pip wheel --no-deps deepspeed`) and omegaconf, antlr4-python3-runtime, hjson, ninja,
# py-cpuinfo, msgpack, tokenizers, safetensors travel as wheels in .whl/ (see the device tool's README).
# It measures, in at most ~8 minutes on one H100/H200:
#   - gpt3-small at n_ctx 2048, bf16, ZeRO-2: tokens/s, MFU and peak memory against `scalegpt plan`,
#     for micro batches 8 and 16, without and with torch.compile;
#   - sampling tokens/s at batch 1 against the memory-bandwidth bound.
# The figures go to $OUT/gpu_check.md (bench/gpu_check.md outside the device tool), to copy into
# bench/RESULTS.md with the device, date and versions.
set -uo pipefail
out="${OUT:-bench}/gpu_check.md"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
# Import the checkout as the `scalegpt` package without installing it.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/scalegpt && export PYTHONPATH="/tmp/pkg:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in *H200*) hbm=4800 ;; *H100*) hbm=3350 ;; *A100*) hbm=2039 ;; *) hbm=1000 ;; esac
{
    echo "# GPU check, $(date -u +%F), $gpu"
    python3 -c "import torch, deepspeed; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| deepspeed', deepspeed.__version__)"
    # GPT-3 Small with dense attention (flash SDPA): the MFU target of issue 9 (>= 50%), and issue 4's
    # ratio to a plain PyTorch loop (>= 0.95x), one micro batch per optimizer step, the worst case for it.
    for compile in false true; do
        for micro in 8 16; do
            timeout 170 python3 bench/train.py configs/gpt3-small.yaml model.attention=dense train.device=cuda \
                train.precision=bf16 train.zero_stage=2 "train.micro_batch=$micro" "train.compile=$compile" \
                train.global_batch=0 --steps 10 --warmup 3 --baseline || echo "(failed or timed out: micro batch $micro, compile $compile)"
        done
    done
    timeout 100 python3 bench/sample.py --models gpt3-small --batches 1 --new-tokens 256 --device cuda \
        --hbm-gbs "$hbm" || echo "(sampling benchmark failed or timed out)"
} 2>&1 | grep -v "^\[20" | tee "$out"
