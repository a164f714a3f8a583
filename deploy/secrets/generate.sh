#!/bin/sh
# generate.sh [DIR]: writes the secrets compose.yml reads, random values, into DIR (default:
# deploy/secrets, next to this script). A file that exists is kept, so running it again never
# changes a password PostgreSQL or MinIO already holds in its volume; delete a file (and, for
# db_password, the postgres-data volume) to make a new one.
# Modes: DIR 0700 and every file 0600, except the files the radpipe services read as uid 10001
# inside their containers (database_url, admin_token, s3_*): compose bind-mounts secret files
# with their host owner and mode (it ignores uid/gid/mode outside swarm), so those are 0644
# and DIR's 0700 keeps them from other users of the host.
set -eu

dir=${1:-$(cd "$(dirname "$0")" && pwd)}
mkdir -p "$dir"
chmod 0700 "$dir"
umask 077

hex() { # N random bytes as 2N hex digits
	od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

# put NAME MODE VALUE: write DIR/NAME atomically unless it exists, then set its mode
put() {
	if [ -e "$dir/$1" ]; then
		echo "generate.sh: kept $dir/$1"
	else
		printf '%s\n' "$3" >"$dir/.$1.tmp"
		mv "$dir/.$1.tmp" "$dir/$1"
		echo "generate.sh: wrote $dir/$1"
	fi
	chmod "$2" "$dir/$1"
}

put db_password 0600 "$(hex 24)"
# the URL carries the password PostgreSQL was (or will be) initialised with
put database_url 0644 "postgresql://radpipe:$(cat "$dir/db_password")@postgres:5432/radpipe"
put admin_token 0644 "rpt_$(hex 32)"
put minio_root_password 0600 "$(hex 24)"
put s3_access_key 0644 "radpipe$(hex 6)"
put s3_secret_key 0644 "$(hex 24)"
