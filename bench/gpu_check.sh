#!/usr/bin/env bash
# Every GPU measurement of the project as one command, for a GPU machine whose python3 already
# holds torch (nothing is installed): run from the repository root, with the four Fashion-MNIST
# files copied into data/fashion/. About 7 minutes on one H200.
#
#   bash bench/gpu_check.sh                       # results in $OUT (default /tmp/gpu-check)
#   QUICK=1 DEVICE=cpu bash bench/gpu_check.sh    # a few steps of each: checks the script itself
#
# What it runs: the post's recipe and its N(0, 1) initialisation on the GPU (accuracy, time);
# bench/train_speed.py (fmnist train against a plain PyTorch loop); the time-to-accuracy
# benchmark of the gpu-fast preset over 3 seeds; the throughput of the best preset's wide ResNet
# (eager, bf16, 1.4 epochs: the full 40 do not fit in the 9 minutes); evaluation
# throughput of the test set. A step that fails is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-}
mkdir -p "$OUT"
RUNS=$(mktemp -d)
FMNIST="python3 -m fmnist"

step() { echo; echo "=== $* ($(date +%T))"; }

step "machine"
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

if [ -n "$QUICK" ]; then
    POST=(--steps 20); SPEED=(--steps 10 --repeats 1); TTA=(--seeds 1 --epochs 0.02 --evals 2)
    BEST=(--epochs 0.0005 --batch-size 8 --model post-bn); EVALN=1  # a cheap network: the script, not the figures
else
    POST=(); SPEED=(--steps 500 --repeats 3); TTA=(--seeds 3); BEST=(--epochs 1.4); EVALN=5
fi

step "the post's recipe on $DEVICE (test accuracy 0.8852 on the CPU)"
$FMNIST train --device "$DEVICE" "${POST[@]}" --out "$RUNS/post" --no-plots --quiet
step "the post's recipe with its N(0, 1) initialisation (0.8192 on the CPU)"
$FMNIST train --device "$DEVICE" "${POST[@]}" --init normal --out "$RUNS/post-normal" --no-plots --quiet

step "training speed: fmnist train against a plain loop"
python3 bench/train_speed.py --device "$DEVICE" "${SPEED[@]}" --json "$OUT/train_speed.json"

step "time to accuracy: gpu-fast"
python3 bench/time_to_accuracy.py --presets gpu-fast --device "$DEVICE" "${TTA[@]}" --json "$OUT/time_to_accuracy.json"

step "best preset's network: training throughput (eager bf16, no evaluations during training)"
$FMNIST train --preset best --device "$DEVICE" "${BEST[@]}" --no-compile --no-plots --quiet \
    --out "$RUNS/best" --checkpoint-every 0 && python3 - "$RUNS/best" <<'EOF'
import sys
from fmnist.run import RunDir
run = RunDir(sys.argv[1])
config, meta = run.read_config(), run.read_meta()
images = meta.steps * config["batch_size"]
print(f"{meta.model}: {meta.steps} steps of {config['batch_size']} in {meta.train_seconds:.1f} s = "
      f"{images / meta.train_seconds:,.0f} images/s; 40 epochs of 55,000 would take "
      f"{40 * 55_000 / (images / meta.train_seconds) / 60:.1f} min")
EOF

step "evaluation throughput of the post's model on $DEVICE (10,000 test images)"
python3 - "$RUNS/post" "$DEVICE" "$EVALN" <<'EOF'
import statistics, sys, time
import torch
from fmnist.run import load_network
from fmnist.data import load_split, to_tensor
from fmnist.inference.forward import predict_logits
run, device, repeats = sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3])
model, meta = load_network(run, device)
model = model.to(memory_format=torch.channels_last)
raw, labels = load_split("test")
images = to_tensor(raw, meta.normalization.mean, meta.normalization.std, device)
labels = torch.as_tensor(labels, device=device)
for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
    for batch in (256, 2048):
        times = []
        for _ in range(repeats + 1):  # the first pass warms up
            start = time.perf_counter()
            predictions = predict_logits(model, images, batch, dtype).argmax(1)
            accuracy = (predictions == labels).float().mean().item()  # waits for the device
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times[1:])
        print(f"{name} batch {batch:5d}: {len(images) / seconds:10,.0f} images/s  accuracy {accuracy:.4f}")
EOF

rm -rf "$RUNS"
step "done"
