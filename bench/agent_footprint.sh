#!/usr/bin/env bash
# Agent footprint (issue 2): dicops-agent side by side with Prometheus
# node_exporter (Debian package prometheus-node-exporter, default
# collectors), in the same run, on loopback.
#
# Per run, both start fresh:
#  - memory (VmRSS, VmHWM from /proc/PID/status): node_exporter before any
#    scrape, after its first scrape and after SCRAPES scrapes; the agent
#    after its warm-up (first WARM_REPORTS reports) and at the end (after
#    AGENT_SECONDS more of 1 s collections, and while node_exporter was
#    scraped);
#  - CPU per collection: the agent collects and reports every second to a
#    real controller for AGENT_SECONDS; its utime+stime (/proc/PID/stat)
#    divided by the reports the controller accepted in that window
#    (dicops_reports_accepted_total). The agent's reaped children
#    (systemctl, for `services:`) are shown separately (cutime+cstime).
#    node_exporter: its utime+stime over SCRAPES sequential curl scrapes of
#    /metrics, divided by SCRAPES.
# Targets: agent RSS under half of node_exporter's; agent CPU per collection
# at most a quarter of node_exporter's CPU per scrape.
#
#     bash bench/agent_footprint.sh
#
# Each run starts after waiting for a quiet machine; a run during which other
# processes used more than DISTURBED_PCT % of a core is repeated (at most
# MAX_TRIES times, none after RETRY_UNTIL s).
#
# Knobs: RUNS=3 AGENT_SECONDS=60 SCRAPES=200 WARM_REPORTS=5 DISTURBED_PCT=10
# MAX_TRIES=2 RETRY_UNTIL=160 SERVICES="ssh, cron" (the agent's
# collect.services; SERVICES= for none) NODE_EXPORTER=/usr/bin/prometheus-node-exporter
# SKIP_BUILD=1 KEEP=1
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# Defaults of this script, before lib.sh sets its own.
MAX_TRIES=${MAX_TRIES:-2}
RETRY_UNTIL=${RETRY_UNTIL:-160}
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

RUNS=${RUNS:-3}
AGENT_SECONDS=${AGENT_SECONDS:-60}
SCRAPES=${SCRAPES:-200}
WARM_REPORTS=${WARM_REPORTS:-5}
NODE_EXPORTER=${NODE_EXPORTER:-/usr/bin/prometheus-node-exporter}
SERVICES=${SERVICES-ssh, cron}

[[ -x "$NODE_EXPORTER" ]] || die "$NODE_EXPORTER not found (apt-get install prometheus-node-exporter)"

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

build_release
SECONDS=0
WORK=$(mktemp -d /tmp/dicops-bench-agent.XXXXXX)
PKI=$WORK/pki
"$BIN/dicops" pki init --dir "$PKI" >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --controller >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --operator bench >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --agent fp0001 >/dev/null
mkdir -p "$WORK/backups" "$WORK/replicas"

machine_summary
echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && git diff --quiet HEAD -- . ':!bench' 2>/dev/null || echo ' (with uncommitted changes)')"
echo "node_exporter: $("$NODE_EXPORTER" --version 2>&1 | head -1)"
echo "agent: collect.interval 1s, services [$SERVICES], 2 paths"
if systemctl show --property=ActiveState ssh >/dev/null 2>&1; then
    echo "systemd: answers (services are real)"
else
    echo "systemd: not running here; systemctl fails at once and the agent reports its services as unknown"
fi
echo

CPORT=$(free_port)
write_controller_config "$WORK/controller.yaml" "$CPORT" 1 fp 1s
start_controller "$WORK/controller.yaml" "$WORK/controller.log"
CTL=$CONTROLLER_PID

cat >"$WORK/agent.yaml" <<EOF
id: fp0001
controller:
  url: https://127.0.0.1:$CPORT
state_dir: $WORK/agent-state
tls:
  ca: $PKI/ca.pem
  cert: $PKI/agent-fp0001.pem
  key: $PKI/agent-fp0001-key.pem
collect:
  interval: 1s
  services: [$SERVICES]
  paths: [$WORK/backups, $WORK/replicas]
EOF

accepted() {
    op_curl "https://127.0.0.1:$CPORT/metrics" | awk '$1 == "dicops_reports_accepted_total" { print $2 }'
}

# Waits until the controller has accepted $1 reports in total.
wait_accepted() {
    local want=$1 i
    for i in $(seq 600); do
        (($(accepted) >= want)) && return 0
        kill -0 "$AGENT" 2>/dev/null || die "the agent exited; see $WORK/agent-$run.log"
        sleep 0.1
    done
    die "the controller did not accept $want reports within 60 s"
}

# Waits until something listens on 127.0.0.1:$1, without sending a request.
wait_listening() {
    local i
    for i in $(seq 100); do
        ss -ltnH "sport = :$1" 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    die "nothing listens on port $1"
}

