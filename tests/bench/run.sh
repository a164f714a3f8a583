#!/bin/sh
# tests/bench/run.sh BUILD: radpipe's benchmarks, each against a peer measured in the same run
# on the same data; prints our figure, the peer's and the ratio (ours/peer as a speed-up).
# The machines are shared and noisy: compare ratios, not absolute times.
# Benchmarks that need a running stack or a peer service live in their own scripts,
# tests/bench/bench_<name>.sh BUILD TMP, run after the ones here. BENCH="header body ingest"
# runs only the named ones (default: all).
set -eu
build=${1:-build/release}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=/usr/bin/python3
samples=${RADPIPE_SAMPLES_DIR:-$root/../shared/dicom-samples}
[ -d "$samples" ] || samples=/work/shared/dicom-samples
export RADPIPE_SAMPLES_DIR="$samples"
want() { case " ${BENCH:-all} " in *" all "* | *" $1 "*) return 0 ;; esac; return 1; }

if want header; then
echo "== header parsing: lc_dicom (GDCM) vs pydicom dcmread(stop_before_pixels=True)"
if [ -d "$samples/series" ]; then
	files=$(find "$samples/series" -type f | sort)
	label="$(echo "$files" | wc -l) files of $samples/series"
else
	files=$(find tests/data -type f -name '*.dcm' | sort)
	label="$(echo "$files" | wc -l) files of tests/data"
fi
# shellcheck disable=SC2086
ours=$("$build/bench/bench_header" $files)
echo "$files" >"$tmp/files.txt"
peer=$($py - "$tmp/files.txt" <<'PY'
import sys, time
import pydicom
files = [l.strip() for l in open(sys.argv[1]) if l.strip()]
n = 0; t0 = time.perf_counter()
while time.perf_counter() - t0 < 2.0:
    for f in files:
        pydicom.dcmread(f, stop_before_pixels=True, force=True)
        n += 1
print("pydicom_files_per_s=%.1f" % (n / (time.perf_counter() - t0)))
PY
)
o=$(echo "$ours" | sed 's/.*ours_files_per_s=\([0-9.]*\).*/\1/')
p=$(echo "$peer" | sed 's/.*=\([0-9.]*\)/\1/')
echo "   data: $label"
echo "   ours:    $o files/s ($ours)"
echo "   pydicom: $p files/s"
echo "   ratio:   $(echo "$o $p" | awk '{printf "%.1fx", $1 / $2}')"

fi

if want otsu; then
echo "== Otsu threshold + mask, 512x512x300 float: gpu/ CPU path vs scikit-image"
ours=$("$build/bench/bench_otsu" "$tmp/vol.f32")
peer=$($py - "$tmp/vol.f32" <<'PY'
import sys, time
import numpy as np
from skimage.filters import threshold_otsu
v = np.fromfile(sys.argv[1], dtype=np.float32).reshape(300, 512, 512)
times = []
for _ in range(5):
    t0 = time.perf_counter()
    t = threshold_otsu(v, nbins=256)
    m = v > t
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
print("skimage_ms=%.1f threshold=%.3f voxels=%d" % (times[2], t, int(m.sum())))
PY
)
o=$(echo "$ours" | sed 's/.*ours_ms=\([0-9.]*\).*/\1/')
p=$(echo "$peer" | sed 's/.*skimage_ms=\([0-9.]*\).*/\1/')
echo "   ours:    $ours"
echo "   skimage: $peer"
echo "   ratio:   $(echo "$o $p" | awk '{printf "%.1fx faster", $2 / $1}')"

fi

if want body; then
echo "== body pipeline (HU window, Otsu, largest component, holes filled per slice), 512x512x300 CT: gpu-segmenter CPU path vs scikit-image"
ours=$("$build/bench/bench_body" "$tmp/ct.f32" 3)
peer=$($py - "$tmp/ct.f32" <<'PY'
import sys, time
import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.measure import label
v = np.fromfile(sys.argv[1], dtype=np.float32).reshape(300, 512, 512)
cross2d = np.zeros((3, 3, 3), bool)
cross2d[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]  # fill each slice on its own
times = []
for _ in range(3):  # the median of 3, as bench_body reports ours
    t0 = time.perf_counter()
    w = np.clip(v, -1000.0, 1000.0)  # the body window: level 0, width 2000
    t = threshold_otsu(w, nbins=256)
    m = w > t
    lab = label(m, connectivity=1)  # 6-connected
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    m = lab == sizes.argmax()
    m = ndimage.binary_fill_holes(m, structure=cross2d)
    n = int(m.sum())
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
print("skimage_ms=%.1f threshold=%.3f voxels=%d" % (times[1], t, n))
PY
)
o=$(echo "$ours" | sed 's/.*ours_ms=\([0-9.]*\).*/\1/')
p=$(echo "$peer" | sed 's/.*skimage_ms=\([0-9.]*\).*/\1/')
echo "   ours:    $ours"
echo "   skimage: $peer"
echo "   ratio:   $(echo "$o $p" | awk '{printf "%.1fx faster (target 5x)", $2 / $1}')"
fi

status=0
for script in tests/bench/bench_*.sh; do
	[ -e "$script" ] || continue
	name=$(basename "$script" .sh)
	want "${name#bench_}" || continue
	if ! sh "$script" "$build" "$tmp"; then
		echo "   FAILED: $script"
		status=1
	fi
done
exit $status
