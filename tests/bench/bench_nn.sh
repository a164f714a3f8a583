#!/bin/sh
# tests/bench/bench_nn.sh BUILD TMP: CPU inference of a 3D U-Net, the engine (gpu/gpu_nn.h,
# BUILD/bench/bench_nn: gpu_nn_forward on the CPU backend) against PyTorch (Debian
# python3-torch, eval mode, no_grad) on the same model and the same input in one run, with
# the same thread count. The model is an untrained nnU-Net PlainConvUNet made here by
# tests/models/gen_models.py --bench (not committed): 4 stages of 32, 64, 128, 256 features,
# 2 conv-instancenorm-leakyrelu blocks per stage, one 64x96x96 patch (nnU-Net 3d_fullres's
# building blocks at a patch the 2-core machine runs in seconds). Each side: one warm-up pass,
# then the median of BENCH_NN_REPS (3) passes; the outputs are compared (max abs difference).
# Knobs: BENCH_NN_FEATURES (32,64,128,256), BENCH_NN_PATCH (64,96,96), BENCH_NN_THREADS (the
# online CPUs), BENCH_NN_REPS (3).
set -eu
build=$1
tmp=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
py=/usr/bin/python3
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in tests/models
features=${BENCH_NN_FEATURES:-32,64,128,256}
patch=${BENCH_NN_PATCH:-64,96,96}
threads=${BENCH_NN_THREADS:-$(nproc)}
reps=${BENCH_NN_REPS:-3}
dir="$tmp/nn"

echo "== 3D U-Net inference on the CPU ($threads threads): gpu/nn engine vs PyTorch, same model and input"
if ! $py -c 'import torch, onnx' 2>/dev/null; then
	echo "   skipped: python3-torch and python3-onnx are missing (deploy/install-deps.sh bench)"
	exit 1
fi
if [ ! -x "$build/bench/bench_nn" ]; then
	echo "   skipped: $build/bench/bench_nn is not built"
	exit 1
fi
$py tests/models/gen_models.py --bench "$dir" --features "$features" --patch "$patch" \
	--threads "$threads" >/dev/null 2>"$tmp/nn-gen.log" || {
	tail -n 20 "$tmp/nn-gen.log"
	exit 1
}
shape=$(echo "1,1,$patch" | tr ',' ' ')
# shellcheck disable=SC2086
if ! ours=$("$build/bench/bench_nn" "$dir/model.onnx" "$dir/input.bin" "$dir/ours.bin" \
	"$threads" "$reps" $shape); then
	echo "   FAILED: bench_nn: $ours"
	exit 1
fi
peer=$($py - "$dir" "$threads" "$reps" "$features" <<'PY'
import json, sys, time
import numpy as np
import torch
sys.path.insert(0, "tests/models")
import gen_models as g
d, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
features = [int(v) for v in sys.argv[4].split(",")]
torch.set_num_threads(threads)
meta = json.load(open(d + "/meta.json"))
m = g.PlainConvUNet(3, 1, tuple(features), meta["classes"])
m.load_state_dict(torch.load(d + "/model.pt"))
m.eval()
shape = meta["input"]["shape"]
x = torch.from_numpy(np.fromfile(d + "/input.bin", dtype="<f4").reshape(shape))
times = []
with torch.no_grad():
    y = m(x)  # warm-up
    for _ in range(reps):
        t0 = time.perf_counter()
        y = m(x)
        times.append((time.perf_counter() - t0) * 1000)
times.sort()
ours = np.fromfile(d + "/ours.bin", dtype="<f4")
ref = y.numpy().ravel()
diff = float(np.abs(ours - ref).max()) if ours.size == ref.size else float("nan")
print("torch_ms=%.1f threads=%d params=%d max_abs_diff=%.3g" % (
    times[len(times) // 2], torch.get_num_threads(), meta["parameters"], diff))
PY
)
o=$(echo "$ours" | sed 's/.*ours_ms=\([0-9.]*\).*/\1/')
p=$(echo "$peer" | sed 's/.*torch_ms=\([0-9.]*\).*/\1/')
echo "   model:   PlainConvUNet features $features, patch $patch, $(echo "$peer" | sed 's/.*params=\([0-9]*\).*/\1/') parameters, opset 13"
echo "   ours:    $ours"
echo "   pytorch: $peer"
echo "   ratio:   $(echo "$o $p" | awk '{printf "%.2fx PyTorch (target >= 1.0x)", $2 / $1}')"
diff=$(echo "$peer" | sed 's/.*max_abs_diff=\([^ ]*\).*/\1/')
if ! echo "$diff" | awk '{exit !($1 <= 1e-3)}'; then
	echo "   FAILED: the outputs differ by $diff (more than 1e-3)"
	exit 1
fi
