#!/bin/sh
# bench_dicomweb.sh BUILD TMP: DICOMweb QIDO-RS and STOW-RS of radpipe's api-gateway against
# Orthanc's DICOMweb plugin, on the same data in the same run (issue 4).
#  - the index: BENCH_DICOMWEB_STUDIES (10,000) generated CT studies, one instance each (the
#    real CT slice's header, pixels cut to 64x64 to keep the load short), 4 studies per
#    patient, varied PatientID, PatientName, StudyDate, AccessionNumber. radpipe gets them
#    through the real indexer (instance.stored events for the objects in its store), Orthanc
#    through its REST API (POST /instances, 4 keep-alive clients).
#  - QIDO-RS: wrk, 2 threads, 8 keep-alive connections, 10 s per server: a study search by
#    PatientID (a random patient per request); and OHIF's study list query (limit=101,
#    offset=0, fuzzymatching=false, includefield=00081030,00080060) from 1 connection, for
#    10 s or 3 answers (at most 60 s).
#  - STOW-RS: BENCH_DICOMWEB_STOW (600) full-size CT instances per round, 10 per request, 2
#    keep-alive clients (tests/bench/post_load); radpipe timed until every instance is indexed
#    (its 200 comes once stored, before indexing), Orthanc until its last answer (it indexes
#    first). BENCH_DICOMWEB_STOW_ROUNDS (3) rounds, each on new instances (the same for both),
#    in alternating order (who goes first changes each round: page cache, file system and
#    background noise favour neither); the best round of each counts, all rounds are printed.
# radpipe: Bearer token (VAR/admin-token); Orthanc: HTTP basic authentication on, everything
# else at its defaults. Private folder, free ports, everything stopped on exit (lib.sh).
set -eu
build=${1:-build/release}
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh
bench_trap

studies=${BENCH_DICOMWEB_STUDIES:-10000}
per_patient=4
patients=$(((studies + per_patient - 1) / per_patient))
stow_n=${BENCH_DICOMWEB_STOW:-600}
stow_rounds=${BENCH_DICOMWEB_STOW_ROUNDS:-3}
secs=${BENCH_DICOMWEB_SECONDS:-10}
samples=${RADPIPE_SAMPLES_DIR:-$root/../shared/dicom-samples}
if [ -d "$samples/series/ct-philips-head-phantom" ]; then
	templates=$(find "$samples/series/ct-philips-head-phantom" -type f | sort)
else
	templates=tests/data/ct/philips-head-phantom-I100
fi
first=$(echo "$templates" | head -1)
for b in bin/radpipe-stack bin/dicom-indexer bin/api-gateway bench/gen_ct bench/ingest_feed \
	bench/post_load; do
	[ -x "$build/$b" ] || bench_die "$build/$b is missing (make MODE=... all and the bench binaries)"
done
for t in /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so; do
	[ -e "$t" ] || bench_die "$t is missing (deploy/install-deps.sh bench)"
done
command -v wrk >/dev/null || bench_die "wrk is missing (deploy/install-deps.sh bench)"

echo "== DICOMweb with $studies indexed studies: QIDO-RS requests/s (wrk) and STOW-RS" \
	"instances/s, radpipe api-gateway vs Orthanc + DICOMweb plugin"
bench_workdir
# shellcheck disable=SC2046
set -- $(bench_ports 3)
pg_port=$1 http_port=$2 orthanc_port=$3
var=$BENCH_WORK/var
RADPIPE_PG_PORT=$pg_port RADPIPE_HTTP_LISTEN=127.0.0.1:$http_port \
	RADPIPE_ADMIN_PORT_BASE=$(bench_ports 1) RADPIPE_STUDY_QUIET_SECONDS=86400 \
	RADPIPE_LOG_LEVEL=warn \
	bench_stack_start "$build" "$var" dicom-indexer,api-gateway
