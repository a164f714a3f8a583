# tests/bench/lib.sh: what the stack benchmarks (bench_ingest.sh, bench_dicomweb.sh) share,
# sourced by them (POSIX sh): a private work folder, free ports, the radpipe stack
# (radpipe-stack --var), Orthanc with its own configuration, CPU time of a process tree, and
# one cleanup that stops everything this shell started, also on failure or Ctrl-C.
# Nothing here touches the default ports (8080, 55432, 9092, 9101-9103, 8042, 4242).

BENCH_PY=/usr/bin/python3
BENCH_STACK_PID=""
BENCH_ORTHANC_PID=""
BENCH_WORK=""
BENCH_CHILD=""

bench_die() {
	echo "   FAILED: $*" >&2
	exit 1
}

# bench_mkwork: prints a new folder of this run's own, searchable by the postgres user the
# stack runs PostgreSQL as when we are root (run.sh's mktemp folder is 0700). It is made in
# ${TMPDIR:-/var/tmp}/radpipe-bench, which is marked as a top of directory hierarchies (chattr
# +T, where the file system has the flag): ext4 then places each new folder in a block group
# picked afresh instead of next to the folders of earlier runs. A group can still hold many
# recently deleted inodes, which makes every file created there slow (tests/bench/README.md,
# "File creation"), so each candidate folder is probed with 64 empty files (left in .probe):
# the first whose files cost under 40 us each is kept; after 6 candidates, the fastest.
bench_mkwork() {
	_base=${TMPDIR:-/var/tmp}/radpipe-bench
	mkdir -p "$_base" && chmod 755 "$_base" || return 1
	chattr +T "$_base" 2>/dev/null || true
	_best="" _best_us=""
	for _try in 1 2 3 4 5 6; do
		_dir=$(mktemp -d "$_base/run.XXXXXX") || return 1
		_us=$($BENCH_PY - "$_dir" <<'PY'
import os, sys, time
d = os.path.join(sys.argv[1], ".probe")
os.mkdir(d)
t = time.perf_counter()
for i in range(64):
    os.close(os.open(os.path.join(d, str(i)), os.O_CREAT | os.O_WRONLY, 0o600))
print(int((time.perf_counter() - t) / 64 * 1e6))
PY
		) || _us=999999
		if [ -z "$_best" ] || [ "$_us" -lt "$_best_us" ]; then
			[ -n "$_best" ] && rm -rf "$_best"
			_best=$_dir _best_us=$_us
		else
			rm -rf "$_dir"
		fi
		[ "$_best_us" -lt 40 ] && break
	done
	[ "$_best_us" -lt 40 ] ||
		echo "   note: creating a file costs $_best_us us in the work folder (about 15 us on a" \
			"quiet file system); the figures below pay it" >&2
	chmod 755 "$_best" && echo "$_best"
}

# The work folder (bench_mkwork), removed by bench_trap's cleanup.
bench_workdir() {
	BENCH_WORK=$(bench_mkwork) || bench_die "could not make a work folder under ${TMPDIR:-/var/tmp}"
}

# bench_ports N: N distinct free TCP ports on 127.0.0.1; the first is followed by three more
# free ones (base+1..base+3: RADPIPE_ADMIN_PORT_BASE).
bench_ports() {
	$BENCH_PY - "$1" <<'PY'
import random, socket, sys
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
n, out = int(sys.argv[1]), []
avoid = {8080, 55432, 9092, 8042, 4242} | set(range(9100, 9104))
while len(out) < n:
    p = random.randint(20000, 60000)
    span = range(p, p + 4) if not out else range(p, p + 1)
    if any(q in avoid or q in out or not free(q) for q in span):
        continue
    out.append(p)
print(" ".join(map(str, out)))
PY
}

# bench_run OUT CMD...: CMD in the background with its stdout in OUT, waited for, so that a
# signal stops the script at once (a foreground child would delay the trap until it ends);
# the cleanup stops it. Returns CMD's status.
bench_run() {
	_out=$1
	shift
	"$@" >"$_out" &
	BENCH_CHILD=$!
	_rc=0
	wait "$BENCH_CHILD" || _rc=$?
	BENCH_CHILD=""
	return $_rc
}

# bench_wait_http URL SECONDS [CURL ARGS...]: until URL answers 2xx.
bench_wait_http() {
	_url=$1 _secs=$2
	shift 2
	_i=0
	while [ "$_i" -lt $((_secs * 10)) ]; do
		curl -fsS -o /dev/null "$@" "$_url" 2>/dev/null && return 0
		sleep 0.1
		_i=$((_i + 1))
	done
	return 1
}

# bench_stack_start BUILD VAR SERVICES: radpipe-stack in the background with the RADPIPE_*
# variables of the environment, until VAR/run/stack.env exists; then its variables are set
# here (RADPIPE_DATABASE_URL, RADPIPE_KAFKA_BROKERS, RADPIPE_STORE_URL, RADPIPE_HTTP_URL, ...).
bench_stack_start() {
	"$1/bin/radpipe-stack" --var "$2" --services "$3" >"$2.log" 2>&1 &
	BENCH_STACK_PID=$!
	_i=0
	while [ ! -f "$2/run/stack.env" ]; do
		if ! kill -0 "$BENCH_STACK_PID" 2>/dev/null || [ "$_i" -ge 1200 ]; then
			tail -20 "$2.log" >&2
			bench_die "radpipe-stack did not start (log: $2.log)"
		fi
		sleep 0.1
		_i=$((_i + 1))
	done
	set -a
	# shellcheck disable=SC1091
	. "$2/run/stack.env"
	set +a
}

