#!/bin/sh
# bench_ingest.sh BUILD TMP: radpipe's ingest rate against pydicom's header parsing and
# Orthanc's REST ingest, on the same generated CT instances in the same run (issue 3).
#  - ours: radpipe.instance.stored events for objects already in the file:// store, published
#    at once (tests/bench/ingest_feed), until every instance row is committed in PostgreSQL
#    (the dicom-indexer with its defaults; the stack runs only PostgreSQL, the dev broker and
#    the indexer). Also the HTTP way in: POST /api/v1/instances from 2 keep-alive clients
#    until every row is committed (gateway, outbox, Kafka, indexer).
#  - pydicom: dcmread(stop_before_pixels=True) of every file, 1 process and 2 processes.
#  - Orthanc: POST /instances of every file from 2 keep-alive clients (tests/bench/post_load).
# Instances: tests/bench/gen_ct from the real CT slices of the shared corpus (or tests/data).
# BENCH_INGEST_STUDIES (20) studies of 100 instances per round. BENCH_INGEST_ROUNDS (2) rounds,
# each on its own new instances (the same files for all three), radpipe, pydicom, Orthanc in
# odd rounds and the reverse order in even ones, so that the machine's drift favours none; the
# best round of each counts, every round is printed. Both servers run throughout (each idle
# while the other is timed). Everything runs in a private folder on free ports and is stopped
# on exit (tests/bench/lib.sh).
set -eu
build=${1:-build/release}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
bench_trap

studies=${BENCH_INGEST_STUDIES:-20}
per=100
n=$((studies * per))
rounds=${BENCH_INGEST_ROUNDS:-2}
samples=${RADPIPE_SAMPLES_DIR:-$root/../shared/dicom-samples}
if [ -d "$samples/series/ct-philips-head-phantom" ]; then
	templates=$(find "$samples/series/ct-philips-head-phantom" -type f | sort)
	tlabel="the $(echo "$templates" | wc -l) slices of ct-philips-head-phantom"
else
	templates=tests/data/ct/philips-head-phantom-I100
	tlabel="tests/data/ct/philips-head-phantom-I100"
fi
for b in bin/radpipe-stack bin/dicom-indexer bin/api-gateway bench/gen_ct bench/ingest_feed \
	bench/post_load; do
	[ -x "$build/$b" ] || bench_die "$build/$b is missing (make MODE=... all and the bench binaries)"
done
command -v /usr/sbin/Orthanc >/dev/null || bench_die "Orthanc is missing (deploy/install-deps.sh bench)"
$BENCH_PY -c 'import pydicom' 2>/dev/null || bench_die "pydicom is missing (deploy/install-deps.sh bench)"

echo "== ingest: $n generated CT instances ($studies studies x $per, from $tlabel):" \
	"radpipe event to committed row vs pydicom header parsing vs Orthanc REST"
bench_workdir
# shellcheck disable=SC2046
set -- $(bench_ports 3)
pg_port=$1 http_port=$2 orthanc_port=$3
var=$BENCH_WORK/var

# the stack: PostgreSQL, the dev broker, the indexer and the gateway; no study completes
# during the run (no completion work, no jobs)
RADPIPE_PG_PORT=$pg_port RADPIPE_HTTP_LISTEN=127.0.0.1:$http_port \
	RADPIPE_ADMIN_PORT_BASE=$(bench_ports 1) RADPIPE_STUDY_QUIET_SECONDS=86400 \
	RADPIPE_LOG_LEVEL=warn \
	bench_stack_start "$build" "$var" dicom-indexer,api-gateway
store=$var/objects
token=$(cat "$RADPIPE_ADMIN_TOKEN_FILE")

# the instances: set A<k> of round k goes in as events (and the same files into Orthanc and
# through pydicom), set B through the gateway; W: one instance to warm each path up, not counted
seed=$(date +%s)
for k in $(seq 1 "$rounds"); do
	# shellcheck disable=SC2086
	"$build/bench/gen_ct" --seed "${seed}1$k" --first-study $((k * 100000)) --studies "$studies" \
		--instances $per --out "$store" --manifest "$BENCH_WORK/a$k.tsv" $templates
