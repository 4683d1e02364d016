#!/usr/bin/env bash
# Scale (issue 8): one controller under 2,000 and then 10,000 simulated
# agents, each with its own certificate and kept-alive mutual-TLS
# connection, posting real reports (bench/src/bin/report-load.rs). For each
# size, bench/controller.sh measures
#   - ingest throughput (reports/s accepted, 64 in flight) and p99 latency;
#   - controller VmRSS idle and with every agent connected and reported,
#     from which memory per agent is (with - idle) / agents;
#   - GET /metrics: body size, series, and render time (client and the
#     controller's own handler histogram).
# The load generator shares the 2 cores with the controller. From the
# repository:
#
#     bash bench/scale.sh
#
# Knobs: SCALE_AGENTS="2000 10000" RUNS=3 RENDERS=20 LOAD_SECONDS=15
# SKIP_BUILD=1 (and bench/controller.sh's own).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# One descriptor per connection in each process (the controller, the load
# generator), and then some: as many as the hard limit allows.
ulimit -n "$(ulimit -Hn)"
for agents in ${SCALE_AGENTS:-2000 10000}; do
    if (( $(ulimit -n) < agents + 1000 )); then
        echo "scale.sh: $agents agents need $((agents + 1000)) open files per process, the limit here is $(ulimit -n)" >&2
        exit 1
    fi
    echo "=================== $agents agents"
    RUNS=${RUNS:-3} LOAD_AGENTS=$agents LOAD_CONCURRENCY=64 RENDER_AGENTS=$agents \
        RENDERS=${RENDERS:-20} bash "$ROOT/bench/controller.sh"
    # Built once: the second size reuses the first one's build.
    export SKIP_BUILD=1
done