bench_stack_stop() {
	[ -n "$BENCH_STACK_PID" ] || return 0
	kill -TERM "$BENCH_STACK_PID" 2>/dev/null || true
	_i=0
	while kill -0 "$BENCH_STACK_PID" 2>/dev/null && [ "$_i" -lt 600 ]; do
		sleep 0.1
		_i=$((_i + 1))
	done
	kill -KILL "$BENCH_STACK_PID" 2>/dev/null || true
	wait "$BENCH_STACK_PID" 2>/dev/null || true
	BENCH_STACK_PID=""
}

# bench_stack_child NAME: the pid of the stack's child process NAME (postgres, dicom-indexer,
# api-gateway, ...).
bench_stack_child() {
	ps --ppid "$BENCH_STACK_PID" -o pid= -o comm= | awk -v n="$1" '$2 == n { print $1; exit }'
}

# bench_orthanc_start DIR HTTP_PORT USER PASSWORD: Orthanc with its own configuration under
# DIR: SQLite index and storage in DIR, HTTP on 127.0.0.1:HTTP_PORT only with basic
# authentication, the DICOM server off, the DICOMweb plugin at /dicom-web/; everything else
# at Orthanc's defaults. Waits until the REST API answers.
bench_orthanc_start() {
	mkdir -p "$1/storage" "$1/index"
	cat >"$1/orthanc.json" <<EOF
{
  "Name": "radpipe-bench",
  "StorageDirectory": "$1/storage",
  "IndexDirectory": "$1/index",
  "HttpPort": $2,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": true,
  "RegisteredUsers": { "$3": "$4" },
  "DicomServerEnabled": false,
  "OrthancExplorerEnabled": false,
  "WebDavEnabled": false,
  "Plugins": [ "/usr/share/orthanc/plugins/libOrthancDicomWeb.so" ],
  "DicomWeb": { "Enable": true, "Root": "/dicom-web/" }
}
EOF
	# it ends with this shell even when the shell is killed outright
	if command -v setpriv >/dev/null; then
		setpriv --pdeathsig TERM /usr/sbin/Orthanc "$1/orthanc.json" >"$1/orthanc.log" 2>&1 &
	else
		/usr/sbin/Orthanc "$1/orthanc.json" >"$1/orthanc.log" 2>&1 &
	fi
	BENCH_ORTHANC_PID=$!
	if ! bench_wait_http "http://127.0.0.1:$2/system" 60 -u "$3:$4"; then
		tail -20 "$1/orthanc.log" >&2
		bench_die "Orthanc did not start (log: $1/orthanc.log)"
	fi
}

bench_orthanc_stop() {
	[ -n "$BENCH_ORTHANC_PID" ] || return 0
	kill -TERM "$BENCH_ORTHANC_PID" 2>/dev/null || true
	_i=0
	while kill -0 "$BENCH_ORTHANC_PID" 2>/dev/null && [ "$_i" -lt 300 ]; do
		sleep 0.1
		_i=$((_i + 1))
	done
	kill -KILL "$BENCH_ORTHANC_PID" 2>/dev/null || true
	wait "$BENCH_ORTHANC_PID" 2>/dev/null || true
	BENCH_ORTHANC_PID=""
}

# bench_cpu PID...: CPU seconds (user + system) used so far by the processes and their
# children still running.
bench_cpu() {
	_t=0
	for _p in "$@"; do
		for _q in $_p $(ps --ppid "$_p" -o pid= 2>/dev/null); do
			_t=$((_t + $(awk '{ print $14 + $15 }' "/proc/$_q/stat" 2>/dev/null || echo 0)))
		done
	done
	echo "$_t $(getconf CLK_TCK)" | awk '{ printf "%.2f", $1 / $2 }'
}

bench_cleanup() {
	if [ -n "$BENCH_CHILD" ]; then
		kill -TERM "$BENCH_CHILD" 2>/dev/null || true
		wait "$BENCH_CHILD" 2>/dev/null || true
		BENCH_CHILD=""
	fi
	bench_orthanc_stop
	bench_stack_stop
	if [ -n "$BENCH_WORK" ]; then
		rm -rf "$BENCH_WORK"
	fi
	BENCH_WORK=""
}

# Every script: trap it once, so an error, a failed check or Ctrl-C leaves nothing behind.
bench_trap() {
	trap 'bench_cleanup' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

# bench_ratio OURS PEER: "N.Nx".
bench_ratio() {
	echo "$1 $2" | awk '{ if ($2 > 0) printf "%.1fx", $1 / $2; else print "n/a" }'
}

# bench_better BEST NEW: true when NEW beats BEST (or BEST is still empty), for best-of-rounds.
bench_better() {
	[ -z "$1" ] || awk -v a="$1" -v b="$2" 'BEGIN { exit !(b + 0 > a + 0) }'
}

# bench_verdict OURS PEER TARGET: "meets the Nx target" or "below the Nx target".
bench_verdict() {
	echo "$1 $2 $3" | awk '{ if ($2 > 0 && $1 / $2 >= $3) printf "meets the %gx target", $3;
		else printf "BELOW the %gx target", $3 }'
}
