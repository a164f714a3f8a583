#!/bin/sh
# test_params_schema.sh: the job-parameter schemas of proto/params compile under ajv's strict
# mode (so the schema itself is valid JSON Schema 2020-12) and give the expected verdict on
# the shared cases in tests/data/params, the same cases the gpu-segmenter's C validator is
# tested on (tests/unit/services/gpu-segmenter/test_seg_params.c). Run by tests/run.sh.
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$root" || exit 1
if [ ! -d tests/node/node_modules/ajv ]; then
	echo "FAIL ajv is not installed in tests/node (deploy/install-deps.sh runs npm ci there)"
	exit 1
fi
node tests/node/validate-params.mjs proto/params/segment.schema.json \
	tests/data/params/segment-cases.json
