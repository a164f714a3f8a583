#!/bin/sh
# test_readme.sh: README.md lists every RADPIPE_* variable of every binary with the default
# the binary itself prints (--help), so the documentation cannot drift from the code.
set -u
root=${RADPIPE_TEST_ROOT:-.}
bin=${RADPIPE_TEST_BIN:-$root/build/test/bin}
readme="$root/README.md"
fail=0
for b in api-gateway dicom-indexer storage-uploader gpu-segmenter radpipe-stack; do
	if [ ! -x "$bin/$b" ]; then
		echo "FAIL $b is not built in $bin"
		fail=1
		continue
	fi
	rows=$("$bin/$b" --help | grep '^| `RADPIPE_')
	n=0
	while IFS= read -r row; do
		n=$((n + 1))
		# compare name and default (the first two columns)
		key=$(printf '%s\n' "$row" | cut -d'|' -f2,3)
		if ! grep -qF -- "$key" "$readme"; then
			echo "FAIL README.md lacks$key (from $b --help)"
			fail=1
		fi
	done <<ROWS
$rows
ROWS
	echo "ok   $b: $n variables documented"
done
# and nothing documented that no binary knows
for v in $(grep -o '^| `RADPIPE_[A-Z0-9_]*`' "$readme" | tr -d '|` ' | sort -u); do
	found=0
	for b in api-gateway dicom-indexer storage-uploader gpu-segmenter radpipe-stack; do
		"$bin/$b" --help 2>/dev/null | grep -q "\`$v\`" && found=1 && break
	done
	if [ $found -eq 0 ]; then
		echo "FAIL README.md documents $v, which no binary knows"
		fail=1
	fi
done
[ $fail -eq 0 ] && echo "test_readme: all variables documented"
exit $fail