done
# shellcheck disable=SC2086
"$build/bench/gen_ct" --seed "${seed}2" --studies "$studies" --instances $per \
	--out "$BENCH_WORK/rest" --manifest "$BENCH_WORK/b.tsv" $templates
for s in 3 4 5; do
	# shellcheck disable=SC2046
	"$build/bench/gen_ct" --seed "${seed}$s" --first-study 9000000 \
		--out "$([ $s = 3 ] && echo "$store" || echo "$BENCH_WORK/rest")" \
		--manifest "$BENCH_WORK/w$s.tsv" $(echo "$templates" | head -1)
done
size=$(head -1 "$BENCH_WORK/a1.tsv" | cut -f6)

feed="$build/bench/ingest_feed"
load="$build/bench/post_load"
res=$BENCH_WORK/out.txt
field() { grep -o "$2=[0-9.]*" "$1" | tail -1 | cut -d= -f2; }
cpu_since() { echo "$(bench_cpu "$1") $2" | awk '{ printf "%.2f", $1 - $2 }'; }

# pydicom on the round's files, 1 and 2 processes
cat >"$BENCH_WORK/pyd.py" <<'PY'
import sys, time
from multiprocessing import Pool
import pydicom
def parse(paths):
    for p in paths:
        pydicom.dcmread(p, stop_before_pixels=True)
    return len(paths)
files = [l.strip() for l in open(sys.argv[1]) if l.strip()]
procs = int(sys.argv[2])
chunks = [files[k::procs] for k in range(procs)]
if procs == 1:
    t0 = time.perf_counter()
    n = parse(files)
else:
    with Pool(procs) as pool:
        pool.map(parse, [c[:1] for c in chunks])  # start the workers first
        t0 = time.perf_counter()
        n = sum(pool.map(parse, chunks))
print("rate=%.1f" % (n / (time.perf_counter() - t0)))
PY

# warm-ups: the consumer group is joined and the connections warm before any clock runs
bench_run "$res" "$feed" events "$RADPIPE_KAFKA_BROKERS" "$RADPIPE_DATABASE_URL" \
	"$RADPIPE_STORE_URL" "$BENCH_WORK/w3.tsv" || bench_die "the warm-up instance was not indexed"
bench_run "$res" "$feed" run "$RADPIPE_DATABASE_URL" 1 "$load" -c 2 \
	-H "Authorization: Bearer $token" "$RADPIPE_HTTP_URL/api/v1/instances" "$BENCH_WORK/w4.tsv" ||
	bench_die "the warm-up instance sent to the gateway was not indexed"
pg_pid=$(bench_stack_child postgres)
idx_pid=$(bench_stack_child dicom-indexer)
gw_pid=$(bench_stack_child api-gateway)
bench_orthanc_start "$BENCH_WORK/orthanc" "$orthanc_port" bench bench
orth_pid=$BENCH_ORTHANC_PID
bench_run "$res" "$load" -c 1 -u bench:bench "http://127.0.0.1:$orthanc_port/instances" \
	"$BENCH_WORK/w5.tsv" || bench_die "Orthanc refused the warm-up instance"

