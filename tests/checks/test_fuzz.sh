#!/bin/sh
# test_fuzz.sh: the libFuzzer targets under ASan+UBSan, run by `make test` (which builds them
# with MODE=fuzz first): the DICOM header parser for 60 s (seeded with the malformed corpus
# and the other samples), the multipart, QIDO query and ONNX parsers for 20 s each. A crash, leak,
# timeout or sanitizer report fails the check. FUZZ_TEST_SECONDS scales the default.
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
dir="$root/build/fuzz/fuzz"
if ! ls "$dir"/fuzz_* >/dev/null 2>&1; then
	echo "FAIL no fuzz targets in $dir (make test builds them with MODE=fuzz)"
	exit 1
fi
s=${FUZZ_TEST_SECONDS:-20}
exec sh "$root/tests/fuzz/run.sh" "$dir" "$s" "fuzz_dicom_header=$((s * 3))"
