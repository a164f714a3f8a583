#!/bin/sh
# tests/fuzz/run.sh DIR SECONDS: run every libFuzzer binary in DIR for SECONDS each, seeded
# from tests/fuzz/<name>/ and the shared corpus's malformed files when present; a crash,
# leak or sanitizer report fails the run (libFuzzer writes the input as crash-*).
set -u
dir=$(cd "$1" && pwd)
secs=${2:-30}
root=$(cd "$(dirname "$0")/../.." && pwd)
fail=0
for f in "$dir"/fuzz_*; do
	[ -x "$f" ] || continue
	name=$(basename "$f")
	corpus="$root/build/fuzz/corpus/$name"
	mkdir -p "$corpus"
	seeds=""
	[ -d "$root/tests/fuzz/${name#fuzz_}" ] && seeds="$root/tests/fuzz/${name#fuzz_}"
	[ -d "$root/tests/data" ] && seeds="$seeds $root/tests/data/malformed"
	[ -d "$root/../shared/dicom-samples/malformed" ] && seeds="$seeds $root/../shared/dicom-samples/malformed"
	echo "=== $name for ${secs}s"
	# shellcheck disable=SC2086
	if ! (cd "$root/build/fuzz" && "$f" -max_total_time="$secs" -rss_limit_mb=2048 \
		-print_final_stats=1 "$corpus" $seeds); then
		echo "--- FAIL $name (inputs in build/fuzz/crash-*)"
		fail=1
	else
		echo "--- ok $name"
	fi
done
exit $fail