token=$(cat "$RADPIPE_ADMIN_TOKEN_FILE")
ours_base=$RADPIPE_HTTP_URL
peer_base=http://127.0.0.1:$orthanc_port
ours_url=$ours_base/dicomweb
peer_url=$peer_base/dicom-web
basic=$(printf 'bench:bench' | base64)

# the data: the index corpus straight into radpipe's store, the STOW instances elsewhere
seed=$(date +%s)
t0=$(date +%s)
"$build/bench/gen_ct" --seed "${seed}1" --studies "$studies" --per-patient $per_patient --thumb \
	--out "$var/objects" --manifest "$BENCH_WORK/index.tsv" "$first"
# shellcheck disable=SC2086
"$build/bench/gen_ct" --seed "${seed}2" --first-study 8000000 \
	--studies $(((stow_n * stow_rounds + 99) / 100)) --instances 100 --out "$BENCH_WORK/stow" \
	--manifest "$BENCH_WORK/stow-all.tsv" $templates
for k in $(seq 1 "$stow_rounds"); do # round k: its own instances, the same for both servers
	sed -n "$(((k - 1) * stow_n + 1)),$((k * stow_n))p" "$BENCH_WORK/stow-all.tsv" \
		>"$BENCH_WORK/stow$k.tsv"
done
"$build/bench/gen_ct" --seed "${seed}3" --first-study 8500000 --studies 2 --instances 10 \
	--out "$BENCH_WORK/stow" --manifest "$BENCH_WORK/warm.tsv" "$first"
"$build/bench/gen_ct" --seed "${seed}4" --first-study 9000000 --thumb --out "$var/objects" \
	--manifest "$BENCH_WORK/warm-index.tsv" "$first"
head -n 10 "$BENCH_WORK/warm.tsv" >"$BENCH_WORK/warm-ours.tsv"
tail -n 10 "$BENCH_WORK/warm.tsv" >"$BENCH_WORK/warm-peer.tsv"

# loading: radpipe through the indexer, Orthanc through its REST API
res=$BENCH_WORK/out.txt
field() { grep -o "$2=[0-9.]*" "$1" | tail -1 | cut -d= -f2; }
# (one more study first, to both, so the consumer group is joined before the clock runs)
bench_run "$res" "$build/bench/ingest_feed" events "$RADPIPE_KAFKA_BROKERS" \
	"$RADPIPE_DATABASE_URL" "$RADPIPE_STORE_URL" "$BENCH_WORK/warm-index.tsv" ||
	bench_die "radpipe did not index the warm-up study"
bench_run "$res" "$build/bench/ingest_feed" events "$RADPIPE_KAFKA_BROKERS" \
	"$RADPIPE_DATABASE_URL" "$RADPIPE_STORE_URL" "$BENCH_WORK/index.tsv" ||
	bench_die "radpipe did not index the studies"
load_ours=$(field "$res" rate)
bench_orthanc_start "$BENCH_WORK/orthanc" "$orthanc_port" bench bench
bench_run "$res" "$build/bench/post_load" -c 1 -u bench:bench \
	"http://127.0.0.1:$orthanc_port/instances" "$BENCH_WORK/warm-index.tsv" ||
	bench_die "Orthanc refused the warm-up study: $(cat "$res")"
bench_run "$res" "$build/bench/post_load" -c 4 -u bench:bench \
	"http://127.0.0.1:$orthanc_port/instances" "$BENCH_WORK/index.tsv" ||
	bench_die "Orthanc refused studies: $(cat "$res")"
load_peer=$(field "$res" files_per_s)
echo "   data:    $studies studies (+1 warm-up; 1 CT instance each, 64x64 pixels, $patients patients), loaded" \
	"in $(($(date +%s) - t0)) s: radpipe indexer $load_ours/s (events), Orthanc $load_peer/s" \
	"(POST /instances, 4 clients)"