a_rss0=() a_hwm0=() a_rss1=() a_hwm1=() a_cpu=() a_child=() a_reports=()
n_rss0=() n_hwm0=() n_rss1=() n_hwm1=() n_cpu=() n_lat=() others_a=() others_n=()
n_rss01=() r_rss0=() r_rss01=() r_rss1=() r_hwm1=() r_cpu=() r_cpu_all=()
# One run; sets the figures used below and DISTURBED_BY (others' CPU, the
# larger of the two windows, % of a core).
footprint_run() {
    wait_quiet "$CTL"
    NPORT=$(free_port)
    "$NODE_EXPORTER" --web.listen-address="127.0.0.1:$NPORT" >"$WORK/node_exporter-$run.log" 2>&1 &
    NE=$!
    BENCH_PIDS+=("$NE")
    base=$(accepted)
    RUST_LOG=warn "$BIN/dicops-agent" --config "$WORK/agent.yaml" >"$WORK/agent-$run.log" 2>&1 &
    AGENT=$!
    BENCH_PIDS+=("$AGENT")
    wait_listening "$NPORT"

    # Warm-up: the agent's first reports; node_exporter untouched.
    wait_accepted $((base + WARM_REPORTS))
    read -r ar0 ah0 < <(mem_kib "$AGENT")
    read -r nr0 nh0 < <(mem_kib "$NE")
    echo "    after warm-up: agent ($WARM_REPORTS reports) VmRSS $(kib_to_mib "$ar0") MiB VmHWM $(kib_to_mib "$ah0") MiB;" \
        "node_exporter (no scrape yet) VmRSS $(kib_to_mib "$nr0") MiB VmHWM $(kib_to_mib "$nh0") MiB"

    # The agent's window: 1 s collections for AGENT_SECONDS.
    snap_a=$(mktemp) snap_b=$(mktemp)
    n0=$(accepted)
    read -r c0 k0 < <(cpu_ticks "$AGENT")
    cpu_snapshot >"$snap_a"
    sleep "$AGENT_SECONDS"
    read -r c1 k1 < <(cpu_ticks "$AGENT")
    cpu_snapshot >"$snap_b"
    n1=$(accepted)
    reports=$((n1 - n0))
    other=$(others_pct "$snap_a" "$snap_b" "$CTL,$AGENT,$NE,$$" "$AGENT_SECONDS")
    top=$(others_top "$snap_a" "$snap_b" "$CTL,$AGENT,$NE,$$")
    per=$(awk -v c=$((c1 - c0)) -v n="$reports" -v hz="$TICKS" 'BEGIN { printf "%.3f", 1000 * c / hz / n }')
    child=$(awk -v c=$((k1 - k0)) -v n="$reports" -v hz="$TICKS" 'BEGIN { printf "%.3f", 1000 * c / hz / n }')
    echo "    agent: $reports reports accepted in ${AGENT_SECONDS} s; CPU $((c1 - c0)) ticks = $per ms per collection+report" \
        "(+ $child ms in reaped children: systemctl); others ${other}% of a core [$top]"

    # node_exporter's window: SCRAPES sequential scrapes.
    cpu_snapshot >"$snap_a"
    read -r e0 _ < <(cpu_ticks "$NE")
    curl -s --max-time 10 -o "$WORK/node_exporter.prom" "http://127.0.0.1:$NPORT/metrics"
    read -r nr01 nh01 < <(mem_kib "$NE")
    echo "    node_exporter after its first scrape: VmRSS $(kib_to_mib "$nr01") MiB VmHWM $(kib_to_mib "$nh01") MiB"
    : >"$WORK/scrape-times-$run"
    t0=$(date +%s.%N)
    for ((i = 2; i <= SCRAPES; i++)); do
        curl -s --max-time 10 -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$NPORT/metrics" >>"$WORK/scrape-times-$run"
    done
    t1=$(date +%s.%N)
    read -r e1 _ < <(cpu_ticks "$NE")
    cpu_snapshot >"$snap_b"
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    other_n=$(others_pct "$snap_a" "$snap_b" "$CTL,$AGENT,$NE,$$" "$secs")
    top=$(others_top "$snap_a" "$snap_b" "$CTL,$AGENT,$NE,$$")
    rm -f "$snap_a" "$snap_b"
    nper=$(awk -v c=$((e1 - e0)) -v n="$SCRAPES" -v hz="$TICKS" 'BEGIN { printf "%.3f", 1000 * c / hz / n }')
    lat=$(stats $(awk '{ printf "%.3f\n", $1 * 1000 }' "$WORK/scrape-times-$run"))
    nseries=$(grep -vc '^#' "$WORK/node_exporter.prom" || true)
    nbytes=$(wc -c <"$WORK/node_exporter.prom")
    echo "    node_exporter: $SCRAPES scrapes ($nseries series, $nbytes bytes each); CPU $((e1 - e0)) ticks = $nper ms per scrape;" \
        "latency ms $lat; others ${other_n}% of a core (curl processes count as others) [$top]"

    read -r ar1 ah1 < <(mem_kib "$AGENT")
    read -r nr1 nh1 < <(mem_kib "$NE")
    total=$(($(accepted) - base))
    echo "    at the end: agent ($total reports) VmRSS $(kib_to_mib "$ar1") MiB VmHWM $(kib_to_mib "$ah1") MiB;" \
        "node_exporter ($SCRAPES scrapes) VmRSS $(kib_to_mib "$nr1") MiB VmHWM $(kib_to_mib "$nh1") MiB"
    echo "    resident at the end: agent $(rss_split "$AGENT"); node_exporter $(rss_split "$NE")"
    stop_pid "$AGENT"
    stop_pid "$NE"

    DISTURBED_BY=$(awk -v a="$other" -v b="$other_n" 'BEGIN { print (a > b) ? a : b }')
}

