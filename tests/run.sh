#!/bin/sh
# tests/run.sh BUILD: runs every test of radpipe against real peers and prints a final
# "N passed, N failed" line (exit 1 when any failed).
#  - starts one private PostgreSQL server for the run (as the postgres user when root) and
#    exports RADPIPE_TEST_PG_URL; each test creates its own database on it;
#  - runs every compiled test under BUILD/tests (ASan + UBSan; a leak fails it) and every
#    script tests/checks/test_*.sh, each with a time limit; output goes to the console.
# TESTS="pattern" limits the run to matching names.
set -u
build=${1:-build/test}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
export RADPIPE_TEST_ROOT="$root" RADPIPE_TEST_BIN="$root/$build/bin"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=0:protect_shadow_gap=0"
export LSAN_OPTIONS="suppressions=$root/tests/lsan.supp:print_suppressions=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
limit=${TEST_TIMEOUT:-600}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/radpipe-run.XXXXXX")
chmod 755 "$tmp"
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
pgdata="$tmp/pg"
asuser=""
if [ "$(id -u)" -eq 0 ]; then asuser="runuser -u postgres --"; fi

cleanup() {
	if [ -f "$pgdata/postmaster.pid" ]; then
		$asuser "$pgbin/pg_ctl" -D "$pgdata" -m immediate stop >/dev/null 2>&1
	fi
	rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
mkdir -p "$pgdata" "$tmp/sock"
: >"$tmp/pg.log"
[ -n "$asuser" ] && chown postgres "$pgdata" "$tmp/sock" "$tmp/pg.log"
if ! $asuser "$pgbin/initdb" -D "$pgdata" -U radpipe --auth=trust -E UTF8 --locale=C.UTF-8 \
	>"$tmp/initdb.log" 2>&1; then
	cat "$tmp/initdb.log"
	echo "0 passed, 1 failed (could not initialise the test PostgreSQL cluster)"
	exit 1
fi
if ! $asuser "$pgbin/pg_ctl" -D "$pgdata" -l "$tmp/pg.log" -w -o \
	"-p $port -k $tmp/sock -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" \
	start >/dev/null; then
	cat "$tmp/pg.log"
	echo "0 passed, 1 failed (could not start the test PostgreSQL server)"
	exit 1
fi
export RADPIPE_TEST_PG_URL="postgresql://radpipe@127.0.0.1:$port/postgres"
# A watchdog in its own session stops the server once this runner is gone, however it died
# (the EXIT trap does not run on SIGKILL).
runner=$$
setsid sh -c "while kill -0 $runner 2>/dev/null; do sleep 2; done; \
	$asuser '$pgbin/pg_ctl' -D '$pgdata' -m immediate stop >/dev/null 2>&1; rm -rf '$tmp'" \
	</dev/null >/dev/null 2>&1 &

pass=0
fail=0
failed=""
run_one() { # name, command...
	name=$1
	shift
	case "$name" in *${TESTS:-}*) ;; *) return ;; esac
	echo "=== $name"
	start=$(date +%s)
	timeout -k 10 "$limit" "$@"
	st=$?
	secs=$(($(date +%s) - start))
	if [ $st -eq 0 ]; then
		pass=$((pass + 1))
		echo "--- ok $name (${secs}s)"
	else
		fail=$((fail + 1))
		failed="$failed $name"
		[ $st -eq 124 ] && echo "--- timed out after ${limit}s"
		echo "--- FAIL $name (exit $st, ${secs}s)"
	fi
}

for t in $(find "$build/tests" -type f -perm -u+x -name 'test_*' 2>/dev/null | sort); do
	run_one "${t#"$build"/tests/}" "$t"
done
for s in $(ls tests/checks/test_*.sh 2>/dev/null | sort); do
	run_one "checks/$(basename "$s" .sh)" sh "$s"
done

echo
[ -n "$failed" ] && echo "failed:$failed"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
