#!/bin/sh
# test_rules_schema.sh: proto/rules/rules.schema.json and the dicom-indexer's own rules
# validator (`dicom-indexer --check-rules FILE`, services/dicom-indexer/idx_rules_parse.c)
# agree: the example and other valid files pass both (ajv in strict mode,
# tests/node/validate-rules.mjs), every invalid file fails both, and the indexer's message
# names the rule and the field. Files only the indexer can judge (unknown DICOM keywords,
# regular expressions that do not compile, duplicate names, min > max) fail the indexer.
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
bin=${RADPIPE_TEST_BIN:-$root/build/test/bin}
cd "$root" || exit 1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/test_rules_schema.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
schema=proto/rules/rules.schema.json
idx=$bin/dicom-indexer
nfail=0
ok() { echo "ok   $*"; }
bad() {
	echo "FAIL $*"
	nfail=$((nfail + 1))
}
[ -x "$idx" ] || {
	echo "FAIL $idx is missing: build it first"
	exit 1
}
ajv() { node tests/node/validate-rules.mjs "$schema" "$1" >"$tmp/ajv.out" 2>&1; }
check() { "$idx" --check-rules "$1" >"$tmp/idx.out" 2>&1; }

# valid <name> <json>: both accept
valid() {
	f="$tmp/$1.json"
	printf '%s\n' "$2" >"$f"
	if ajv "$f" && check "$f"; then ok "valid: $1"; else
		bad "valid: $1 was rejected: $(cat "$tmp/ajv.out" "$tmp/idx.out")"
	fi
}
# invalid <name> <json> [<text the indexer's message must contain>]: both reject
invalid() {
	f="$tmp/$1.json"
	printf '%s\n' "$2" >"$f"
	if ajv "$f"; then
		bad "invalid: $1: ajv accepted it"
	elif check "$f"; then
		bad "invalid: $1: dicom-indexer --check-rules accepted it"
	elif [ -n "${3:-}" ] && ! grep -qF -- "$3" "$tmp/idx.out"; then
		bad "invalid: $1: message lacks '$3': $(cat "$tmp/idx.out")"
	else
		ok "invalid: $1 ($(head -c 160 "$tmp/idx.out"))"
	fi
}
# only_indexer <name> <json> <text>: the schema cannot tell, the indexer rejects
only_indexer() {
	f="$tmp/$1.json"
	printf '%s\n' "$2" >"$f"
	if ! ajv "$f"; then
		bad "indexer-only: $1: ajv rejected it (the schema should accept it): $(cat "$tmp/ajv.out")"
	elif check "$f"; then
		bad "indexer-only: $1: dicom-indexer --check-rules accepted it"
	elif ! grep -qF -- "$3" "$tmp/idx.out"; then
		bad "indexer-only: $1: message lacks '$3': $(cat "$tmp/idx.out")"
	else
		ok "indexer-only: $1 ($(head -c 160 "$tmp/idx.out"))"
	fi
}

if ajv proto/rules/example.json && check proto/rules/example.json; then
	ok "proto/rules/example.json passes ajv and --check-rules: $(cat "$tmp/idx.out")"
else
	bad "proto/rules/example.json: $(cat "$tmp/ajv.out" "$tmp/idx.out")"
fi
valid empty '{}'
valid no-rules '{"version": 1, "rules": []}'
valid completion-only '{"completion": [{"source": {"kind": "notify"}, "quiet_seconds": 0, "series_received": ["a", {"all": ["b", {"any": ["c"]}]}]}]}'
valid leaf-ops '{"rules": [{"name": "x.y-z_1", "level": "series", "when": {"any": [
  {"tag": "SeriesNumber", "equals": 3}, {"tag": "Modality", "in": ["CT", "MR"], "ignore_case": true},
  {"tag": "BodyPartExamined", "present": false}, {"tag": "SliceThickness", "range": {"max": 2.5}},
  {"tag": "StudyDate", "date_range": {"from": "20200101", "to": "20201231"}},
  {"tag": "ImageType", "regex": "^(ORIGINAL|DERIVED)$"}, {"not": {"tag": "source.kind", "equals": "http"}}]},
  "actions": [{"action": "segment", "model": "totalseg", "params": {"fast": true}}]}]}'

