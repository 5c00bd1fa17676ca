#!/usr/bin/env bash
# The demo, end to end on synthetic MOSI-shaped data. Safe to re-run: finished steps are skipped.
#   bash scripts/demo.sh            (outputs under demo_out/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
FD=.venv/bin/fusion-dist
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"

step() { echo; echo "== $* =="; }

step "1. synthetic MOSI-shaped pickle (exact MMSA layout, planted signal)"
if [ ! -f "$OUT/mosi_synth.pkl" ]; then
  $FD synth --dataset mosi --samples 600 --seed 0 --out "$OUT/mosi_synth.pkl"
else
  echo "$OUT/mosi_synth.pkl exists"
fi

step "2. prepare: pickle -> checksummed Arrow shards"
$FD prepare "$OUT/mosi_synth.pkl" "$OUT/shards/mosi" --rows-per-shard 200

step "3. verify every shard"
$FD verify "$OUT/shards/mosi"

step "4. summary"
.venv/bin/python - "$OUT/shards/mosi" <<'PY' | tee "$OUT/data_summary.txt"
import sys
import numpy as np
from fusion_dist.data import ShardDataset

root = sys.argv[1]
for split in ("train", "valid", "test"):
    ds = ShardDataset(root, split)
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    la = [len(ds[i]["audio"]) for i in range(len(ds))]
    f = ds.manifest["features"]
    print(f"{split:5s}: {len(ds):4d} rows, audio dim {f['audio']['dim']} (frames {min(la)}-{max(la)}), "
          f"vision dim {f['vision']['dim']}, labels {labels.min():+.2f}..{labels.max():+.2f} "
          f"(range {ds.manifest['label_range']})")
PY

# Training: 2 CPU ranks with the deepspeed launcher (gloo; DS_ACCELERATOR=cpu is picked automatically
# without a GPU). On a GPU box the same commands use one rank per GPU.
RANKS=${DEMO_RANKS:-2}
launch() { OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus "$RANKS" --master_port "${DEMO_PORT:-29561}" .venv/bin/fusion-dist "$@"; }
# No tracking URI set: each run tracks into the MLflow store inside its run directory.
COMMON=(data.root="$OUT/shards/mosi" model.backbone="$OUT/backbone")

step "5. tiny random Llama backbone"
[ -f "$OUT/backbone/config.json" ] || $FD make-backbone --arch llama --preset tiny --out "$OUT/backbone"

step "6. stage 1: AV encoder pretraining on $RANKS ranks (resumes if interrupted)"
launch pretrain-av configs/demo/deepmlf_tiny.yaml "${COMMON[@]}" run.dir="$OUT/runs/av_pretrain"

step "7. stage 2: DeepMLF from the pretrained encoder on $RANKS ranks"
launch train configs/demo/deepmlf_tiny.yaml "${COMMON[@]}" run.dir="$OUT/runs/deepmlf_tiny" \
  model.av.init=pretrained+tune model.av.checkpoint="$OUT/runs/av_pretrain/export"

step "8. evaluate the best checkpoint (test metrics table)"
$FD evaluate configs/demo/deepmlf_tiny.yaml "${COMMON[@]}" run.dir="$OUT/runs/deepmlf_tiny" \
  model.av.init=pretrained+tune model.av.checkpoint="$OUT/runs/av_pretrain/export"

step "9. register the model in MLflow (pyfunc; alias @champion if its test MAE is the best so far)"
$FD register "$OUT/runs/deepmlf_tiny" --bundle-backbone  # the backbone travels with the model: it loads anywhere

STORE="sqlite:///$(cd "$OUT" && pwd)/runs/deepmlf_tiny/mlflow.db"
echo
echo "Demo finished. Look at the runs and the registered model in the MLflow UI:"
echo "  .venv/bin/mlflow ui --backend-store-uri $STORE"
echo "Load the model from any directory (it carries its backbone), or serve it over REST:"
echo "  MLFLOW_TRACKING_URI=$STORE $PWD/.venv/bin/python -c \"import mlflow; m = mlflow.pyfunc.load_model('models:/fusion-dist-mosi-deepmlf@champion')\""
echo "  MLFLOW_TRACKING_URI=$STORE PATH=$PWD/.venv/bin:\$PATH mlflow models serve -m models:/fusion-dist-mosi-deepmlf@champion --env-manager local -p 5001"
