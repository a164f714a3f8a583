#!/bin/sh
# install-deps.sh: the one place that installs what radpipe needs to build, test and run.
# Debian packages (apt-get update at most once), Node.js/npm only when missing, and the
# npm packages the tests use into tests/node (from its committed package-lock.json).
# Safe to run repeatedly: when everything is present it does nothing and returns quickly.
#   deploy/install-deps.sh          build, test and run
#   deploy/install-deps.sh bench    also the peers `make bench` measures against
#   deploy/install-deps.sh models   also what tests/models/gen_models.py needs (`make models`)
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)

base="build-essential pkg-config libcivetweb-dev librdkafka-dev libpq-dev libcjson-dev
libgdcm-dev libgdcm-tools libcurl4-openssl-dev libssl-dev libnifti2-dev zlib1g-dev libpng-dev
libcmocka-dev libexpat1-dev libarchive-dev postgresql kcat dcmtk dcm2niix dicom3tools awscli docker-compose clang libclang-rt-14-dev
clang-tidy cppcheck procps curl ca-certificates python3-skimage python3-numpy python3-scipy python3-yaml
libprotobuf-c-dev protobuf-c-compiler libonnx-dev libdnnl-dev"
bench="orthanc orthanc-dicomweb python3-pydicom wrk hyperfine"
models="python3-torch python3-onnx"

want=$base
[ "${1:-}" = bench ] && want="$base $bench $models"
[ "${1:-}" = models ] && want="$base $models"

missing=""
for p in $want; do
	st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	case "$st" in
	*" installed") ;;
	*) missing="$missing $p" ;;
	esac
done
if ! command -v node >/dev/null 2>&1; then missing="$missing nodejs"; fi
if ! command -v npm >/dev/null 2>&1; then missing="$missing npm"; fi

if [ -n "$missing" ]; then
	sudo=""
	if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
	echo "install-deps: installing:$missing" >&2
	$sudo apt-get update -qq
	# shellcheck disable=SC2086
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >&2
fi

# npm packages for the tests (s3rver, ajv, ...), pinned by the committed lock file.
if [ -f "$here/tests/node/package-lock.json" ]; then
	stamp="$here/tests/node/node_modules/.radpipe-lock"
	if ! cmp -s "$here/tests/node/package-lock.json" "$stamp" 2>/dev/null; then
		echo "install-deps: npm ci in tests/node" >&2
		(cd "$here/tests/node" && npm ci --no-audit --no-fund --loglevel=error >&2)
		cp "$here/tests/node/package-lock.json" "$stamp"
	fi
fi
exit 0
