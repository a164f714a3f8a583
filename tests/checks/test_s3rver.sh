#!/bin/sh
# test_s3rver.sh: the S3 server of the tests (tests/node/s3rver.mjs) survives what the tests
# do to it: tests/node/s3rver-selftest.mjs aborts 200 multipart uploads while their parts
# still arrive and checks the server still answers and the uploads are gone. Run by
# tests/run.sh.
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$root" || exit 1
if [ ! -d tests/node/node_modules/s3rver ]; then
	echo "FAIL s3rver is not installed in tests/node (deploy/install-deps.sh runs npm ci there)"
	exit 1
fi
node tests/node/s3rver-selftest.mjs