# the rounds: radpipe (events), pydicom, Orthanc in odd rounds, the reverse in even ones
ours="" pyd1="" pyd2="" orthanc="" ours_all="" pyd_all="" orth_all=""
for k in $(seq 1 "$rounds"); do
	order="ours pydicom orthanc"
	[ $((k % 2)) -eq 0 ] && order="orthanc pydicom ours"
	cut -f1 "$BENCH_WORK/a$k.tsv" >"$BENCH_WORK/files.txt"
	for who in $order; do
		case $who in
		ours)
			c0=$(bench_cpu "$idx_pid") p0=$(bench_cpu "$pg_pid")
			bench_run "$res" "$feed" events "$RADPIPE_KAFKA_BROKERS" "$RADPIPE_DATABASE_URL" \
				"$RADPIPE_STORE_URL" "$BENCH_WORK/a$k.tsv" ||
				bench_die "radpipe did not index the instances"
			r=$(field "$res" rate) ours_all="$ours_all $r"
			if bench_better "$ours" "$r"; then
				ours=$r ours_ms=$(field "$res" indexed_ms)
				c_idx=$(cpu_since "$idx_pid" "$c0") c_pg=$(cpu_since "$pg_pid" "$p0")
			fi
			;;
		pydicom)
			bench_run "$res" $BENCH_PY "$BENCH_WORK/pyd.py" "$BENCH_WORK/files.txt" 1 ||
				bench_die "pydicom failed"
			r=$(field "$res" rate) pyd_all="$pyd_all $r"
			bench_better "$pyd1" "$r" && pyd1=$r
			bench_run "$res" $BENCH_PY "$BENCH_WORK/pyd.py" "$BENCH_WORK/files.txt" 2 ||
				bench_die "pydicom failed"
			r=$(field "$res" rate)
			bench_better "$pyd2" "$r" && pyd2=$r
			;;
		orthanc)
			c0=$(bench_cpu "$orth_pid")
			bench_run "$res" "$load" -c 2 -u bench:bench \
				"http://127.0.0.1:$orthanc_port/instances" "$BENCH_WORK/a$k.tsv" ||
				bench_die "Orthanc refused instances: $(cat "$res")"
			r=$(field "$res" files_per_s) orth_all="$orth_all $r"
			bench_better "$orthanc" "$r" && orthanc=$r c_or=$(cpu_since "$orth_pid" "$c0")
			;;
		esac
	done
done
stored=$(curl -fsS -u bench:bench "http://127.0.0.1:$orthanc_port/statistics" | tr -d ' \n' |
	sed 's/.*"CountInstances":\([0-9]*\).*/\1/')
[ "$stored" -eq $((rounds * n + 1)) ] ||
	bench_die "Orthanc holds $stored instances, expected $((rounds * n + 1))"
bench_orthanc_stop

# ours, HTTP: POST /api/v1/instances, 2 keep-alive clients, until every row is committed
c_gw=$(bench_cpu "$gw_pid")
bench_run "$res" "$feed" run "$RADPIPE_DATABASE_URL" "$n" "$load" -c 2 \
	-H "Authorization: Bearer $token" "$RADPIPE_HTTP_URL/api/v1/instances" "$BENCH_WORK/b.tsv" ||
	bench_die "instances sent to the gateway were not indexed"
c_gw=$(cpu_since "$gw_pid" "$c_gw")
accepted=$(field "$res" files_per_s)
ours_rest=$(field "$res" rate)
bench_stack_stop

echo "   data:      $n instances of $size bytes per round (512x512 16-bit CT, explicit VR little" \
	"endian), the same files for all three; best of $rounds alternating rounds"
echo "   ours:      $ours instances/s  event published -> row committed: $n instance.stored events" \
	"for objects already in the store, all in ${ours_ms} ms; indexer defaults (SHA-256 of" \
	"every object verified, header + DICOM JSON, batch upserts); CPU indexer ${c_idx} s," \
	"PostgreSQL ${c_pg} s; rounds:$ours_all"
echo "   ours HTTP: $ours_rest instances/s  POST /api/v1/instances, 2 keep-alive clients ->" \
	"rows committed (gateway accepted $accepted/s; gateway CPU ${c_gw} s)"
echo "   pydicom:   $pyd1 files/s  dcmread(stop_before_pixels=True), 1 process" \
	"(2 processes: $pyd2 files/s); parsing only, nothing stored; rounds:$pyd_all"
echo "   Orthanc:   $orthanc instances/s  POST /instances, 2 keep-alive clients, default" \
	"settings (SQLite index, files on disk, MD5 kept); CPU ${c_or} s; rounds:$orth_all"
echo "   ratio:     ours/Orthanc $(bench_ratio "$ours" "$orthanc") ($(bench_verdict "$ours" "$orthanc" 5))," \
	"ours/pydicom $(bench_ratio "$ours" "$pyd1") ($(bench_verdict "$ours" "$pyd1" 20));" \
	"ours/pydicom x2 $(bench_ratio "$ours" "$pyd2"); ours HTTP/Orthanc $(bench_ratio "$ours_rest" "$orthanc")"
