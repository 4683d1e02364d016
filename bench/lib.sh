# Shared helpers of the benchmark scripts (sourced, not run).
#
# Process bookkeeping: every process a script starts goes into BENCH_PIDS and
# is stopped by bench_cleanup (registered with trap by the script).

BENCH_PIDS=()
TICKS=$(getconf CLK_TCK 2>/dev/null || echo 100)

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    BENCH_PIDS=()
    if [[ -n "${WORK:-}" && -d "$WORK" && -z "${KEEP:-}" ]]; then
        rm -rf "$WORK"
    elif [[ -n "${WORK:-}" ]]; then
        log "kept $WORK"
    fi
}

# Stops one process started by this script.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for i in "${BENCH_PIDS[@]}"; do
        [[ "$i" == "$pid" ]] || kept+=("$i")
    done
    BENCH_PIDS=("${kept[@]}")
}

# Forgets a pid that has exited by itself.
forget_pid() {
    local kept=() i
    for i in "${BENCH_PIDS[@]}"; do
        [[ "$i" == "$1" ]] || kept+=("$i")
    done
    BENCH_PIDS=("${kept[@]}")
}

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((20000 + RANDOM % 40000))
        if ! ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}

# Builds the binaries (unless SKIP_BUILD=1) and sets BIN.
build_release() {
    local target=${CARGO_TARGET_DIR:-$ROOT/target}
    if [[ -z "${SKIP_BUILD:-}" ]]; then
        log "building release binaries (cargo build --release --bins; -p dicops-bench)"
        (cd "$ROOT" && cargo build --release --bins -q && cargo build --release -p dicops-bench -q)
    fi
    BIN=$target/release
    local b
    for b in dicops dicops-agent dicops-controller report-load; do
        [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing (build it, or unset SKIP_BUILD)"
    done
}

# `pid ticks` (utime+stime) for every process.
# Read through cat: awk given the files itself stops at the first process
# that exits while it reads, and every process after it in the list would
# then count whole in the next difference.
cpu_snapshot() {
    cat /proc/[0-9]*/stat 2>/dev/null |
        awk '{ line = $0; pid = $1; sub(/^.*\) /, "", line); split(line, f, " ");
               print pid, f[12] + f[13] }' || true
}

# CPU ticks used between two snapshots by processes not in the
# comma-separated pid list $3 (a process new in the second snapshot counts
# whole).
others_ticks() {
    awk -v ex="$3" 'BEGIN { n = split(ex, e, ","); for (i = 1; i <= n; i++) skip[e[i]] = 1 }
        FNR == NR { before[$1] = $2; next }
        !($1 in skip) { d = $2 - (($1 in before) ? before[$1] : 0); if (d > 0) t += d }
        END { print t + 0 }' "$1" "$2"
}

# The busiest other processes between two snapshots (for the log).
others_top() {
    local a=$1 b=$2 ex=$3
    awk -v ex="$ex" 'BEGIN { n = split(ex, e, ","); for (i = 1; i <= n; i++) skip[e[i]] = 1 }
        FNR == NR { before[$1] = $2; next }
        !($1 in skip) { d = $2 - (($1 in before) ? before[$1] : 0); if (d > 0) print d, $1 }' "$a" "$b" |
        sort -rn | head -3 | while read -r d pid; do
            printf '%s(%s)=%s ' "$(cat "/proc/$pid/comm" 2>/dev/null || echo gone)" "$pid" "$d"
        done
}

# Waits until processes other than ours (comma-separated pids $1) use less
# than 10% of a core over 3 s; gives up after 90 s and says so.
wait_quiet() {
    local ex=${1:-} a b t start=$SECONDS
    a=$(mktemp) b=$(mktemp)
    while :; do
        cpu_snapshot >"$a"
        sleep 3
        cpu_snapshot >"$b"
        t=$(others_ticks "$a" "$b" "$ex,$$,$BASHPID")
        if ((t * 100 < 10 * 3 * TICKS)); then
            rm -f "$a" "$b"
            return 0
        fi
        if ((SECONDS - start > 90)); then
            log "machine not quiet after 90 s (others used $t ticks in 3 s: $(others_top "$a" "$b" "$ex")); measuring anyway"
            rm -f "$a" "$b"
            return 0
        fi
        log "waiting for a quiet machine (others: $((t * 100 / (3 * TICKS)))% of a core: $(others_top "$a" "$b" "$ex"))"
    done
}

# Other processes' CPU between two snapshots over `seconds`, as % of a core.
others_pct() {
    local a=$1 b=$2 ex=$3 seconds=$4 t
    t=$(others_ticks "$a" "$b" "$ex")
    awk -v t="$t" -v s="$seconds" -v hz="$TICKS" 'BEGIN { printf "%.1f", (s > 0) ? 100 * t / hz / s : 0 }'
}

