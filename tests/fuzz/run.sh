#!/bin/sh
# tests/fuzz/run.sh DIR SECONDS [NAME=SECONDS...]: run every libFuzzer binary in DIR, each for
# SECONDS or for the time its NAME=SECONDS argument gives (fuzz_dicom_header=60). Seeds: the
# target's own folder tests/fuzz/<name>/; the DICOM parser also gets tests/data and the shared
# corpus (malformed files first, then every other sample but the large series). A crash, leak
# or sanitizer report fails the run (libFuzzer keeps the input as build/fuzz/crash-*).
set -u
dir=$(cd "$1" && pwd)
secs=${2:-30}
shift 2 2>/dev/null || shift $#
root=$(cd "$(dirname "$0")/../.." && pwd)
samples=${RADPIPE_SAMPLES_DIR:-$root/../shared/dicom-samples}
fail=0
for f in "$dir"/fuzz_*; do
	[ -x "$f" ] || continue
	name=$(basename "$f")
	t=$secs
	for a in "$@"; do
		case "$a" in "$name="*) t=${a#*=} ;; esac
	done
	corpus="$root/build/fuzz/corpus/$name"
	mkdir -p "$corpus"
	seeds=""
	[ -d "$root/tests/fuzz/${name#fuzz_}" ] && seeds="$root/tests/fuzz/${name#fuzz_}"
	if [ "$name" = fuzz_dicom_header ]; then
		[ -d "$root/tests/data/malformed" ] && seeds="$seeds $root/tests/data/malformed"
		for d in malformed syntaxes charsets multiframe seg other private dicomdir; do
			[ -d "$samples/$d" ] && seeds="$seeds $samples/$d"
		done
	fi
	echo "=== $name for ${t}s"
	# -max_len bounds the mutations, not the seeds: headers live in the first kilobytes
	log="$root/build/fuzz/$name.log"
	# shellcheck disable=SC2086
	(cd "$root/build/fuzz" && "$f" -max_total_time="$t" -rss_limit_mb=2048 -max_len=65536 \
		-print_final_stats=1 "$corpus" $seeds) >"$log" 2>&1
	st=$?
	tail -n 12 "$log"
	if [ $st -ne 0 ]; then
		echo "--- FAIL $name (exit $st; log $log, inputs in build/fuzz/crash-*)"
		fail=1
	else
		echo "--- ok $name"
	fi
done
exit $fail
