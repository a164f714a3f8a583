#!/bin/sh
# tests/bench/bench_upload.sh BUILD TMP: archiving to S3, the storage-uploader's job code
# (BUILD/bench/bench_upload: upl_job, instance layout) against `aws s3 cp` (Debian awscli,
# its default settings), on the same s3rver endpoint (npm, loopback, one data directory for
# both) and the same files: 2,000 CT instances made from a real slice (`aws s3 cp
# --recursive` of the study's folder) and one 1 GiB file (a single object through multipart
# for both). A private PostgreSQL comes from `radpipe-stack --no-services`. Each tool runs
# BENCH_UPLOAD_ROUNDS (2) times per data set in alternating order to fresh prefixes; the best
# round counts. Both are timed the same way: the wall time of the whole command. The folder
# (s3rver's data too) comes from lib.sh's bench_mkwork: under $TMPDIR, else /var/tmp, in a
# block group of its own (tests/bench/README.md, "File creation").
# Knobs: BENCH_UPLOAD_INSTANCES (2000), BENCH_UPLOAD_BIG_MIB (1024), BENCH_UPLOAD_ROUNDS (2).
set -eu
build=$1
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
n=${BENCH_UPLOAD_INSTANCES:-2000}
big_mib=${BENCH_UPLOAD_BIG_MIB:-1024}
rounds=${BENCH_UPLOAD_ROUNDS:-2}
samples=${RADPIPE_SAMPLES_DIR:-$root/../shared/dicom-samples}
template=$samples/series/ct-philips-head-phantom/I10
[ -f "$template" ] || template=$(ls tests/data/series/mr-4slice/jpeg-lossless-sv1/* | head -n 1)

echo "== upload to S3 (s3rver on loopback): storage-uploader job vs aws s3 cp, same endpoint and files"
for tool in node aws "$build/bench/bench_upload" "$build/bin/radpipe-stack"; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "   skipped: $tool is missing"
		exit 1
	fi
done

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
work=$(bench_mkwork) || { echo "   FAILED: could not make a work folder" >&2; exit 1; }
stack_pid=""
s3_pid=""
cleanup() {
	[ -n "$s3_pid" ] && kill "$s3_pid" 2>/dev/null && wait "$s3_pid" 2>/dev/null
	if [ -n "$stack_pid" ]; then
		kill "$stack_pid" 2>/dev/null
		wait "$stack_pid" 2>/dev/null
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
	node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
now_ms() { date +%s%3N; }
fail() {
	echo "   FAILED: $1"
	for f in "$work/stack.log" "$work/s3rver.out" "$work/out.txt"; do
		if [ -s "$f" ]; then tail -n 20 "$f" | sed 's/^/   | /'; fi
	done
	exit 1
}

RADPIPE_PG_PORT=$(free_port) RADPIPE_HTTP_LISTEN=127.0.0.1:$(free_port) \
	RADPIPE_ADMIN_PORT_BASE=$(free_port) RADPIPE_LOG_LEVEL=warn \
	"$build/bin/radpipe-stack" --no-services --var "$work/stack" >"$work/stack.log" 2>&1 &
stack_pid=$!
node --openssl-legacy-provider tests/node/s3rver.mjs --dir "$work/s3" --port 0 --buckets bench \
	>"$work/s3rver.out" 2>&1 &
s3_pid=$!
i=0
while [ ! -s "$work/stack/run/stack.env" ] || ! grep -q '^listening ' "$work/s3rver.out"; do
	i=$((i + 1))
	[ $i -lt 1200 ] || fail "the stack or s3rver did not start within 120 s"
	kill -0 "$stack_pid" 2>/dev/null || fail "radpipe-stack exited"
	kill -0 "$s3_pid" 2>/dev/null || fail "s3rver exited"
	sleep 0.1
done
s3_port=$(sed -n 's/^listening //p' "$work/s3rver.out")
RADPIPE_DATABASE_URL=$(sed -n 's/^RADPIPE_DATABASE_URL=//p' "$work/stack/run/stack.env")
export RADPIPE_DATABASE_URL RADPIPE_STORE_URL="file://$work/objects" RADPIPE_ARCHIVE_URL=s3://bench \
	RADPIPE_S3_ENDPOINT="http://127.0.0.1:$s3_port" RADPIPE_S3_ACCESS_KEY=S3RVER \
	RADPIPE_S3_SECRET_KEY=S3RVER RADPIPE_S3_REGION=us-east-1
mkdir -p "$work/objects"

"$build/bench/bench_upload" gen "$template" "$n" "$big_mib" >"$work/out.txt" 2>&1 ||
	fail "could not generate the data"
gen=$(cat "$work/out.txt")
val() { echo "$gen" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
study=$(val instances_study)
big_study=$(val big_study)
inst_bytes=$(val instances_bytes)
big_bytes=$(val big_bytes)
inst_dir="$work/objects/instances/$study"
big_file=$(find "$work/objects/instances/$big_study" -type f)

aws_cp() { # args...
	AWS_ACCESS_KEY_ID=S3RVER AWS_SECRET_ACCESS_KEY=S3RVER AWS_DEFAULT_REGION=us-east-1 \
		AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
		aws --endpoint-url "$RADPIPE_S3_ENDPOINT" s3 cp --only-show-errors "$@" >"$work/out.txt" 2>&1
}
count_objects() { # prefix: objects and bytes under s3://bench/<prefix>/ (read from s3rver's folder)
	find "$work/s3/bench/$1" -type f -name '*._S3rver_object' -printf '%s\n' |
		awk '{n++; b+=$1} END {printf "%d %d", n, b}'
}

# one timed run: kind (inst|big), tool (ours|aws), round; sets ms
timed() {
	prefix="$2$3-$1"
	t0=$(now_ms)
	if [ "$2" = ours ]; then
		s=$study
		[ "$1" = big ] && s=$big_study
		"$build/bench/bench_upload" run "$s" "s3://bench/$prefix" >"$work/out.txt" 2>&1 ||
			fail "storage-uploader job ($1, round $3)"
	elif [ "$1" = inst ]; then
		aws_cp --recursive "$inst_dir" "s3://bench/$prefix/" || fail "aws s3 cp --recursive (round $3)"
	else
		aws_cp "$big_file" "s3://bench/$prefix/big.dcm" || fail "aws s3 cp (1 GiB, round $3)"
	fi
	t1=$(now_ms)
	# both sent everything: n objects (ours adds its manifest) of the same total size
	set -- "$1" "$2" "$3" $(count_objects "$prefix")
	want_n=$n
	want_b=$inst_bytes
	if [ "$1" = big ]; then
		want_n=1
		want_b=$big_bytes
	fi
	if [ "$2" = ours ]; then
		want_n=$((want_n + 1))
		man=$(find "$work/s3/bench/$prefix" -name '*manifest*._S3rver_object' -printf '%s')
		want_b=$((want_b + man))
	fi
	[ "$4" = "$want_n" ] && [ "$5" = "$want_b" ] ||
		fail "$2 $1 round $3: the store holds $4 objects of $5 bytes, expected $want_n of $want_b"
	rm -rf "$work/s3/bench/$prefix"
	ms=$((t1 - t0))
}

best() { # current best, new
	if [ -z "$1" ] || [ "$2" -lt "$1" ]; then echo "$2"; else echo "$1"; fi
}
oi="" ai="" ob="" ab=""
r=1
while [ $r -le "$rounds" ]; do
	# alternate who goes first: page cache and s3rver warm-up favour neither
	for t in $(if [ $((r % 2)) -eq 1 ]; then echo ours aws; else echo aws ours; fi); do
		timed inst "$t" $r
		if [ "$t" = ours ]; then oi=$(best "$oi" "$ms"); else ai=$(best "$ai" "$ms"); fi
	done
	for t in $(if [ $((r % 2)) -eq 1 ]; then echo ours aws; else echo aws ours; fi); do
		timed big "$t" $r
		if [ "$t" = ours ]; then ob=$(best "$ob" "$ms"); else ab=$(best "$ab" "$ms"); fi
	done
	r=$((r + 1))
done

rate() { # bytes objects ms
	awk -v b="$1" -v o="$2" -v ms="$3" 'BEGIN {printf "%7.1f MB/s %7.1f objects/s  (%.2f s)", b / ms / 1000, o * 1000 / ms, ms / 1000}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2fx", b / a}'; }
echo "   data: $n instances of $(basename "$template") ($(awk -v b="$inst_bytes" 'BEGIN {printf "%.1f MB", b / 1e6}')), one $big_mib MiB file; best of $rounds rounds; MB = 10^6 bytes"
echo "   $n instances (one object each):"
echo "     ours:   $(rate "$inst_bytes" "$n" "$oi")"
echo "     awscli: $(rate "$inst_bytes" "$n" "$ai")"
echo "     ratio:  $(ratio "$oi" "$ai") (MB/s and objects/s alike; target 2x)"
echo "   one $big_mib MiB file (multipart):"
echo "     ours:   $(rate "$big_bytes" 1 "$ob")"
echo "     awscli: $(rate "$big_bytes" 1 "$ab")"
echo "     ratio:  $(ratio "$ob" "$ab") (target 2x)"