for run in $(seq "$RUNS"); do
    for try in $(seq "$MAX_TRIES"); do
        echo "--- run $run/$RUNS"
        footprint_run
        if disturbed "$DISTURBED_BY" && ((try < MAX_TRIES && SECONDS < RETRY_UNTIL)); then
            echo "    disturbed (others above ${DISTURBED_PCT}% of a core): repeating this run"
            continue
        fi
        break
    done
    a_rss0+=("$(kib_to_mib "$ar0")") a_hwm0+=("$(kib_to_mib "$ah0")")
    a_rss1+=("$(kib_to_mib "$ar1")") a_hwm1+=("$(kib_to_mib "$ah1")")
    n_rss0+=("$(kib_to_mib "$nr0")") n_hwm0+=("$(kib_to_mib "$nh0")") n_rss01+=("$(kib_to_mib "$nr01")")
    n_rss1+=("$(kib_to_mib "$nr1")") n_hwm1+=("$(kib_to_mib "$nh1")")
    a_cpu+=("$per") a_child+=("$child") a_reports+=("$reports")
    n_cpu+=("$nper") n_lat+=("$(awk '{ print $1 * 1000 }' "$WORK/scrape-times-$run" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')")
    others_a+=("$other") others_n+=("$other_n")
    r_rss0+=("$(awk -v a="$ar0" -v n="$nr0" 'BEGIN { printf "%.3f", a / n }')")
    r_rss01+=("$(awk -v a="$ar0" -v n="$nr01" 'BEGIN { printf "%.3f", a / n }')")
    r_rss1+=("$(awk -v a="$ar1" -v n="$nr1" 'BEGIN { printf "%.3f", a / n }')")
    r_hwm1+=("$(awk -v a="$ah1" -v n="$nh1" 'BEGIN { printf "%.3f", a / n }')")
    r_cpu+=("$(awk -v a="$per" -v n="$nper" 'BEGIN { printf "%.3f", a / n }')")
    r_cpu_all+=("$(awk -v a="$per" -v c="$child" -v n="$nper" 'BEGIN { printf "%.3f", (a + c) / n }')")
done

echo
echo "=== summary: median (min-max) of $RUNS runs"
echo "memory, MiB               dicops-agent                 node_exporter"
echo "  VmRSS after warm-up:    $(stats "${a_rss0[@]}")   $(stats "${n_rss0[@]}") (before any scrape)"
echo "  VmHWM after warm-up:    $(stats "${a_hwm0[@]}")   $(stats "${n_hwm0[@]}")"
echo "  VmRSS after 1 scrape:                                $(stats "${n_rss01[@]}")"
echo "  VmRSS at the end:       $(stats "${a_rss1[@]}")   $(stats "${n_rss1[@]}") (after $SCRAPES scrapes)"
echo "  VmHWM at the end:       $(stats "${a_hwm1[@]}")   $(stats "${n_hwm1[@]}")"
echo "CPU per collection, ms:   $(stats "${a_cpu[@]}")   $(stats "${n_cpu[@]}") (per scrape)"
echo "  agent's children (systemctl), ms per collection: $(stats "${a_child[@]}")"
echo "  agent reports per window: $(stats "${a_reports[@]}"); node_exporter median scrape latency ms: $(stats "${n_lat[@]}")"
echo "others' CPU, % of a core: agent window $(stats "${others_a[@]}"); scrape window $(stats "${others_n[@]}")"
echo "ratios agent / node_exporter (per run):"
echo "  VmRSS after warm-up / before any scrape: $(stats "${r_rss0[@]}")   (target < 0.5)"
echo "  VmRSS after warm-up / after 1 scrape:    $(stats "${r_rss01[@]}")   (target < 0.5)"
echo "  VmRSS at the end:                        $(stats "${r_rss1[@]}")   (target < 0.5)"
echo "  VmHWM at the end:                        $(stats "${r_hwm1[@]}")"
echo "  CPU per collection / per scrape:         $(stats "${r_cpu[@]}")   (target <= 0.25)"
echo "  same, counting the agent's systemctl children: $(stats "${r_cpu_all[@]}")"