# "median (min-max)" of numbers given as arguments.
stats() {
    printf '%s\n' "$@" | { grep . || true; } | sort -g | awk '
        function f(x) { return (x >= 100 || x <= -100) ? sprintf("%.0f", x) : (x >= 10 || x <= -10) ? sprintf("%.1f", x) : sprintf("%.2f", x) }
        { v[NR] = $1 } END {
        if (NR == 0) { print "n/a"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
        printf "%s (%s-%s)", f(m), f(v[1]), f(v[NR]) }'
}

# Busy and total jiffies of the whole machine (all CPUs, from /proc/stat).
machine_jiffies() {
    awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}

# Busy share of the whole machine between two machine_jiffies outputs, as a
# percentage of all CPUs.
busy_pct() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
        printf "%.0f", (y[2] > x[2]) ? 100 * (y[1] - x[1]) / (y[2] - x[2]) : 0 }'
}

# Other processes may use at most this share of one core during a measured
# run (%); a run above it is repeated (at most MAX_TRIES times in all, and
# not after RETRY_UNTIL seconds of the script, to bound its runtime).
DISTURBED_PCT=${DISTURBED_PCT:-10}
MAX_TRIES=${MAX_TRIES:-3}
RETRY_UNTIL=${RETRY_UNTIL:-200}
disturbed() { awk -v o="$1" -v m="$DISTURBED_PCT" 'BEGIN { exit !(o > m) }'; }

# Value of key $2 in a `RESULT k=v ...` line $1.
field() {
    tr ' ' '\n' <<<"$1" | awk -F= -v k="$2" '$1 == k { print $2 }'
}

# VmRSS and VmHWM of a pid, in KiB: "rss hwm".
mem_kib() {
    awk '/^VmRSS:/ { r = $2 } /^VmHWM:/ { h = $2 } END { print r, h }' "/proc/$1/status"
}

# utime+stime and cutime+cstime of a pid, in ticks: "own children".
cpu_ticks() {
    awk '{ line = $0; sub(/^.*\) /, "", line); split(line, f, " ");
           print f[12] + f[13], f[14] + f[15] }' "/proc/$1/stat"
}

# RssAnon and RssFile of a pid, as "anon A MiB + file F MiB".
rss_split() {
    awk '/^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 } /^RssShmem:/ { s = $2 }
        END { printf "anon %.1f + file %.1f + shmem %.1f MiB", a / 1024, f / 1024, s / 1024 }' "/proc/$1/status"
}

kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# The machine, for the record.
machine_summary() {
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'),"\
        "$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, kernel $(uname -r)"
}

# curl with the operator certificate.
op_curl() {
    curl -s --max-time 10 --cacert "$PKI/ca.pem" --cert "$PKI/operator-bench.pem" \
        --key "$PKI/operator-bench-key.pem" "$@"
}

# Waits until the controller at port $1 answers /readyz.
wait_ready() {
    local port=$1 pid=$2 i
    for i in $(seq 200); do
        if [[ "$(op_curl "https://127.0.0.1:$port/readyz" 2>/dev/null)" == ready* ]]; then
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || die "the controller exited; see its log"
        sleep 0.1
    done
    die "the controller did not become ready within 20 s"
}

# Writes a controller config listening on port $2 with agents
# ${prefix}0001..${prefix}$3, the first half in dc1 and the rest in dc2, and
# a fresh SQLite database next to the file.
write_controller_config() {
    local file=$1 port=$2 agents=$3 prefix=${4:-sim} interval=${5:-15s} i
    rm -f "${file%.yaml}.db" "${file%.yaml}.db-wal" "${file%.yaml}.db-shm"
    {
        printf 'listen: 127.0.0.1:%s\n' "$port"
        printf 'state:\n  database: %s\n' "${file%.yaml}.db"
        printf 'tls:\n  ca: %s/ca.pem\n  cert: %s/controller.pem\n  key: %s/controller-key.pem\n' "$PKI" "$PKI" "$PKI"
        printf 'health:\n  report_interval: %s\n  down_after_missed_reports: 3\n' "$interval"
        printf 'sites:\n  - name: dc1\n    description: first site\n  - name: dc2\n    description: second site\n'
        printf 'agents:\n'
        for ((i = 1; i <= agents; i++)); do
            printf '  - id: %s%04d\n    site: %s\n' "$prefix" "$i" "$([[ $((i * 2)) -le $agents ]] && echo dc1 || echo dc2)"
        done
    } >"$file"
}

# Starts a controller with config $1, logging to $2; sets CONTROLLER_PID.
start_controller() {
    local config=$1 logfile=$2 port
    port=$(awk '/^listen:/ { n = split($2, a, ":"); print a[n] }' "$config")
    RUST_LOG=${RUST_LOG:-warn} "$BIN/dicops-controller" --config "$config" >"$logfile" 2>&1 &
    CONTROLLER_PID=$!
    BENCH_PIDS+=("$CONTROLLER_PID")
    wait_ready "$port" "$CONTROLLER_PID"
}