# the same answer from both, or the comparison means nothing
count() { # URL AUTH: "<number of results> <seconds>"
	curl -fsS -o "$BENCH_WORK/answer.json" -w '%{time_total}' -H "Authorization: $2" \
		-H 'Accept: application/dicom+json' "$1" >"$BENCH_WORK/time.txt" || return 1
	echo "$($BENCH_PY -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' \
		"$BENCH_WORK/answer.json") $(cat "$BENCH_WORK/time.txt")"
}
pid=$(printf 'RPB%07d' $((patients / 2)))
a=$(count "$ours_url/studies?PatientID=$pid" "Bearer $token") || bench_die "radpipe QIDO-RS failed"
b=$(count "$peer_url/studies?PatientID=$pid" "Basic $basic") || bench_die "Orthanc QIDO-RS failed"
if [ "${a% *}" != "${b% *}" ] || [ "${a% *}" -lt 1 ]; then
	bench_die "PatientID=$pid: radpipe found ${a% *} studies, Orthanc ${b% *}"
fi
ohif='limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060'
a=$(count "$ours_url/studies?$ohif" "Bearer $token") || bench_die "radpipe QIDO-RS failed"
b=$(count "$peer_url/studies?$ohif" "Basic $basic") || bench_die "Orthanc QIDO-RS failed"
[ "${a% *}" = "${b% *}" ] || bench_die "OHIF study list: radpipe answered ${a% *} studies, Orthanc ${b% *}"
# one browser waiting for its list: 1 connection, long enough for 3 answers (at most 60 s)
dur() { echo "$1 $secs" | awk '{ d = 3 * $1 + 1; if (d < $2) d = $2; if (d > 60) d = 60;
	printf "%d", d }'; }
ohif_ours_s=$(dur "${a#* }")
ohif_peer_s=$(dur "${b#* }")

# QIDO-RS with wrk: a Lua script picks a random patient per request
cat >"$BENCH_WORK/qido.lua" <<'EOF'
local base = os.getenv("QIDO_PATH")
local patients = tonumber(os.getenv("QIDO_PATIENTS") or "0")
request = function()
	if patients > 0 then
		return wrk.format(nil, base .. string.format("RPB%07d", math.random(0, patients - 1)))
	end
	return wrk.format(nil, base)
end
done = function(summary, latency, requests)
	io.write(string.format("rps=%.1f p50_ms=%.2f p99_ms=%.2f errors=%d\n",
		summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
		latency:percentile(99) / 1000,
		summary.errors.connect + summary.errors.read + summary.errors.write +
		summary.errors.status + summary.errors.timeout))
end
EOF
qido() { # OUT BASE PATH PATIENTS AUTH [CONNECTIONS SECONDS]: OUT gets "rps=... p50_ms=...
	# p99_ms=... errors=..."
	export QIDO_PATH="$3" QIDO_PATIENTS="$4"
	bench_run "$BENCH_WORK/wrk.txt" wrk -t"$(((${6:-8} + 3) / 4))" \
		-c"${6:-8}" -d"${7:-$secs}s" --timeout 120s -s "$BENCH_WORK/qido.lua" \
		-H "Authorization: $5" -H 'Accept: application/dicom+json' "$2" ||
		bench_die "wrk failed on $2$3"
	grep '^rps=' "$BENCH_WORK/wrk.txt" >"$1" || bench_die "wrk printed no summary for $2$3"
	grep -q 'errors=0$' "$1" || bench_die "errors in the wrk run on $2$3: $(cat "$1")"
}
qido "$BENCH_WORK/o1" "$ours_base" "/dicomweb/studies?PatientID=" "$patients" "Bearer $token"
qido "$BENCH_WORK/p1" "$peer_base" "/dicom-web/studies?PatientID=" "$patients" "Basic $basic"
qido "$BENCH_WORK/o2" "$ours_base" "/dicomweb/studies?$ohif" 0 "Bearer $token" 1 "$ohif_ours_s"
qido "$BENCH_WORK/p2" "$peer_base" "/dicom-web/studies?$ohif" 0 "Basic $basic" 1 "$ohif_peer_s"
o1=$BENCH_WORK/o1 p1=$BENCH_WORK/p1 o2=$BENCH_WORK/o2 p2=$BENCH_WORK/p2

