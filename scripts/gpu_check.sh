#!/usr/bin/env bash
# GPU check, one GPU, bounded (well under 10 minutes): the CUDA build of torch, the model tests, the step benchmark
# in bf16 (benchmarks/bench_step.py: sdpa, and flash_attention_2 with flash-attn), then one epoch of
# the paper MOSI config (configs/paper/deepmlf_mosi.yaml: bf16, LoRA r=512) on a SmolLM2-1.7B-shaped random
# backbone with flash_attention_2 and with sdpa. Prints samples/s, tokens/s and peak GPU memory next to
# `fusion-dist plan`, and writes them to $OUT/gpu_check.json (OUT defaults to gpu_check_out/).
#
#   bash scripts/gpu_check.sh
#
# flash-attn: a prebuilt wheel if pip finds one for this torch/CUDA; without it the flash_attention_2 run is
# reported as unavailable (the fallback to sdpa is what `model.attn_implementation=auto` does).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_check: no NVIDIA GPU on this machine" >&2; exit 2; }
out=${OUT:-gpu_check_out}
mkdir -p "$out"
bash scripts/setup.sh  # with nvidia-smi present it installs the default (CUDA) torch build
export PATH="$PWD/.venv/bin:$PATH" PYTHONUNBUFFERED=1
python -c 'import torch; assert torch.cuda.is_available(), "torch has no CUDA"; print("gpu_check:", torch.cuda.get_device_name(0))'
timeout 120 pip install -q flash-attn --no-build-isolation 2>/dev/null || echo "gpu_check: no flash-attn wheel for this torch/CUDA"

timeout 150 python -m pytest -q -x tests/test_models_components.py tests/test_models_deepmlf.py tests/test_models_dmpf.py \
  tests/test_models_train.py

# the step benchmark's GPU row (bf16): sdpa (prefix split + cache on) and, with flash-attn, flash_attention_2
# (2-D masks only: no split, no cache, only the fused ops)
kernels=(sdpa)
python -c 'import flash_attn' 2>/dev/null && kernels+=(flash_attention_2)
for kernel in "${kernels[@]}"; do
  timeout 200 python benchmarks/bench_step.py --device cuda --dtype bf16 --attn "$kernel" --rounds 3 --steps 4 \
    --batch 32 --backbones "$out/bench_bb" | tee "$out/bench_step_$kernel.txt" || echo "gpu_check: bench_step $kernel failed"
done

[ -f "$out/bb/config.json" ] || timeout 120 fusion-dist make-backbone --arch llama --preset smollm2-1.7b --out "$out/bb"
if [ ! -f "$out/mosi/manifest.json" ]; then
  fusion-dist synth --dataset mosi --samples 600 --seed 0 --out "$out/mosi.pkl"
  fusion-dist prepare "$out/mosi.pkl" "$out/mosi"
fi
common=(model.backbone="$out/bb" data.root="$out/mosi" model.av.init=random+tune run.seeds=[0] train.epochs=1
        tracking.enabled=false train.log_every_steps=1 train.global_batch_size=64 train.micro_batch_size=32)
plan=$(fusion-dist plan configs/paper/deepmlf_mosi.yaml "${common[@]}" --gpus 1 --gpu-mem 80GB --json)

for kernel in flash_attention_2 sdpa; do
  log="$out/train_$kernel.log"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/mem_$kernel.csv" &
  smi=$!
  rc=0
  timeout 180 fusion-dist train configs/paper/deepmlf_mosi.yaml "${common[@]}" run.dir="$out/run_$kernel" \
    model.attn_implementation=$kernel > "$log" 2>&1 || rc=$?
  kill "$smi" 2>/dev/null || true
  echo "gpu_check: $kernel exit $rc (log $log)"
done

python - "$out" "$plan" <<'PY'
import json, re, statistics, sys
from pathlib import Path

out, plan = Path(sys.argv[1]), json.loads(sys.argv[2])
tokens = 50 + 8  # data.max_text_tokens + model.n_fusion of the paper MOSI config
zero2 = next(o for o in plan["options"] if o["name"] == "zero2")
result = {"plan_zero2_gib": zero2["total"] / 2**30}
for kernel in ("flash_attention_2", "sdpa"):
    text = (out / f"train_{kernel}.log").read_text()
    rates = [float(x) for x in re.findall(r"\| ([\d.]+) samples/s", text)]
    mem = [int(x) for x in (out / f"mem_{kernel}.csv").read_text().split() if x.isdigit()]
    ok = bool(rates) and "test metrics" in text
    result[kernel] = {"ok": ok, "samples_per_s": statistics.median(rates[1:] or rates) if rates else None,
                      "peak_gpu_mem_gib": max(mem) / 1024 if mem else None}
    if result[kernel]["samples_per_s"]:
        result[kernel]["tokens_per_s"] = result[kernel]["samples_per_s"] * tokens
print(json.dumps(result, indent=2))
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
PY
