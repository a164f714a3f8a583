#!/bin/sh
# runtime-packages.sh BINARY...: print, one per line, the Debian/Ubuntu packages that hold the
# shared libraries the binaries link directly (their ELF NEEDED entries, resolved with ldd,
# owners found with one dpkg -S). Dockerfile.segmenter installs this list in its runtime
# stage, so Ubuntu's renamed runtime packages (the 64-bit time_t "t64" names) need no
# hand-kept list; tests/checks/test_compose.sh uses it to keep deploy/docker/Dockerfile's list
# complete. Needs objdump (binutils), ldd and dpkg; exits 1 naming any library no package owns.
set -eu
tmp=$(mktemp -d "${TMPDIR:-/tmp}/runtime-packages.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
: >"$tmp/libs"
for bin in "$@"; do
	objdump -p "$bin" | awk '$1 == "NEEDED" { print $2 }' >"$tmp/needed"
	# "soname path" for each directly needed library
	ldd "$bin" | awk -v bin="$bin" 'NR == FNR { need[$1] = 1; next }
		$2 == "=>" && $3 ~ /^\// && ($1 in need) { print $1, $3, bin }' "$tmp/needed" - >>"$tmp/libs"
done
# merged /usr: dpkg may have recorded a library under /lib or under /usr/lib, and ldd may
# report either; ask about every spelling at once (dpkg -S is slow to start)
while read -r so path bin; do
	real=$(readlink -f "$path")
	printf '%s\n%s\n%s\n%s\n' "$path" "$real" "${real#/usr}" "/usr${path#/usr}"
done <"$tmp/libs" | sort -u >"$tmp/paths"
[ -s "$tmp/paths" ] || exit 0
xargs dpkg -S <"$tmp/paths" 2>/dev/null | grep -v '^diversion' >"$tmp/owners" || true
status=0
while read -r so path bin; do
	real=$(readlink -f "$path")
	pkg=""
	for p in "$path" "$real" "${real#/usr}" "/usr${path#/usr}"; do
		pkg=$(awk -v p="$p" '{ i = index($0, ": "); if (substr($0, i + 2) == p) {
			print substr($0, 1, i - 1); exit } }' "$tmp/owners" | cut -d, -f1 | cut -d: -f1)
		[ -n "$pkg" ] && break
	done
	if [ -z "$pkg" ]; then
		echo "runtime-packages: no package owns $so ($path), needed by $bin" >&2
		status=1
	else
		echo "$pkg"
	fi
done <"$tmp/libs" >"$tmp/packages"
sort -u "$tmp/packages"
exit $status
