#!/usr/bin/env bash
# A second RabbitMQ node of its own for the chaos soak, so its broker restart (stop_app/start_app)
# disturbs nobody else's broker.
#
#   tests/chaos/own_broker.sh start    # node soak@localhost on 127.0.0.1:5679
#   tests/chaos/own_broker.sh stop     # stops that node only, and waits until its process is gone
#
# Then:  CHAOS_NODE=soak@localhost \
#        .venv/bin/python -m tests.chaos.soak --url amqp://guest:guest@127.0.0.1:5679/
#
# Overridable: CHAOS_NODE (soak@localhost), CHAOS_PORT (5679), CHAOS_BASE (/tmp/soak-rmq).
set -euo pipefail

NODE="${CHAOS_NODE:-soak@localhost}"
PORT="${CHAOS_PORT:-5679}"
BASE="${CHAOS_BASE:-/tmp/soak-rmq}"
PATH="$PATH:/usr/sbin"

if [[ "$NODE" == "rabbit@localhost" ]]; then
    echo "refusing to manage the default node $NODE" >&2
    exit 2
fi

export RABBITMQ_NODENAME="$NODE"
export RABBITMQ_NODE_PORT="$PORT"
export RABBITMQ_DIST_PORT="$((PORT + 20000))"
export RABBITMQ_MNESIA_BASE="$BASE/mnesia"
export RABBITMQ_LOG_BASE="$BASE/log"
export RABBITMQ_PID_FILE="$BASE/node.pid"
# The system's rabbitmq-env.conf names the default node: this node reads an env file of its own.
export RABBITMQ_CONF_ENV_FILE="$BASE/env.conf"
export RABBITMQ_ENABLED_PLUGINS_FILE="$BASE/enabled_plugins"
export RABBITMQ_CONFIG_FILE="$BASE/rabbitmq"  # .conf is appended

node_pid() {
    [[ -s "$BASE/node.pid" ]] && cat "$BASE/node.pid"
}

case "${1:-}" in
start)
    mkdir -p "$BASE/mnesia" "$BASE/log"
    cat >"$BASE/env.conf" <<'EOF'
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
    echo '[].' >"$BASE/enabled_plugins"
    cat >"$BASE/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$PORT
loopback_users = none
EOF
    if id rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq:rabbitmq "$BASE"
    fi
    if rabbitmqctl -n "$NODE" status >/dev/null 2>&1; then
        echo "$NODE already running (pid $(node_pid || echo '?'))"
        exit 0
    fi
    rabbitmq-server -detached
    rabbitmqctl -n "$NODE" wait --timeout 120 "$BASE/node.pid" >/dev/null
    rabbitmqctl -n "$NODE" await_startup --timeout 120 >/dev/null
    echo "$NODE up on 127.0.0.1:$PORT (pid $(node_pid))"
    ;;
stop)
    pid="$(node_pid || true)"
    rabbitmqctl -n "$NODE" stop >/dev/null 2>&1 || true
    if [[ -n "$pid" ]]; then
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$NODE (pid $pid) still running" >&2
            exit 1
        fi
    fi
    echo "$NODE stopped"
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
