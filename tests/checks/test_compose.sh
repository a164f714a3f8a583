#!/bin/sh
# test_compose.sh: checks the deployment files against the services, without a Docker engine:
# compose.yml through Debian's docker-compose 1.29 (`config`), deploy/docker (targets, runtime
# packages), deploy/secrets/generate.sh (run into a temp dir, never into the checkout) and
# deploy/k8s (YAML, kustomize when kubectl is installed). Every RADPIPE_* variable these files
# set must be one the service it is set for lists in `<service> --help`, and each service,
# started natively with the environment compose.yml or deploy/k8s gives it, must accept it.
# One line per check; exits 1 when any failed. Run by tests/run.sh (RADPIPE_TEST_BIN).
set -u
root=${RADPIPE_TEST_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}
bin=${RADPIPE_TEST_BIN:-$root/build/test/bin}
cd "$root" || exit 1
tmp=$(mktemp -d "${TMPDIR:-/tmp}/test_compose.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
services="api-gateway dicom-indexer storage-uploader gpu-segmenter"
nfail=0
ok() { echo "ok   $*"; }
bad() {
	echo "FAIL $*"
	nfail=$((nfail + 1))
}
finish() {
	if [ "$nfail" -gt 0 ]; then
		echo "test_compose: $nfail check(s) failed"
		exit 1
	fi
	echo "test_compose: all checks passed"
	exit 0
}

# --- tools -----------------------------------------------------------------------------------
py=""
for p in python3 /usr/bin/python3; do
	if "$p" -c 'import yaml' 2>/dev/null; then
		py=$p
		break
	fi
done
[ -n "$py" ] || bad "python3 with PyYAML not found (deploy/install-deps.sh installs python3-yaml)"
command -v docker-compose >/dev/null 2>&1 ||
	bad "docker-compose not found (deploy/install-deps.sh installs Debian's docker-compose)"
[ "$nfail" -eq 0 ] || finish

# --- the services' own variable lists ---------------------------------------------------------
for s in $services; do
	if [ ! -x "$bin/$s" ]; then
		bad "$bin/$s is missing: build the test binaries first (make MODE=test build/test/bin/$s)"
	elif ! "$bin/$s" --help >"$tmp/help.$s" 2>&1 || ! grep -q '^| `RADPIPE_' "$tmp/help.$s"; then
		bad "$s --help did not print its variable table"
	fi
done
[ "$nfail" -eq 0 ] && ok "--help of $services lists their variables"
[ "$nfail" -eq 0 ] || finish

# --- compose.yml through docker-compose 1.29 -----------------------------------------------
# Secret files need not exist for `config` (checked: 1.29 resolves, never reads them).
if out=$(docker-compose -f compose.yml config -q 2>&1) && [ -z "$out" ]; then
	ok "docker-compose -f compose.yml config -q: valid, no warnings"
else
	bad "docker-compose -f compose.yml config -q:"
	printf '%s\n' "$out" | sed 's/^/     /'
	finish
fi
want="api-gateway dicom-indexer dicom-receiver gpu-segmenter kafka kafka-init minio minio-init postgres storage-uploader"
got=$(docker-compose -f compose.yml config --services 2>&1 | sort | tr '\n' ' ' | sed 's/ $//')
if [ "$got" = "$want" ]; then
	ok "config --services: $got"
else
	bad "config --services lists \"$got\", want \"$want\""
fi
docker-compose -f compose.yml config >"$tmp/config.yml" 2>"$tmp/config.err" ||
	bad "docker-compose config failed: $(cat "$tmp/config.err")"

# --- deploy/secrets/generate.sh, into a temp dir ---------------------------------------------
if sh deploy/secrets/generate.sh "$tmp/secrets" >"$tmp/gen.log" 2>&1 &&
	sh deploy/secrets/generate.sh "$tmp/secrets" >"$tmp/gen2.log" 2>&1; then
	if grep -q wrote "$tmp/gen2.log"; then
		bad "generate.sh run twice rewrote a secret: $(grep wrote "$tmp/gen2.log")"
	else
		ok "generate.sh writes the secrets and keeps them when run again"
	fi
else
	bad "generate.sh failed: $(cat "$tmp/gen.log" "$tmp/gen2.log" 2>/dev/null)"
fi

# --- everything YAML: compose (raw and resolved), deploy/k8s, Dockerfiles --------------------
# shellcheck disable=SC2086 # $services: one argument per service
"$py" - "$root" "$tmp" $services <<'PY'
import glob, json, os, re, stat, sys
import yaml

root, tmp, services = sys.argv[1], sys.argv[2], sys.argv[3:]
failed = 0
def ok(msg): print("ok   " + msg)
def bad(msg):
    global failed
    failed += 1
    print("FAIL " + msg)

VAR = re.compile(r"RADPIPE_[A-Z0-9_]*[A-Z0-9]")
def names_in(node):
    """RADPIPE_* names in every key and string of a parsed document (comments are gone)."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out |= names_in(k) | names_in(v)
    elif isinstance(node, list):
        for v in node:
            out |= names_in(v)
    elif isinstance(node, str):
        out |= set(VAR.findall(node))
    return out

# known[svc]: from `<svc> --help`; a secret row "(or `_FILE`)" also allows NAME_FILE
known = {}
for s in services:
    names = set()
    for line in open(os.path.join(tmp, "help." + s)):
        m = re.match(r"\| `(RADPIPE_[A-Z0-9_]+)`( \(or `_FILE`\))?", line)
        if m:
            names.add(m.group(1))
            if m.group(2):
                names.add(m.group(1) + "_FILE")
    known[s] = names
every = set().union(*known.values())
common = set.intersection(*known.values())

def duration(v):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(v).strip())
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]

def check_names(where, used, allowed):
    unknown = sorted(used - allowed)
    if unknown:
        bad("%s: unknown variable(s) %s" % (where, " ".join(unknown)))
        return False
    return True

def smoke_env(path, env):
    """Write NAME=VALUE lines for the start-up check: secrets point at temp files, the
    database at a closed port with no waiting, listeners at free ports, paths under tmp."""
    data = os.path.join(tmp, "data")
    with open(path, "w") as f:
        for k, v in sorted(env.items()):
            v = "" if v is None else str(v)
            if k == "RADPIPE_DATABASE_URL_FILE":
                v = os.path.join(tmp, "smoke-database-url")
            elif k == "RADPIPE_KAFKA_OPTIONS_FILE":
                v = os.path.join(tmp, "smoke-kafka-options")
            elif k == "RADPIPE_ADMIN_TOKEN_FILE":
                v = os.path.join(tmp, "smoke-admin-token")
            elif k == "RADPIPE_DB_WAIT_SECONDS":
                v = "0"
            elif k in ("RADPIPE_ADMIN_LISTEN", "RADPIPE_HTTP_LISTEN"):
                v = "127.0.0.1:0"
            v = v.replace("/var/lib/radpipe", data)
            if "\n" in v:
                bad("%s: %s holds a newline" % (path, k))
                continue
            f.write("%s=%s\n" % (k, v))

# --- compose.yml, raw: no version key, only known names ------------------------------------
raw = yaml.safe_load(open(os.path.join(root, "compose.yml")))
if "version" in raw:
    bad("compose.yml has a top-level version: key (the compose spec has none)")
else:
    ok("compose.yml has no version: key")
if check_names("compose.yml", names_in(raw), every):
    ok("compose.yml uses only RADPIPE_* variables the services know (%d names)" % len(names_in(raw)))

# --- compose.yml, resolved by docker-compose ------------------------------------------------
cfg = yaml.safe_load(open(os.path.join(tmp, "config.yml")))
svcs = cfg.get("services", {})
problems = []
for name, s in svcs.items():
    if "container_name" in s:
        problems.append("%s sets container_name (it could not scale)" % name)
    if "ports" in s and name != "api-gateway":
        problems.append("%s publishes ports (only the gateway may)" % name)
if problems:
    for p in problems:
        bad(p)
else:
    ok("no container_name; only api-gateway publishes a port (workers scale freely)")
gw_ports = svcs.get("api-gateway", {}).get("ports", [])
if not any(str(p.get("target")) == "8080" and str(p.get("published")) == "8080"
           for p in gw_ports if isinstance(p, dict)):
    bad("api-gateway does not publish 8080:8080 (%r)" % gw_ports)

admin_port = {"api-gateway": "8080", "dicom-indexer": "9101", "storage-uploader": "9102",
              "gpu-segmenter": "9103"}
infra_wait = {"postgres": "service_healthy", "kafka": "service_healthy", "minio": "service_healthy",
              "kafka-init": "service_completed_successfully",
              "minio-init": "service_completed_successfully"}
for name in services:
    s = svcs.get(name)
    if s is None:
        bad("compose.yml has no service %s" % name)
        continue
    errs = []
    env = s.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    names_ok = check_names("compose.yml service %s" % name, set(env), known[name])
    if s.get("image") != "radpipe/" + name:
        errs.append("image is %r, want radpipe/%s" % (s.get("image"), name))
    if s.get("restart") != "unless-stopped":
        errs.append("restart is %r" % s.get("restart"))
    grace, drain = duration(s.get("stop_grace_period", "10s")), duration(env.get("RADPIPE_DRAIN_SECONDS", 30))
    if grace is None or drain is None or grace <= drain:
        errs.append("stop_grace_period %r is not above RADPIPE_DRAIN_SECONDS %r"
                    % (s.get("stop_grace_period"), env.get("RADPIPE_DRAIN_SECONDS")))
    test = " ".join(s.get("healthcheck", {}).get("test", []))
    if "http://127.0.0.1:%s/readyz" % admin_port[name] not in test:
        errs.append("healthcheck %r does not probe /readyz on %s" % (test, admin_port[name]))
    listen = env.get("RADPIPE_HTTP_LISTEN" if name == "api-gateway" else "RADPIPE_ADMIN_LISTEN")
    if listen != "0.0.0.0:" + admin_port[name]:
        errs.append("listens on %r, want 0.0.0.0:%s" % (listen, admin_port[name]))
    deps = s.get("depends_on") or {}
    for dep, cond in infra_wait.items():
        if (deps.get(dep) or {}).get("condition") != cond:
            errs.append("depends_on %s is not %s" % (dep, cond))
    if not any(str(v).startswith("radpipe-data:/var/lib/radpipe") for v in s.get("volumes", [])):
        errs.append("radpipe-data is not mounted at /var/lib/radpipe")
    secrets = [x.get("source") if isinstance(x, dict) else x for x in s.get("secrets", [])]
    if env.get("RADPIPE_DATABASE_URL_FILE") != "/run/secrets/database_url" or "database_url" not in secrets:
        errs.append("database URL is not the database_url secret")
    if name == "api-gateway" and (env.get("RADPIPE_ADMIN_TOKEN_FILE") != "/run/secrets/admin_token"
                                  or "admin_token" not in secrets):
        errs.append("admin token is not the admin_token secret")
    b = s.get("build") or {}
    df = os.path.join(b.get("context", ""), b.get("dockerfile", "Dockerfile"))
    if not os.path.isfile(df):
        errs.append("Dockerfile %s does not exist" % df)
    elif b.get("target"):
        stages = re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", open(df).read())
        if b["target"] not in stages:
            errs.append("target %s is not a stage of %s" % (b["target"], df))
    if name == "gpu-segmenter":
        devs = s.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if not any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devs):
            errs.append("no nvidia GPU reservation")
        if env.get("RADPIPE_GPU_BACKEND") != "auto":
            errs.append("RADPIPE_GPU_BACKEND is not auto")
    if errs:
        bad("compose.yml service %s: %s" % (name, "; ".join(errs)))
    elif names_ok:
        ok("compose.yml service %s: known variables, healthcheck, grace, secrets, dependencies" % name)
    smoke_env(os.path.join(tmp, "env.compose." + name), env)

# kafka-init creates every topic of proto/topics.md
topics = re.findall(r"(?m)^\| `(radpipe\.[a-z.]+)`", open(os.path.join(root, "proto/topics.md")).read())
init = " ".join(str(x) for x in (svcs.get("kafka-init", {}).get("command") or []))
words = re.findall(r"[A-Za-z0-9_.]+", init)
missing = [t for t in topics if t.split(".", 1)[1] not in words]
if not topics or missing or "--if-not-exists" not in init:
    bad("kafka-init does not create (idempotently) every topic of proto/topics.md: %s" % missing)
else:
    ok("kafka-init creates the %d topics of proto/topics.md" % len(topics))

# secrets: files in deploy/secrets/, all written by generate.sh
sec_dir = os.path.join(root, "deploy", "secrets")
problems = []
for sname, sdef in (cfg.get("secrets") or {}).items():
    f = sdef.get("file", "")
    if os.path.dirname(f) != sec_dir:
        problems.append("secret %s is not a file in deploy/secrets (%s)" % (sname, f))
    gen = os.path.join(tmp, "secrets", os.path.basename(f))
    if not os.path.isfile(gen):
        problems.append("generate.sh does not write %s" % os.path.basename(f))
    elif os.stat(gen).st_mode & 0o022:
        problems.append("generate.sh leaves %s writable by others" % os.path.basename(f))
gdir = os.path.join(tmp, "secrets")
if os.path.isdir(gdir) and stat.S_IMODE(os.stat(gdir).st_mode) != 0o700:
    problems.append("generate.sh leaves its directory mode %o, want 700" % stat.S_IMODE(os.stat(gdir).st_mode))
if os.path.isfile(os.path.join(gdir, "db_password")):
    pw = open(os.path.join(gdir, "db_password")).read().strip()
    if stat.S_IMODE(os.stat(os.path.join(gdir, "db_password")).st_mode) != 0o600:
        problems.append("db_password is not mode 600")
    if ":%s@" % pw not in open(os.path.join(gdir, "database_url")).read():
        problems.append("database_url does not carry db_password")
if problems:
    for p in problems:
        bad(p)
else:
    ok("compose secrets are files in deploy/secrets that generate.sh writes (dir 700)")

# --- Dockerfiles: per stage, only variables its service knows ---------------------------------
for df in sorted(glob.glob(os.path.join(root, "deploy/docker/Dockerfile*"))):
    stage, used, rel = None, {}, os.path.relpath(df, root)
    for line in open(df):
        if line.lstrip().startswith("#"):
            continue
        m = re.match(r"(?i)FROM\s+\S+(?:\s+AS\s+(\S+))?", line)
        if m:
            stage = m.group(1)
        for v in VAR.findall(line):
            used.setdefault(stage, set()).add(v)
    good = True
    for st, names in used.items():
        good &= check_names("%s stage %s" % (rel, st), names, known.get(st, common))
    if good:
        ok("%s sets only variables its targets know" % rel)
    # syntax, roughly as the builder reads it: continuations joined, comment lines dropped
    instr, cur, errs, stages = [], "", [], []
    for line in open(df):
        if line.lstrip().startswith("#"):
            continue
        cur += line.rstrip("\n")
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            instr.append(cur.strip())
        cur = ""
    if cur.strip():
        errs.append("ends inside a continued line")
    for i in instr:
        word, _, rest = i.partition(" ")
        if word.upper() not in ("FROM", "RUN", "COPY", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE",
                                "ENTRYPOINT", "CMD", "STOPSIGNAL", "LABEL", "VOLUME", "SHELL",
                                "ADD", "HEALTHCHECK"):
            errs.append("unknown instruction %r" % i[:40])
        elif word.upper() == "FROM":
            m = re.match(r"\S+(?:\s+AS\s+(\S+))?\s*$", rest, re.I)
            if not m:
                errs.append("bad FROM %r" % i)
            stages.append(m.group(1) if m else None)
        elif word.upper() == "COPY":
            m = re.search(r"--from=(\S+)", rest)
            if m and m.group(1) not in stages:
                errs.append("COPY --from=%s names no earlier stage" % m.group(1))
        elif word.upper() == "ENTRYPOINT":
            try:
                json.loads(rest)
            except ValueError:
                errs.append("ENTRYPOINT is not exec (JSON) form: %r" % rest)
    if errs or not instr or instr[0].split()[0].upper() not in ("FROM", "ARG"):
        bad("%s: %s" % (rel, "; ".join(errs) or "does not start with FROM"))
    else:
        ok("%s: %d instructions in %d stages read cleanly" % (rel, len(instr), len(stages)))

# --- deploy/k8s -------------------------------------------------------------------------------
kdir = os.path.join(root, "deploy", "k8s")
docs, parsed = {}, True
files = sorted(glob.glob(os.path.join(kdir, "*.yaml")))
for f in files:
    try:
        ds = [d for d in yaml.safe_load_all(open(f)) if d is not None]
    except yaml.YAMLError as e:
        bad("%s does not parse: %s" % (os.path.relpath(f, root), e))
        parsed = False
        continue
    for d in ds:
        if not (isinstance(d, dict) and d.get("kind") and
                (d.get("apiVersion") or d.get("kind") == "Kustomization")):
            bad("%s: a document without apiVersion/kind" % os.path.relpath(f, root))
            parsed = False
    docs[os.path.basename(f)] = ds
if not files:
    bad("deploy/k8s holds no *.yaml")
elif parsed:
    ok("deploy/k8s: %d YAML files parse (%s)" % (len(files), " ".join(sorted(docs))))

allk = [d for ds in docs.values() for d in ds]
if check_names("deploy/k8s", names_in(allk), every):
    ok("deploy/k8s uses only RADPIPE_* variables the services know (%d names)" % len(names_in(allk)))
kust = (docs.get("kustomization.yaml") or [{}])[0]
listed = set(kust.get("resources", []))
unlisted = sorted(set(docs) - listed - {"kustomization.yaml", "secret.template.yaml"})
absent = sorted(r for r in listed if not os.path.exists(os.path.join(kdir, r)))
if unlisted or absent or not listed:
    bad("kustomization.yaml resources: not listed %s, missing %s" % (unlisted, absent))
else:
    ok("kustomization.yaml lists every manifest but the secret template")

by_kind = {}
for d in allk:
    by_kind.setdefault(d.get("kind"), {})[d.get("metadata", {}).get("name")] = d
cms = {n: (d.get("data") or {}) for n, d in by_kind.get("ConfigMap", {}).items()}
secret_keys = set()
for d in by_kind.get("Secret", {}).values():
    secret_keys |= set((d.get("stringData") or {}).keys()) | set((d.get("data") or {}).keys())
deps = by_kind.get("Deployment", {})
for name in services:
    d = deps.get(name)
    if d is None:
        bad("deploy/k8s has no Deployment %s" % name)
        continue
    errs = []
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {}
    for ef in c.get("envFrom", []):
        cm = (ef.get("configMapRef") or {}).get("name")
        if cm is not None:
            if cm not in cms:
                errs.append("envFrom ConfigMap %s is not in deploy/k8s" % cm)
            env.update(cms.get(cm, {}))
    for e in c.get("env", []):
        env[e["name"]] = e.get("value")
    names_ok = check_names("deploy/k8s Deployment %s" % name, set(env), known[name])
    if d["spec"]["selector"]["matchLabels"].items() - d["spec"]["template"]["metadata"]["labels"].items():
        errs.append("selector does not match the pod labels")
    probes = {k: (c.get(k) or {}).get("httpGet", {}).get("path") for k in ("readinessProbe", "livenessProbe")}
    if probes != {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}:
        errs.append("probes are %r" % probes)
    grace, drain = pod.get("terminationGracePeriodSeconds"), duration(env.get("RADPIPE_DRAIN_SECONDS", 30))
    if not isinstance(grace, int) or drain is None or grace <= drain:
        errs.append("terminationGracePeriodSeconds %r is not above RADPIPE_DRAIN_SECONDS" % grace)
    if not (c.get("resources") or {}).get("requests"):
        errs.append("no resource requests")
    if pod.get("securityContext", {}).get("runAsUser") != 10001:
        errs.append("does not run as uid 10001")
    if name == "gpu-segmenter":
        lim = c.get("resources", {}).get("limits", {})
        if str(lim.get("nvidia.com/gpu")) != "1" or not (pod.get("nodeSelector") or pod.get("tolerations")):
            errs.append("no nvidia.com/gpu: 1 limit with a node selector/toleration")
    for v in pod.get("volumes", []):
        for it in (v.get("secret") or {}).get("items", []):
            if secret_keys and it["key"] not in secret_keys:
                errs.append("mounts secret key %s that secret.template.yaml lacks" % it["key"])
    if errs:
        bad("deploy/k8s Deployment %s: %s" % (name, "; ".join(errs)))
    elif names_ok:
        ok("deploy/k8s Deployment %s: known variables, probes, grace, requests" % name)
    smoke_env(os.path.join(tmp, "env.k8s." + name), env)
hpas = by_kind.get("HorizontalPodAutoscaler", {})
targets = {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()}
if {"dicom-indexer", "storage-uploader", "gpu-segmenter"} - targets or targets - set(deps):
    bad("HorizontalPodAutoscalers target %s" % sorted(targets))
else:
    ok("HorizontalPodAutoscalers for the three workers")
svc = by_kind.get("Service", {}).get("api-gateway")
if not svc or not by_kind.get("Ingress"):
    bad("no Service and Ingress for api-gateway")
else:
    ok("Service and Ingress for api-gateway")
sys.exit(min(failed, 100))  # the number of failed checks
PY
nfail=$((nfail + $?))

# --- each service accepts the environment compose.yml and deploy/k8s give it ------------------
# Started natively with that environment (no Docker): it must get past configuration to the
# database connection, which fails at once on a closed port (RADPIPE_DB_WAIT_SECONDS=0).
echo "postgresql://radpipe@127.0.0.1:1/radpipe" >"$tmp/smoke-database-url"
: >"$tmp/smoke-kafka-options"
echo "rpt_0123456789abcdef" >"$tmp/smoke-admin-token"
for f in "$tmp"/env.compose.* "$tmp"/env.k8s.*; do
	[ -f "$f" ] || continue
	s=${f##*.}
	(
		set --
		while IFS= read -r line; do set -- "$@" "$line"; done <"$f"
		exec env -i PATH="$PATH" ASAN_OPTIONS="${ASAN_OPTIONS:-}" LSAN_OPTIONS="${LSAN_OPTIONS:-}" \
			UBSAN_OPTIONS="${UBSAN_OPTIONS:-}" "$@" timeout 30 "$bin/$s"
	) >"$f.out" 2>&1 &
done
wait
for f in "$tmp"/env.compose.* "$tmp"/env.k8s.*; do
	case "$f" in *.out) continue ;; esac
	[ -f "$f" ] || continue
	what=$(basename "$f" | sed 's/^env\.//; s/\./ /')
	if grep -q '"msg":"invalid configuration"' "$f.out"; then
		bad "$what: the service rejects its configuration:"
		grep '"msg":"invalid configuration"' "$f.out" | sed 's/^/     /'
	elif grep -q 'could not connect to database' "$f.out"; then
		ok "$what: the service accepts its configuration"
	else
		bad "$what: the service did not reach its database connection:"
		tail -n 5 "$f.out" | sed 's/^/     /'
	fi
done

# --- deploy/docker: runtime packages cover what the binaries link ----------------------------
# The test binaries link what the release ones do, plus the sanitizer runtimes; libc6,
# libgcc-s1 and libstdc++6 are in every Debian base image (apt needs them).
set --
for s in $services; do set -- "$@" "$bin/$s"; done
if pk=$(sh deploy/docker/runtime-packages.sh "$@" 2>"$tmp/rp.err"); then
	awk '/^FROM .* AS runtime/ { f = 1; next } /^FROM / { f = 0 } f' deploy/docker/Dockerfile |
		grep -v '^ *#' >"$tmp/runtime-stage"
	miss=""
	for p in $pk; do
		case "$p" in libc6 | libgcc-s1 | libstdc++6 | libasan* | libubsan* | liblsan* | libtsan*) continue ;; esac
		grep -qw -- "$p" "$tmp/runtime-stage" || miss="$miss $p"
	done
	if [ -n "$miss" ]; then
		bad "deploy/docker/Dockerfile runtime stage lacks:$miss"
	else
		ok "deploy/docker/Dockerfile runtime stage installs every library package the services link"
	fi
else
	bad "runtime-packages.sh failed: $(cat "$tmp/rp.err")"
fi

# --- .dockerignore, .gitignore, kustomize ----------------------------------------------------
miss=""
for p in .git build var tests/node/node_modules; do
	grep -qx -- "$p/\{0,1\}" .dockerignore 2>/dev/null || miss="$miss $p"
done
if [ -n "$miss" ]; then bad ".dockerignore does not exclude:$miss"; else ok ".dockerignore excludes .git build var tests/node/node_modules"; fi

if [ -d .git ] && command -v git >/dev/null 2>&1; then
	if git check-ignore -q deploy/secrets/db_password && git check-ignore -q deploy/secrets/admin_token &&
		! git check-ignore -q deploy/secrets/README.md && ! git check-ignore -q deploy/secrets/generate.sh; then
		ok ".gitignore ignores deploy/secrets/* but README.md and generate.sh"
	else
		bad ".gitignore must ignore deploy/secrets/* except README.md and generate.sh"
	fi
fi

if command -v kubectl >/dev/null 2>&1; then
	if kubectl kustomize deploy/k8s >"$tmp/kustomized.yaml" 2>"$tmp/kustomize.err"; then
		ok "kubectl kustomize deploy/k8s renders $(grep -c '^kind:' "$tmp/kustomized.yaml") objects"
	else
		bad "kubectl kustomize deploy/k8s: $(cat "$tmp/kustomize.err")"
	fi
else
	echo "skip kubectl kustomize deploy/k8s (kubectl not installed)"
fi
finish
