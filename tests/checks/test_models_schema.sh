#!/bin/sh
# test_models_schema.sh: the model description schema (proto/models/model.schema.json)
# compiles under ajv's strict mode and gives the expected verdict on the shared cases in
# tests/data/params/model-cases.json (the same cases the gpu-segmenter's C loader is tested
# on: tests/unit/services/gpu-segmenter/test_seg_model.c), and every committed model.json
# (tests/data/models/*/model.json) is valid. Run by tests/run.sh.
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$root" || exit 1
if [ ! -d tests/node/node_modules/ajv ]; then
	echo "FAIL ajv is not installed in tests/node (deploy/install-deps.sh runs npm ci there)"
	exit 1
fi
models=$(ls tests/data/models/*/model.json 2>/dev/null)
if [ -z "$models" ]; then
	echo "FAIL no tests/data/models/*/model.json (make models writes the demo model)"
	exit 1
fi
# shellcheck disable=SC2086
node tests/node/validate-models.mjs proto/models/model.schema.json \
	tests/data/params/model-cases.json $models