invalid unknown-top '{"rulez": []}' 'unknown field "rulez"'
invalid no-name '{"rules": [{"actions": [{"action": "upload"}]}]}' 'rules[0]: needs a "name"'
invalid bad-name '{"rules": [{"name": "a:b", "actions": [{"action": "upload"}]}]}' 'rules[0]'
invalid no-actions '{"rules": [{"name": "a", "actions": []}]}' 'rules[0] ("a").actions'
invalid unknown-action '{"rules": [{"name": "a", "actions": [{"action": "delete"}]}]}' 'rules[0] ("a").actions[0].action'
invalid bad-layout '{"rules": [{"name": "a", "actions": [{"action": "upload", "layout": "zip"}]}]}' 'rules[0] ("a").actions[0].layout'
invalid algorithm-and-model '{"rules": [{"name": "a", "actions": [{"action": "segment", "algorithm": "otsu", "model": "m"}]}]}' 'not both'
invalid two-ops '{"rules": [{"name": "a", "when": {"tag": "Modality", "equals": "CT", "wildcard": "C*"}, "actions": [{"action": "upload"}]}]}' 'rules[0] ("a").when: give one operator'
invalid no-op '{"rules": [{"name": "a", "when": {"tag": "Modality"}, "actions": [{"action": "upload"}]}]}' 'has no operator'
invalid bad-date '{"rules": [{"name": "a", "when": {"tag": "StudyDate", "date_range": {"from": "2024-01-01"}}, "actions": [{"action": "upload"}]}]}' 'when.date_range'
invalid empty-range '{"rules": [{"name": "a", "when": {"tag": "SliceThickness", "range": {}}, "actions": [{"action": "upload"}]}]}' 'when.range'
invalid bad-kind '{"completion": [{"source": {"kind": "dicomweb"}}]}' 'completion[0].source'
invalid negative-quiet '{"completion": [{"quiet_seconds": -1}]}' 'completion[0].quiet_seconds'
invalid mixed-in '{"rules": [{"name": "a", "when": {"tag": "Modality", "in": ["CT", 1]}, "actions": [{"action": "upload"}]}]}' 'when.in'
invalid icase-range '{"rules": [{"name": "a", "when": {"tag": "SliceThickness", "range": {"min": 1}, "ignore_case": true}, "actions": [{"action": "upload"}]}]}' 'ignore_case'
invalid reserved-param '{"rules": [{"name": "a", "actions": [{"action": "segment", "params": {"series_instance_uid": "1.2"}}]}]}' 'actions[0].params'
invalid empty-series-list '{"completion": [{"series_received": []}]}' 'completion[0].series_received'
invalid big-priority '{"rules": [{"name": "a", "priority": 101, "actions": [{"action": "upload"}]}]}' 'rules[0] ("a").priority'
invalid bad-url '{"rules": [{"name": "a", "actions": [{"action": "upload", "url_pattern": "http://x/{PatientID}"}]}]}' 'actions[0].url_pattern'
invalid all-plus '{"rules": [{"name": "a", "when": {"all": [{"tag": "Modality", "equals": "CT"}], "tag": "X"}, "actions": [{"action": "upload"}]}]}' 'rules[0] ("a").when'
invalid deep-typo '{"rules": [{"name": "a", "when": {"any": [{"tag": "Modality", "equals": "CT"}, {"tag": "Modality", "equal": "MR"}]}, "actions": [{"action": "upload"}]}]}' 'rules[0] ("a").when.any[1]: unknown field "equal"'
invalid not-json '{"rules": [' 'not valid JSON'

only_indexer unknown-keyword '{"rules": [{"name": "a", "when": {"tag": "Modallity", "equals": "CT"}, "actions": [{"action": "upload"}]}]}' 'rules[0] ("a").when.tag: unknown DICOM keyword "Modallity"'
only_indexer bad-regex '{"rules": [{"name": "a", "level": "series", "when": {"tag": "SeriesDescription", "regex": "(t1"}, "actions": [{"action": "upload"}]}]}' 'when.regex: invalid regular expression'
only_indexer duplicate-name '{"rules": [{"name": "a", "actions": [{"action": "upload"}]}, {"name": "a", "actions": [{"action": "upload"}]}]}' 'rules[1] ("a"): the name is used by another rule'
only_indexer min-over-max '{"rules": [{"name": "a", "when": {"tag": "SliceThickness", "range": {"min": 5, "max": 1}}, "actions": [{"action": "upload"}]}]}' 'min is greater than max'
only_indexer unknown-placeholder '{"rules": [{"name": "a", "actions": [{"action": "upload", "url_pattern": "s3://b/{PatientsName}"}]}]}' 'unknown DICOM keyword "{PatientsName}"'

if [ "$nfail" -gt 0 ]; then
	echo "test_rules_schema: $nfail check(s) failed"
	exit 1
fi
echo "test_rules_schema: all checks passed"
