#!/usr/bin/env bash
# The GPU check: one script that fits one device lease, at most 8 minutes on a fresh H200 machine with its
# wheels installed. A session whose task is lent a GPU runs it once, early:
#     bash bench/gpu_check.sh --fetch-wheels    here, once: the wheels below into .whl/ (git-ignored)
#     bash bench/gpu_check.sh                   there, from the repository root, through the device tool
#                                               with carry [".whl"]
# It measures, with nvcc and CUDA_HOME hidden from every run (the machine has a CUDA toolkit; a user's
# pip-installed torch has none, and nothing on the default path may need one):
#   - gpt3-small at n_ctx 2048, bf16, ZeRO-2, as shipped (alternating attention, no compile), and with
#     dense attention and torch.compile; two micro batches of 8 per step, so the step accumulates (in fp32)
#     as a run does: step time, tokens/s, MFU, the ratio to a plain PyTorch loop (bench/train.py), and
#     peak GPU memory against `scalegpt plan`;
#   - sampling at batch 1 against the memory-bandwidth bound (bench/sample.py).
# Figures go to $OUT/gpu_check.json (bench/gpu_check.json outside the device tool), the full output to
# gpu_check.log beside it; copy the figures into bench/RESULTS.md with the device, date and versions.
set -uo pipefail

# What the training path imports that the GPU image (torch 2.11, Python 3.12) lacks: deepspeed and its
# config layer pydantic, and omegaconf. The versions are this checkout's virtualenv's;
# tests/test_gpu_check.py checks the list against each package's own requirements.
WHEELS=(
    deepspeed==0.19.8
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    hjson==3.1.0
    omegaconf==2.4.0
)
# Already on the image (the device tool's KINDS.md): what the packages above and scalegpt's training
# path need besides. datasets, wandb, matplotlib and the curation libraries (scikit-learn, rensa,
# datatrove) are not imported by the benchmarks.
IMAGE_HAS=(torch numpy packaging psutil py-cpuinfo tqdm einops msgpack ninja pyyaml tokenizers safetensors fsspec
    transformers)

if [ "${1:-}" = "--fetch-wheels" ]; then
    py=${PYTHON:-python3}
    [ -x .venv/bin/python ] && py=${PYTHON:-.venv/bin/python}
    mkdir -p .whl && rm -f .whl/*.whl
    exclude=$(git rev-parse --git-path info/exclude) && mkdir -p "$(dirname "$exclude")" \
        && { grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"; }
    # deepspeed ships as a source archive whose setup.py imports torch (hence no build isolation); without
    # DS_BUILD_* variables its wheel is pure Python and compiles no op.
    "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${WHEELS[0]}" || exit 1
    exec "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]:1}"
fi

out_dir="${OUT:-bench}"
log="$out_dir/gpu_check.log"
work=$(mktemp -d)
start=$SECONDS
: >"$log"
if [ -d .whl ]; then
    timeout 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >>"$log" 2>&1 && export PYTHONPATH=/tmp/site
fi
# Import the checkout as the `scalegpt` package without installing it.
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/scalegpt && export PYTHONPATH="/tmp/pkg:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
# Hide the CUDA toolkit: no nvcc on PATH, and CUDA_HOME an empty folder (unset, torch would find
# /usr/local/cuda by itself), so any attempt to compile a CUDA op fails. Whatever is JIT-built
# lands in an empty TORCH_EXTENSIONS_DIR, which the JSON lists.
PATH=$(tr ':' '\n' <<<"$PATH" | while read -r d; do [ -x "$d/nvcc" ] || printf '%s:' "$d"; done)
export PATH="${PATH%:}" CUDA_HOME="$work/no-cuda" TORCH_EXTENSIONS_DIR="$work/torch_extensions"
unset CUDA_PATH
mkdir -p "$CUDA_HOME" "$TORCH_EXTENSIONS_DIR"

run() {  # run NAME SECONDS COMMAND...: the command's output in $work/NAME.out and the log, its exit code beside
    local name=$1 limit=$2
    shift 2
    echo "## $name: $*" >>"$log"
    timeout "$limit" "$@" >"$work/$name.out" 2>&1
    echo $? >"$work/$name.rc"
    cat "$work/$name.out" >>"$log"
}

run imports 45 python3 -c "import torch, deepspeed, omegaconf, scalegpt.train.engine, scalegpt.launch.plan
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
if [ "$(cat "$work/imports.rc")" = 0 ]; then
    config=(configs/gpt3-small.yaml train.device=cuda train.global_batch=16)
    flags=(--steps 10 --warmup 3 --baseline)
    run shipped 120 python3 bench/train.py "${config[@]}" "${flags[@]}"
    run dense_compiled 180 python3 bench/train.py "${config[@]}" model.attention=dense train.compile=true "${flags[@]}"
    run sampling 60 python3 bench/sample.py --models gpt3-small --batches 1 --new-tokens 256 --device cuda \
        --hbm-gbs 4800
fi

python3 - "$work" "$out_dir/gpu_check.json" "$((SECONDS - start))" <<'EOF'
"""Gather the runs' printed figures into one JSON; a run that failed keeps its exit code and last lines."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

work, dest, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
num = lambda s: float(s.replace(",", "").rstrip("%x"))  # noqa: E731
result = {"seconds": seconds, "nvcc_on_path": shutil.which("nvcc"), "cuda_home": os.environ["CUDA_HOME"]}
result["torch_extensions_built"] = sorted(os.listdir(os.environ["TORCH_EXTENSIONS_DIR"]))
if shutil.which("nvidia-smi"):
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True)
    result["gpu"] = gpu.stdout.strip()
for name in ("imports", "shipped", "dense_compiled", "sampling"):
    rc_file = work / f"{name}.rc"
    if not rc_file.exists():
        result[name] = {"ran": False}
        continue
    text = (work / f"{name}.out").read_text(errors="replace")
    entry = {"exit": int(rc_file.read_text())}
    for label, key in (("scalegpt \\(DeepSpeed\\)", "scalegpt"), ("plain PyTorch", "plain")):
        m = re.search(rf"^{label}\s+([\d.]+)\s+([\d,]+)\s+(\S+)\s+(\S+)", text, re.M)
        if m:
            entry[key] = {"step_ms": num(m[1]), "tokens_per_s": num(m[2]), "mfu_pct": m[3], "last_loss": m[4]}
    if m := re.search(r"peak memory: ([\d.]+) GiB.*predicts ([\d.]+) GiB", text):
        entry["peak_gib"], entry["plan_gib"] = num(m[1]), num(m[2])
    if m := re.search(r"ratio scalegpt / plain PyTorch: ([\d.]+)x", text):
        entry["ratio_to_plain"] = num(m[1])
    if m := re.search(r"batch 1: ([\d.]+)M params, bound ([\d,]+) tok/s; ours ([\d,]+) tok/s = ([\d.]+)%", text):
        entry.update(params_m=num(m[1]), bound_tokens_per_s=num(m[2]), tokens_per_s=num(m[3]), pct_of_bound=num(m[4]))
    if name == "imports" or entry["exit"] != 0:
        entry["tail"] = text.strip().splitlines()[-8:]
    result[name] = entry
dest.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
[ "$(cat "$work/imports.rc")" = 0 ] || { echo "gpu_check: import failed; see $log" >&2; exit 1; }