# STOW-RS: 10 instances per request, 2 clients; radpipe until indexed
stow_ours() { # N MANIFEST
	bench_run "$res" "$build/bench/ingest_feed" run "$RADPIPE_DATABASE_URL" "$1" \
		"$build/bench/post_load" -c 2 --stow 10 -H "Authorization: Bearer $token" \
		"$ours_url/studies" "$2"
}
stow_peer() { # MANIFEST
	bench_run "$res" "$build/bench/post_load" -c 2 --stow 10 -u bench:bench "$peer_url/studies" "$1"
}
stow_ours 10 "$BENCH_WORK/warm-ours.tsv" || bench_die "radpipe STOW-RS warm-up failed"
stow_peer "$BENCH_WORK/warm-peer.tsv" || bench_die "Orthanc STOW-RS warm-up failed: $(cat "$res")"
so="" so_acc="" sp="" so_all="" sp_all=""
for k in $(seq 1 "$stow_rounds"); do
	order="ours peer"
	[ $((k % 2)) -eq 0 ] && order="peer ours"
	for who in $order; do
		if [ "$who" = ours ]; then
			stow_ours "$stow_n" "$BENCH_WORK/stow$k.tsv" || bench_die "radpipe STOW-RS failed"
			r=$(field "$res" rate) so_all="$so_all $r"
			bench_better "$so" "$r" && so=$r so_acc=$(field "$res" files_per_s)
		else
			stow_peer "$BENCH_WORK/stow$k.tsv" || bench_die "Orthanc STOW-RS failed: $(cat "$res")"
			r=$(field "$res" files_per_s) sp_all="$sp_all $r"
			bench_better "$sp" "$r" && sp=$r
		fi
	done
done

size=$(head -1 "$BENCH_WORK/stow1.tsv" | cut -f6)
echo "   QIDO-RS PatientID=<random of $patients> (studies, ~$per_patient results), wrk 2 threads," \
	"8 connections, ${secs} s:"
echo "     ours:    $(field "$o1" rps) requests/s (p50 $(field "$o1" p50_ms) ms," \
	"p99 $(field "$o1" p99_ms) ms; Bearer token checked per request)"
echo "     Orthanc: $(field "$p1" rps) requests/s (p50 $(field "$p1" p50_ms) ms," \
	"p99 $(field "$p1" p99_ms) ms; basic auth)"
echo "     ratio:   $(bench_ratio "$(field "$o1" rps)" "$(field "$p1" rps)")" \
	"($(bench_verdict "$(field "$o1" rps)" "$(field "$p1" rps)" 3))"
echo "   QIDO-RS OHIF study list ($ohif), wrk 1 connection (one viewer waiting for its list):"
echo "     ours:    $(field "$o2" rps) requests/s (p50 $(field "$o2" p50_ms) ms," \
	"p99 $(field "$o2" p99_ms) ms)"
echo "     Orthanc: $(field "$p2" rps) requests/s (p50 $(field "$p2" p50_ms) ms," \
	"p99 $(field "$p2" p99_ms) ms)"
echo "     ratio:   $(bench_ratio "$(field "$o2" rps)" "$(field "$p2" rps)")" \
	"($(bench_verdict "$(field "$o2" rps)" "$(field "$p2" rps)" 3))"
echo "   STOW-RS $stow_n CT instances of $size bytes per round, 10 per request, 2 keep-alive" \
	"clients, best of $stow_rounds alternating rounds:"
echo "     ours:    $so instances/s stored and indexed (first request -> last row committed;" \
	"200 answers at $so_acc/s; rounds:$so_all)"
echo "     Orthanc: $sp instances/s stored and indexed (first request -> last answer;" \
	"rounds:$sp_all)"
echo "     ratio:   $(bench_ratio "$so" "$sp") ($(bench_verdict "$so" "$sp" 3))"
