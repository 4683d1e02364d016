#!/usr/bin/env bash
# Replication: dicops side by side with `rsync -a` over ssh, in the same run,
# on loopback (127.0.0.1 only).
#
# dicops: a controller and two agents started from real configs and a real
# PKI (`dicops pki init/issue`): src01 in site dc1 serves an export on its
# data port, dst01 in site dc2 pulls it into a root; one replication job per
# run, without schedule, started with `dicops run JOB --follow`. Bytes on the
# wire: the run record (`dicops show RUN --json`: RunInfo.bytes, the chunk
# answers' bodies as they crossed, after zstd); its output_tail is printed.
#
# rsync: `rsync -a --stats -e "ssh -p PORT -i KEY -o StrictHostKeyChecking=no
# -o UserKnownHostsFile=/dev/null" SRC/ root@127.0.0.1:DST/` (a push; bytes
# sent: `Total bytes sent` of --stats) to a private sshd started by this
# script on a free loopback port, with its own host key and an authorized
# key for root; the system's sshd and its config are not touched. rsync's
# target is its own folder that persists across scenarios, as dicops's
# snapshots do.
#
# Both: wall clock of the command; then `sync` timed as a second figure
# (dicops fsyncs every file before it publishes, rsync does not). A second
# byte count for both is the TCP payload on the connection of each tool
# (ss -ti bytes_sent/bytes_received of the client's socket, sampled every
# 0.2 s: TLS or ssh framing included, both directions).
#
# Scenarios, each for both tools, each run (RUNS) with its own source copy
# (hard links to one generated tree), its own dicops job and rsync folder:
#  1. fresh copy: BIG_FILES x BIG_MIB MiB incompressible (openssl aes-128-ctr
#     keystream) + SMALL_FILES text-like files of SMALL_MIN..SMALL_MAX bytes;
#  2. re-sync, nothing changed;
#  3. re-sync after SMALL_CHANGED_PCT % of the small files had 1 KiB
#     overwritten and one large file got APPEND_MIB MiB appended;
#     (untimed: yesterday's DUMP_MIB MiB dump, text rows that zstd shrinks
#     about 3x, is added twice: dumps/db-2026-11-27.dump and
#     2026-11-27/db.dump, and copied by both tools)
#  4. a new dump under a new name, dumps/db-2026-11-28.dump: DUMP_CHANGED_PCT
#     % of its 1 MiB blocks rewritten; dicops, rsync and rsync --fuzzy (plain
#     rsync writes into a hard-linked clone of rsync's folder);
#  5. the same kind of dump in a new dated folder, 2026-11-28/db.dump beside
#     2026-11-27/db.dump, other blocks changed: dicops and rsync --fuzzy
#     (which finds no basis in a new folder);
#  6. a tree of TREE_FILES small files (TREE_MIN..TREE_MAX bytes): both
#     agents restarted first, then peak memory (VmHWM) of both agents after
#     the fresh copy and after an unchanged re-sync, and the time; rsync's
#     processes' VmHWM (sender; receiver and generator) sampled every 0.2 s.
#
# Before every timed run: wait for a quiet machine (bench/lib.sh wait_quiet),
# record `uptime`'s load, re-read the source and the tool's destination
# (cat > /dev/null: warm page cache), and after it record the CPU other
# processes used (not this script's process tree). The order of the two
# tools alternates from one run to the next. Deleting many files makes the
# next file creations on this ext4 several times slower for minutes (see
# /work/shared/BENCHMARKING.md); dicops deletes its staged chunk files (one
# per fetched chunk) after each publish, so each fresh copy starts at least
# REST_AFTER_DELETE s after the last dicops fresh copy ended.
#
#     bash bench/replication.sh                   # builds with cargo build --release first
#     SKIP_BUILD=1 bash bench/replication.sh      # reuses target/release (or $CARGO_TARGET_DIR/release)
#     DICOPS_BIN_DIR=/path/to/release bash bench/replication.sh
#
# Knobs: RUNS=3 BIG_FILES=4 BIG_MIB=512 SMALL_FILES=20000 SMALL_MIN=2048
# SMALL_MAX=8192 SMALL_CHANGED_PCT=1 APPEND_MIB=16 DUMP_MIB=1024
# DUMP_CHANGED_PCT=5 TREE_FILES=200000 TREE_MIN=512 TREE_MAX=4096 (TREE_FILES=0
# skips scenario 6) REST_AFTER_DELETE=0 DISTURBED_PCT=10 WORK_PARENT=/tmp
# KEEP=1 (keep the work folder; the large files of finished runs are still
# deleted as the script goes, to bound the disk space to about 20 GB)
# SKIP_INSTALL=1 (do not apt-get install rsync/openssh-server/openssh-client).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

RUNS=${RUNS:-3}
BIG_FILES=${BIG_FILES:-4}
BIG_MIB=${BIG_MIB:-512}
SMALL_FILES=${SMALL_FILES:-20000}
SMALL_MIN=${SMALL_MIN:-2048}
SMALL_MAX=${SMALL_MAX:-8192}
SMALL_CHANGED_PCT=${SMALL_CHANGED_PCT:-1}
APPEND_MIB=${APPEND_MIB:-16}
DUMP_MIB=${DUMP_MIB:-1024}
DUMP_CHANGED_PCT=${DUMP_CHANGED_PCT:-5}
TREE_FILES=${TREE_FILES:-200000}
TREE_MIN=${TREE_MIN:-512}
TREE_MAX=${TREE_MAX:-4096}
REST_AFTER_DELETE=${REST_AFTER_DELETE:-0}
WORK_PARENT=${WORK_PARENT:-/tmp}

SMALL_CHANGED=$(((SMALL_FILES * SMALL_CHANGED_PCT + 50) / 100))
DUMP_CHANGED=$(((DUMP_MIB * DUMP_CHANGED_PCT + 50) / 100))

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# Tools, binaries, work folder
# ---------------------------------------------------------------------------

need_install=()
command -v rsync >/dev/null || need_install+=(rsync)
[[ -x /usr/sbin/sshd ]] || need_install+=(openssh-server)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need_install+=(openssh-client)
for tool in openssl perl ss; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
if ((${#need_install[@]})); then
    [[ -z "${SKIP_INSTALL:-}" ]] || die "missing: ${need_install[*]} (SKIP_INSTALL is set)"
    ((EUID == 0)) || die "missing: ${need_install[*]}; run as root or install them (apt-get install ${need_install[*]})"
    log "installing ${need_install[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_install[@]}" >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_install[@]}" >/dev/null; } ||
        die "apt-get install ${need_install[*]} failed"
fi
perl -MJSON::PP -e 1 2>/dev/null || die "perl's JSON::PP is missing (Debian: perl-modules)"

if [[ -n "${DICOPS_BIN_DIR:-}" ]]; then
    BIN=$(cd "$DICOPS_BIN_DIR" && pwd)
else
    if [[ -z "${SKIP_BUILD:-}" ]]; then
        log "building (cargo build --release in $ROOT)"
        (cd "$ROOT" && cargo build --release -q)
    fi
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
for b in dicops dicops-agent dicops-controller; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing (build it, unset SKIP_BUILD, or set DICOPS_BIN_DIR)"
done

WORK=$(mktemp -d "$WORK_PARENT/dicops-bench-replication.XXXXXX")
SECONDS=0
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/gen" "$WORK/src" "$WORK/dicops" "$WORK/rsync" "$WORK/rsync-plain"
PKI=$WORK/pki
CLI=$WORK/cli.yaml

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

now() { echo "$EPOCHREALTIME"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b != 0) ? a / b : 0 }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

declare -A R          # "key" -> space-separated values, one per run
add() { R[$1]="${R[$1]:-}$2 "; }
st() { stats ${R[$1]:-}; }      # median (min-max)
# shellcheck disable=SC2086
med() { printf '%s\n' ${R[$1]:-} | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print 0; exit } print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# The pids of this script's process tree (the script, its daemons, rsync,
# ssh, sshd and their children) from a snapshot "pid ticks ppid".
tree_snapshot() {
    awk '{ line = $0; pid = $1; sub(/^.*\) /, "", line); split(line, f, " ");
           print pid, f[12] + f[13] + f[14] + f[15], f[2] }' /proc/[0-9]*/stat 2>/dev/null || true
}
# CPU (% of one core) used between snapshots $1 and $2 ($3 seconds apart) by
# processes outside this script's tree (a process new in $2 counts whole; a
# parent's reaped children count through its cutime).
others_outside() {
    awk -v me="$$" -v s="$3" -v hz="$TICKS" '
        FNR == NR { before[$1] = $2; next }
        { ticks[$1] = $2; parent[$1] = $3 }
        END {
            for (p in ticks) {
                q = p; mine = 0
                for (i = 0; i < 64 && q > 1; i++) { if (q == me) { mine = 1; break } q = parent[q] }
                if (mine) continue
                d = ticks[p] - ((p in before) ? before[p] : 0)
                if (d > 0) t += d
            }
            printf "%.1f", (s > 0) ? 100 * t / hz / s : 0
        }' "$1" "$2"
}
others_outside_top() {
    awk -v me="$$" '
        FNR == NR { before[$1] = $2; next }
        { ticks[$1] = $2; parent[$1] = $3 }
        END {
            for (p in ticks) {
                q = p; mine = 0
                for (i = 0; i < 64 && q > 1; i++) { if (q == me) { mine = 1; break } q = parent[q] }
                if (mine) continue
                d = ticks[p] - ((p in before) ? before[p] : 0)
                if (d > 0) print d, p
            }
        }' "$1" "$2" | sort -rn | head -3 | while read -r d pid; do
        printf '%s=%s ' "$(cat "/proc/$pid/comm" 2>/dev/null || echo gone)" "$d"
    done
}

# TCP meter: samples `ss -ti` for connections to 127.0.0.1:$1 every 0.2 s.
meter_start() {
    local port=$1 out=$2
    (
        while :; do
            ss -tinHO state all "( sport = :$port or dport = :$port )" 2>/dev/null || true
            sleep 0.2
        done
    ) >"$out" &
    METER=$!
    BENCH_PIDS+=("$METER")
}
# Prints "client_sent client_received": bytes the client ends (local port
# other than $1) sent and received, the highest value seen per connection.
meter_stop() {
    local port=$1 out=$2
    stop_pid "$METER"
    awk -v port="$port" '{
            n = 0
            for (i = 1; i <= NF && n < 2; i++) if ($i ~ /^(\[.*\]|[0-9.]+):[0-9]+$/) a[++n] = $i
            if (n < 2) next
            split(a[1], l, ":"); if (l[length(l)] == port) next
            key = a[1] " " a[2]
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^bytes_sent:/) { split($i, v, ":"); if (v[2] + 0 > s[key]) s[key] = v[2] + 0 }
                if ($i ~ /^bytes_received:/) { split($i, v, ":"); if (v[2] + 0 > r[key]) r[key] = v[2] + 0 }
            }
        }
        END { for (k in s) ts += s[k]; for (k in r) tr += r[k]; printf "%d %d\n", ts, tr }' "$out"
}

# Re-reads files so that the page cache is warm.
warm() {
    local d
    for d in "$@"; do
        [[ -e "$d" ]] || continue
        find -L "$d" -type f -print0 2>/dev/null | xargs -0 -r cat >/dev/null 2>&1 || true
    done
}

# Before a timed run: quiet machine, load, warm caches; starts the CPU
# window. Sets LOAD and SNAP_A.
before_run() {
    wait_quiet "$(daemon_pids)"
    LOAD=$(load)
    warm "$@"
    SNAP_A=$(mktemp)
    tree_snapshot >"$SNAP_A"
    T0=$(now)
}
# After a timed run: wall time T, others' CPU OTHERS (and OTHERS_TOP).
after_run() {
    T1=$(now)
    local b
    b=$(mktemp)
    tree_snapshot >"$b"
    T=$(sub "$T1" "$T0")
    OTHERS=$(others_outside "$SNAP_A" "$b" "$T")
    OTHERS_TOP=$(others_outside_top "$SNAP_A" "$b")
    rm -f "$SNAP_A" "$b"
    local s0
    s0=$(now)
    sync
    SYNC_T=$(sub "$(now)" "$s0")
}

# The generators: text-like small files, dump blocks, changes.
cat >"$WORK/gen.pl" <<'PERL'
use strict; use warnings;
my @w = qw(alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
  oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu host port user timeout
  retries path level enabled disabled cache size limit interval backup replica site primary);
my @st = qw(paid pending shipped refunded cancelled on-hold);
sub text { my ($size) = @_; my $b = '';
  while (length($b) < $size) {
    $b .= sprintf("%s.%s = %d   # %s %s %s\n", $w[int(rand(@w))], $w[int(rand(@w))], int(rand(1000000)),
      $w[int(rand(@w))], $w[int(rand(@w))], $w[int(rand(@w))]);
  }
  return substr($b, 0, $size);
}
sub block { my ($seed, $i) = @_; srand($seed * 1000003 + $i); my $b = ''; my $id = $i * 20000;
  while (length($b) < 1048576) { $id++;
    $b .= sprintf("%d\tcustomer-%06d\t%.2f\t%s\t2026-11-%02d %02d:%02d:%02d+07\t%s %s %d\n", $id, int(rand(900000)),
      rand(5000), $st[int(rand(6))], 1 + int(rand(28)), int(rand(24)), int(rand(60)), int(rand(60)),
      $w[int(rand(@w))], $w[int(rand(@w))], int(rand(100000)));
  }
  return substr($b, 0, 1048576);
}
sub files { my ($dir) = @_; my @out; my @todo = ($dir);
  while (@todo) { my $d = shift @todo; opendir(my $dh, $d) or die "$d: $!";
    for my $e (sort grep { !/^\.\.?$/ } readdir $dh) { my $p = "$d/$e"; if (-d $p) { push @todo, $p } elsif (-f $p) { push @out, $p } }
  }
  return sort @out;
}
my $cmd = shift @ARGV;
if ($cmd eq 'small') {            # DIR COUNT SEED MIN MAX: COUNT files, 100 per folder
  my ($dir, $n, $seed, $min, $max) = @ARGV; srand($seed); my $total = 0;
  for my $i (0 .. $n - 1) {
    my $d = sprintf("%s/d%04d", $dir, int($i / 100)); mkdir $d unless -d $d;
    my $size = $min + int(rand($max - $min + 1));
    open(my $f, '>', sprintf("%s/f%06d.conf", $d, $i)) or die $!; print $f text($size); close $f; $total += $size;
  }
  print "$total\n";
} elsif ($cmd eq 'dump') {        # OUT SEED BLOCKS
  my ($out, $seed, $n) = @ARGV; open(my $f, '>', $out) or die $!; binmode $f;
  print $f block($seed, $_) for 0 .. $n - 1; close $f or die $!;
} elsif ($cmd eq 'patch') {       # FILE SEED BLOCKS COUNT: rewrites COUNT distinct 1 MiB blocks
  my ($file, $seed, $n, $count) = @ARGV; srand($seed); my %pick;
  $pick{int(rand($n))} = 1 while keys(%pick) < $count;
  open(my $f, '+<', $file) or die $!; binmode $f;
  for my $i (sort { $a <=> $b } keys %pick) { seek($f, $i * 1048576, 0) or die; print $f block($seed + 7919, $i); }
  close $f or die $!;
  print join(',', sort { $a <=> $b } keys %pick), "\n";
} elsif ($cmd eq 'touch') {       # DIR COUNT SEED: 1 KiB overwritten in COUNT files (new inode: temp + rename)
  my ($dir, $count, $seed) = @ARGV; srand($seed); my @all = files($dir); my %pick; my $changed = 0;
  $pick{int(rand(@all))} = 1 while keys(%pick) < $count && keys(%pick) < @all;
  for my $i (sort { $a <=> $b } keys %pick) {
    my $p = $all[$i]; open(my $in, '<', $p) or die $!; local $/; my $c = <$in>; close $in;
    my $len = length($c) < 1024 ? length($c) : 1024; my $off = int(rand(length($c) - $len + 1));
    substr($c, $off, $len) = text($len);
    my $mode = (stat($p))[2] & 07777;
    open(my $o, '>', "$p.tmp") or die $!; print $o $c; close $o; chmod $mode, "$p.tmp"; rename("$p.tmp", $p) or die $!;
    $changed += $len;
  }
  print "$changed\n";
} elsif ($cmd eq 'rsync-mem') {   # SCRIPT_PID STOPFILE: VmHWM of rsync processes in the tree of SCRIPT_PID
  my ($me, $stop) = @ARGV; my %hwm; my %ppid;
  while (1) {
    my $last = -e $stop; my %parent; my %comm;
    opendir(my $dh, '/proc') or die;
    for my $p (grep { /^\d+$/ } readdir $dh) {
      open(my $s, '<', "/proc/$p/stat") or next; my $l = <$s>; close $s; next unless defined $l;
      $l =~ /^\d+ \((.*)\) \S+ (\d+)/ or next; $comm{$p} = $1; $parent{$p} = $2;
    }
    for my $p (grep { $comm{$_} eq 'rsync' } keys %comm) {
      my $q = $p; my $mine = 0;
      for (1 .. 64) { last unless $q && $q > 1; if ($q == $me) { $mine = 1; last } $q = $parent{$q} // 0 }
      next unless $mine;
      open(my $s, '<', "/proc/$p/status") or next;
      while (<$s>) { if (/^VmHWM:\s+(\d+)/) { $hwm{$p} = $1 if !$hwm{$p} || $1 > $hwm{$p} } }
      close $s; $ppid{$p} = $parent{$p};
    }
    last if $last;
    select(undef, undef, undef, 0.2);
  }
  print "$_ $ppid{$_} $hwm{$_}\n" for sort { $a <=> $b } keys %hwm;
}
PERL
genpl() { perl "$WORK/gen.pl" "$@"; }

# ---------------------------------------------------------------------------
# The two tools
# ---------------------------------------------------------------------------

SSH_DIR=$WORK/ssh
mkdir -p "$SSH_DIR"
chmod 700 "$SSH_DIR"
ssh-keygen -q -t ed25519 -N '' -C dicops-bench-host -f "$SSH_DIR/host_key"
ssh-keygen -q -t ed25519 -N '' -C dicops-bench-client -f "$SSH_DIR/client_key"
cp "$SSH_DIR/client_key.pub" "$SSH_DIR/authorized_keys"
chmod 600 "$SSH_DIR/authorized_keys"
SSH_PORT=$(free_port)
cat >"$SSH_DIR/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_DIR/host_key
PidFile $SSH_DIR/sshd.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
EOF
# sshd needs its privilege separation folder (the package's init script
# makes it at boot).
[[ -d /run/sshd ]] || mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$SSH_DIR/sshd_config" -E "$WORK/logs/sshd.log" &
SSHD=$!
BENCH_PIDS+=("$SSHD")
RSH="ssh -p $SSH_PORT -i $SSH_DIR/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
for i in $(seq 50); do
    $RSH root@127.0.0.1 true 2>/dev/null && break
    ((i < 50)) || die "the private sshd on port $SSH_PORT does not answer; see $WORK/logs/sshd.log"
    sleep 0.1
done
SSH_CIPHER=$($RSH -v root@127.0.0.1 true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)

CPORT=$(free_port)
DPORT=$(free_port)
"$BIN/dicops" pki init --dir "$PKI" >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --controller >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --operator bench >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --agent src01 >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --agent dst01 >/dev/null

{
    printf 'listen: 127.0.0.1:%s\nstate:\n  database: %s/controller.db\n' "$CPORT" "$WORK"
    printf 'tls:\n  ca: %s/ca.pem\n  cert: %s/controller.pem\n  key: %s/controller-key.pem\n' "$PKI" "$PKI" "$PKI"
    printf 'health:\n  report_interval: 5s\n  down_after_missed_reports: 3\n'
    printf 'sites:\n  - name: dc1\n  - name: dc2\n'
    printf 'agents:\n  - id: src01\n    site: dc1\n  - id: dst01\n    site: dc2\n'
    printf 'replications:\n'
    for r in $(seq "$RUNS") tree; do
        job=bench-$r
        [[ $r == tree ]] && job=tree
        printf '  - {name: %s, source: {agent: src01, export: %s}, destination: {agent: dst01, root: replicas}, retention: {keep_last: 10}, retries: 0, max_runtime: 2h}\n' \
            "$job" "${job//-/}"
    done
} >"$WORK/controller.yaml"
agent_yaml() {
    local id=$1
    printf 'id: %s\ncontroller:\n  url: https://127.0.0.1:%s\nstate_dir: %s/state-%s\n' "$id" "$CPORT" "$WORK" "$id"
    printf 'tls:\n  ca: %s/ca.pem\n  cert: %s/agent-%s.pem\n  key: %s/agent-%s-key.pem\n' "$PKI" "$PKI" "$id" "$PKI" "$id"
    printf 'collect:\n  interval: 5s\n  paths: [%s]\n' "$WORK"
}
{
    agent_yaml src01
    printf 'data: {listen: "127.0.0.1:%s", url: "https://127.0.0.1:%s"}\nexports:\n' "$DPORT" "$DPORT"
    for r in $(seq "$RUNS"); do
        mkdir -p "$WORK/src/r$r"
        printf '  bench%s: %s/src/r%s\n' "$r" "$WORK" "$r"
    done
    mkdir -p "$WORK/tree-src"
    printf '  tree: %s/tree-src\n' "$WORK"
} >"$WORK/agent-src01.yaml"
{
    agent_yaml dst01
    printf 'roots: {replicas: %s/dicops}\n' "$WORK"
} >"$WORK/agent-dst01.yaml"
printf 'controller: https://127.0.0.1:%s\ntls:\n  ca: %s/ca.pem\n  cert: %s/operator-bench.pem\n  key: %s/operator-bench-key.pem\n' \
    "$CPORT" "$PKI" "$PKI" "$PKI" >"$CLI"
"$BIN/dicops" check-config "$WORK/controller.yaml" "$WORK/agent-src01.yaml" "$WORK/agent-dst01.yaml" >/dev/null ||
    die "dicops check-config refused the configs in $WORK"

RUST_LOG=info "$BIN/dicops-controller" --config "$WORK/controller.yaml" >>"$WORK/logs/controller.log" 2>&1 &
CTL=$!
BENCH_PIDS+=("$CTL")
wait_ready "$CPORT" "$CTL"

start_agent() {
    RUST_LOG=info "$BIN/dicops-agent" --config "$WORK/agent-$1.yaml" >>"$WORK/logs/agent-$1.log" 2>&1 &
    local pid=$!
    BENCH_PIDS+=("$pid")
    eval "AGENT_${1}=$pid"
}
agents_up() {
    local i
    for i in $(seq 300); do
        if "$BIN/dicops" status --json --config "$CLI" 2>/dev/null | perl -MJSON::PP -e '
            my $s = decode_json(join "", <STDIN>); my %up;
            for my $site (@{ $s->{sites} }) { $up{$_->{id} // $_->{agent} // ""} = $_->{up} ? 1 : 0 for @{ $site->{agents} } }
            exit(($up{src01} && $up{dst01}) ? 0 : 1)'; then
            return 0
        fi
        kill -0 "$AGENT_src01" 2>/dev/null || die "agent src01 exited; see $WORK/logs/agent-src01.log"
        kill -0 "$AGENT_dst01" 2>/dev/null || die "agent dst01 exited; see $WORK/logs/agent-dst01.log"
        sleep 0.1
    done
    die "the agents did not report within 30 s; see $WORK/logs"
}
start_agent src01
start_agent dst01
agents_up
daemon_pids() { echo "$CTL,$AGENT_src01,$AGENT_dst01,$SSHD"; }

LAST_MASS_DELETE=0
rest_after_delete() {
    local left
    left=$(awk -v l="$LAST_MASS_DELETE" -v n="$(now)" -v r="$REST_AFTER_DELETE" 'BEGIN { x = l + r - n; printf "%d", (x > 0) ? x + 1 : 0 }')
    if ((left > 0)); then
        log "waiting ${left} s: dicops deleted its staged chunk files less than ${REST_AFTER_DELETE} s ago (ext4 creates files slowly after mass deletes)"
        sleep "$left"
    fi
}

# One timed dicops run of job $1 (label $2). Sets D_T D_SYNC D_REC D_BYTES
# D_TCP D_TAIL D_OTHERS D_LOAD; warms $3... first.
dicops_run() {
    local job=$1 label=$2
    shift 2
    local out=$WORK/runs/$label-dicops.txt
    before_run "$@"
    meter_start "$DPORT" "$WORK/runs/$label-dicops.ss"
    local rc=0
    "$BIN/dicops" run "$job" --follow --config "$CLI" >"$out" 2>&1 || rc=$?
    after_run_meter=$(meter_stop "$DPORT" "$WORK/runs/$label-dicops.ss")
    after_run
    local id
    id=$(sed -n 's/^started run \([0-9]*\) of .*/\1/p' "$out" | head -1)
    [[ -n "$id" ]] || die "dicops run $job did not start: $(cat "$out")"
    "$BIN/dicops" show "$id" --json --config "$CLI" >"$WORK/runs/$label-dicops.json"
    read -r D_STATUS D_BYTES D_REC < <(perl -MJSON::PP -e '
        my $r = decode_json(join "", <STDIN>);
        printf "%s %s %.3f\n", $r->{status}, $r->{bytes} // 0, ($r->{finished_at} // 0) - $r->{created_at}' <"$WORK/runs/$label-dicops.json")
    D_TAIL=$(perl -MJSON::PP -e 'my $r = decode_json(join "", <STDIN>); my $t = $r->{output_tail} // ""; $t =~ s/\s+$//; print $t' <"$WORK/runs/$label-dicops.json")
    if ((rc != 0)) || [[ "$D_STATUS" != succeeded ]]; then
        log "dicops run $id of $job FAILED ($D_STATUS): $(perl -MJSON::PP -e 'print decode_json(join "", <STDIN>)->{error} // ""' <"$WORK/runs/$label-dicops.json")"
        log "  see $out, $WORK/logs/agent-src01.log, $WORK/logs/agent-dst01.log, $WORK/logs/controller.log"
        FAILED+=("$label: dicops run $id $D_STATUS")
    fi
    D_T=$T D_SYNC=$SYNC_T D_OTHERS=$OTHERS D_LOAD=$LOAD
    read -r _ D_TCP <<<"$after_run_meter"
    log "  $label dicops: ${D_T} s (+ sync ${D_SYNC} s; run record ${D_REC} s), wire $(mib "$D_BYTES") MiB (TCP $(mib "$D_TCP") MiB)," \
        "others ${D_OTHERS}% [$OTHERS_TOP] load $LOAD"
    log "    $D_TAIL"
}

# One timed rsync run, label $1, source $2, target $3, extra options $4
# (may be empty); warms $5... Sets S_T S_SYNC S_SENT S_RECV S_LIT S_TCP.
rsync_run() {
    local label=$1 src=$2 dst=$3 opts=$4
    shift 4
    local out=$WORK/runs/$label-rsync.txt
    before_run "$@"
    meter_start "$SSH_PORT" "$WORK/runs/$label-rsync.ss"
    local rc=0
    # shellcheck disable=SC2086
    rsync -a $opts --stats -e "$RSH" "$src/" "root@127.0.0.1:$dst/" >"$out" 2>&1 &
    RSYNC_PID=$!
    wait "$RSYNC_PID" || rc=$?
    local m
    m=$(meter_stop "$SSH_PORT" "$WORK/runs/$label-rsync.ss")
    after_run
    ((rc == 0)) || { FAILED+=("$label: rsync exit $rc"); log "rsync $label failed ($rc): $(tail -3 "$out")"; }
    S_SENT=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_RECV=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_LIT=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_T=$T S_SYNC=$SYNC_T S_OTHERS=$OTHERS S_LOAD=$LOAD
    read -r S_TCP _ <<<"$m"
    log "  $label rsync${opts:+ $opts}: ${S_T} s (+ sync ${S_SYNC} s), sent $(mib "${S_SENT:-0}") MiB (literal $(mib "${S_LIT:-0}"), received $(mib "${S_RECV:-0}"); TCP $(mib "$S_TCP") MiB)," \
        "others ${S_OTHERS}% [$OTHERS_TOP] load $LOAD"
}

# Records one run's figures under scenario $1 for tool $2 (dicops|rsync|fuzzy|plain).
record() {
    local sc=$1 tool=$2
    if [[ $tool == dicops ]]; then
        add "$sc.dicops.t" "$D_T"; add "$sc.dicops.sync" "$(awk -v a="$D_T" -v b="$D_SYNC" 'BEGIN { print a + b }')"
        add "$sc.dicops.rec" "$D_REC"; add "$sc.dicops.bytes" "$D_BYTES"; add "$sc.dicops.tcp" "$D_TCP"
        add "$sc.dicops.others" "$D_OTHERS"; add "$sc.dicops.load" "${D_LOAD%% *}"
        DISTURBED=$(awk -v o="$D_OTHERS" -v m="$DISTURBED_PCT" 'BEGIN { print (o > m) ? 1 : 0 }')
    else
        add "$sc.$tool.t" "$S_T"; add "$sc.$tool.sync" "$(awk -v a="$S_T" -v b="$S_SYNC" 'BEGIN { print a + b }')"
        add "$sc.$tool.bytes" "${S_SENT:-0}"; add "$sc.$tool.recv" "${S_RECV:-0}"; add "$sc.$tool.lit" "${S_LIT:-0}"
        add "$sc.$tool.tcp" "$S_TCP"; add "$sc.$tool.others" "$S_OTHERS"; add "$sc.$tool.load" "${S_LOAD%% *}"
        DISTURBED=$(awk -v o="$S_OTHERS" -v m="$DISTURBED_PCT" 'BEGIN { print (o > m) ? 1 : 0 }')
    fi
    if ((DISTURBED)); then
        add "disturbed" "$sc.$tool.run$CUR_RUN"
    fi
    echo "$CUR_RUN $sc $tool $( [[ $tool == dicops ]] && echo "$D_T $D_SYNC $D_REC $D_BYTES $D_TCP $D_OTHERS $D_LOAD" || echo "$S_T $S_SYNC - ${S_SENT:-0} $S_TCP $S_OTHERS $S_LOAD")" \
        >>"$WORK/runs/all.txt"
}

FAILED=()

# ---------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------

machine_summary
echo "disk: $(df -hT "$WORK" | awk 'NR == 2 { print $2 ", " $3 " (" $5 " free)" }'), mount options: $(awk -v m="$(df --output=target "$WORK" | tail -1)" '$2 == m { print $4 }' /proc/mounts | head -1)"
echo "dicops: $BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo "not a git checkout"))"
echo "rsync: $(rsync --version | head -1)"
echo "ssh: $(ssh -V 2>&1), cipher $SSH_CIPHER, no compression"
echo "load before: $(load)"

log "generating the data in $WORK"
t=$(now)
mkdir -p "$WORK/base/big" "$WORK/base/small"
for i in $(seq "$BIG_FILES"); do
    openssl enc -aes-128-ctr -pass "pass:dicops-bench-big-$i" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        head -c $((BIG_MIB << 20)) >"$WORK/base/big/big-$i.bin"
done
SMALL_BYTES=$(genpl small "$WORK/base/small" "$SMALL_FILES" 1 "$SMALL_MIN" "$SMALL_MAX")
genpl dump "$WORK/gen/dump-27" 27 "$DUMP_MIB"
cp "$WORK/gen/dump-27" "$WORK/gen/dump-28a"
BLOCKS_A=$(genpl patch "$WORK/gen/dump-28a" 28 "$DUMP_MIB" "$DUMP_CHANGED")
cp "$WORK/gen/dump-27" "$WORK/gen/dump-28b"
BLOCKS_B=$(genpl patch "$WORK/gen/dump-28b" 128 "$DUMP_MIB" "$DUMP_CHANGED")
sync
FRESH_BYTES=$((BIG_FILES * (BIG_MIB << 20) + SMALL_BYTES))
DUMP_ZSTD=$(head -c $((64 << 20)) "$WORK/gen/dump-27" | zstd -3 -c 2>/dev/null | wc -c || echo 0)
log "data made in $(sub "$(now)" "$t") s: fresh set $FRESH_BYTES bytes ($BIG_FILES x $BIG_MIB MiB + $SMALL_FILES files, $SMALL_BYTES bytes);" \
    "dump $DUMP_MIB MiB (zstd -3 of its first 64 MiB: $DUMP_ZSTD bytes); blocks changed: 28a [$BLOCKS_A] 28b [$BLOCKS_B]"
echo "fresh set: $BIG_FILES x $BIG_MIB MiB incompressible + $SMALL_FILES text files of $SMALL_MIN-$SMALL_MAX bytes ($SMALL_BYTES bytes) = $FRESH_BYTES bytes"
echo "dump: $DUMP_MIB MiB of text rows; $DUMP_CHANGED of its 1 MiB blocks rewritten in each new dump"

# ---------------------------------------------------------------------------
# Scenarios 1-5, RUNS times
# ---------------------------------------------------------------------------

CHANGED_S3=0
for r in $(seq "$RUNS"); do
    CUR_RUN=$r
    SRC=$WORK/src/r$r
    RT=$WORK/rsync/r$r
    JOB=bench-$r
    DT=$WORK/dicops/$JOB
    rmdir "$SRC"
    cp -al "$WORK/base" "$SRC"
    mkdir -p "$RT"
    sync
    if ((r % 2)); then order="rsync dicops"; else order="dicops rsync"; fi
    echo
    echo "--- run $r/$RUNS (order: $order)"

    # 1. Fresh copy.
    for tool in $order; do
        rest_after_delete
        if [[ $tool == rsync ]]; then
            rsync_run "s1-r$r" "$SRC" "$RT" "" "$SRC"
            record s1 rsync
        else
            dicops_run "$JOB" "s1-r$r" "$SRC"
            record s1 dicops
            LAST_MASS_DELETE=$(now)
        fi
    done

    # 2. Nothing changed.
    for tool in $order; do
        if [[ $tool == rsync ]]; then
            rsync_run "s2-r$r" "$SRC" "$RT" "" "$SRC" "$RT"
            record s2 rsync
        else
            dicops_run "$JOB" "s2-r$r" "$SRC" "$DT/latest"
            record s2 dicops
        fi
    done

    # 3. 1% of the small files and one append.
    changed=$(genpl touch "$SRC/small" "$SMALL_CHANGED" $((100 + r)))
    k=$(((r - 1) % BIG_FILES + 1))
    cp "$SRC/big/big-$k.bin" "$SRC/big/.big-$k.tmp"
    openssl enc -aes-128-ctr -pass "pass:dicops-bench-append-$r" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null |
        head -c $((APPEND_MIB << 20)) >>"$SRC/big/.big-$k.tmp"
    mv "$SRC/big/.big-$k.tmp" "$SRC/big/big-$k.bin"
    sync
    CHANGED_S3=$((changed + (APPEND_MIB << 20)))
    for tool in $order; do
        if [[ $tool == rsync ]]; then
            rsync_run "s3-r$r" "$SRC" "$RT" "" "$SRC" "$RT"
            record s3 rsync
        else
            dicops_run "$JOB" "s3-r$r" "$SRC" "$DT/latest"
            record s3 dicops
        fi
    done

    # Yesterday's dump, twice (untimed figures kept for the record).
    mkdir -p "$SRC/dumps" "$SRC/2026-11-27"
    ln "$WORK/gen/dump-27" "$SRC/dumps/db-2026-11-27.dump"
    ln "$WORK/gen/dump-27" "$SRC/2026-11-27/db.dump"
    sync
    for tool in $order; do
        if [[ $tool == rsync ]]; then
            rsync_run "prep-r$r" "$SRC" "$RT" "" "$SRC" "$RT"
            record prep rsync
        else
            dicops_run "$JOB" "prep-r$r" "$SRC" "$DT/latest"
            record prep dicops
        fi
    done
    # Plain rsync of scenario 4 writes into a clone (hard links) of rsync's folder.
    cp -al "$RT" "$WORK/rsync-plain/r$r"
    sync

    # 4. A new dump under a new name.
    ln "$WORK/gen/dump-28a" "$SRC/dumps/db-2026-11-28.dump"
    for tool in $order; do
        if [[ $tool == rsync ]]; then
            rsync_run "s4-r$r-plain" "$SRC" "$WORK/rsync-plain/r$r" "" "$SRC/dumps" "$WORK/rsync-plain/r$r/dumps"
            record s4 plain
            rsync_run "s4-r$r-fuzzy" "$SRC" "$RT" "--fuzzy" "$SRC/dumps" "$RT/dumps"
            record s4 fuzzy
        else
            dicops_run "$JOB" "s4-r$r" "$SRC/dumps" "$DT/latest/dumps"
            record s4 dicops
        fi
    done

    # 5. The same kind of dump in a new dated folder.
    mkdir -p "$SRC/2026-11-28"
    ln "$WORK/gen/dump-28b" "$SRC/2026-11-28/db.dump"
    for tool in $order; do
        if [[ $tool == rsync ]]; then
            rsync_run "s5-r$r-fuzzy" "$SRC" "$RT" "--fuzzy" "$SRC/2026-11-27" "$SRC/2026-11-28" "$RT/2026-11-27"
            record s5 fuzzy
        else
            dicops_run "$JOB" "s5-r$r" "$SRC/2026-11-27" "$SRC/2026-11-28" "$DT/latest/2026-11-27"
            record s5 dicops
        fi
    done

    # This run's large files go (few inodes: no slow-down of later creations).
    find "$SRC" "$RT" "$WORK/rsync-plain/r$r" "$DT" -type f -size +100M -delete 2>/dev/null || true
    sync
done
read -r HWM_SRC_S15 < <(mem_kib "$AGENT_src01" | awk '{ print $2 }')
read -r HWM_DST_S15 < <(mem_kib "$AGENT_dst01" | awk '{ print $2 }')

# ---------------------------------------------------------------------------
# 6. A tree of many small files: memory and time
# ---------------------------------------------------------------------------

if ((TREE_FILES > 0)); then
    CUR_RUN=1
    echo
    echo "--- scenario 6: $TREE_FILES files"
    log "generating $TREE_FILES files"
    t=$(now)
    TREE_BYTES=$(genpl small "$WORK/tree-src" "$TREE_FILES" 6 "$TREE_MIN" "$TREE_MAX")
    sync
    log "tree made in $(sub "$(now)" "$t") s: $TREE_BYTES bytes"
    # Fresh agents: VmHWM covers this scenario only.
    stop_pid "$AGENT_src01"
    stop_pid "$AGENT_dst01"
    start_agent src01
    start_agent dst01
    agents_up
    read -r _ HWM_SRC_START < <(mem_kib "$AGENT_src01")
    read -r _ HWM_DST_START < <(mem_kib "$AGENT_dst01")

    # rsync first: dicops deletes one staged file per fetched chunk (here one
    # per file) after its publish, which slows file creation afterwards.
    rest_after_delete
    stop_file=$WORK/runs/rsync-mem.stop
    rm -f "$stop_file"
    genpl rsync-mem $$ "$stop_file" >"$WORK/runs/s6-rsync-mem.txt" &
    MEMS=$!
    BENCH_PIDS+=("$MEMS")
    rsync_run "s6" "$WORK/tree-src" "$WORK/rsync/tree" "" "$WORK/tree-src"
    record s6 rsync
    touch "$stop_file"
    wait "$MEMS" || true
    forget_pid "$MEMS"
    RSYNC_CLIENT=$RSYNC_PID
    read -r R6_SENDER R6_GEN R6_RECV < <(awk -v c="$RSYNC_CLIENT" '
        { hwm[$1] = $3; parent[$1] = $2 }
        END { s = 0; g = 0; r = 0
              for (p in hwm) { if (p == c) s = hwm[p]; else if (parent[p] in hwm && parent[p] != c) r = hwm[p]; else g = hwm[p] }
              print s, g, r }' "$WORK/runs/s6-rsync-mem.txt")

    dicops_run tree "s6" "$WORK/tree-src"
    record s6 dicops
    LAST_MASS_DELETE=$(now)
    read -r RSS6_SRC HWM6_SRC < <(mem_kib "$AGENT_src01")
    read -r RSS6_DST HWM6_DST < <(mem_kib "$AGENT_dst01")
    log "  agents after the fresh copy of the tree: src01 VmRSS $(kib_to_mib "$RSS6_SRC") VmHWM $(kib_to_mib "$HWM6_SRC") MiB;" \
        "dst01 VmRSS $(kib_to_mib "$RSS6_DST") VmHWM $(kib_to_mib "$HWM6_DST") MiB"

    # Unchanged re-sync of the tree.
    rm -f "$stop_file"
    genpl rsync-mem $$ "$stop_file" >"$WORK/runs/s6b-rsync-mem.txt" &
    MEMS=$!
    BENCH_PIDS+=("$MEMS")
    rsync_run "s6b" "$WORK/tree-src" "$WORK/rsync/tree" "" "$WORK/tree-src" "$WORK/rsync/tree"
    record s6b rsync
    touch "$stop_file"
    wait "$MEMS" || true
    forget_pid "$MEMS"
    read -r R6B_SENDER R6B_GEN R6B_RECV < <(awk -v c="$RSYNC_PID" '
        { hwm[$1] = $3; parent[$1] = $2 }
        END { s = 0; g = 0; r = 0
              for (p in hwm) { if (p == c) s = hwm[p]; else if (parent[p] in hwm && parent[p] != c) r = hwm[p]; else g = hwm[p] }
              print s, g, r }' "$WORK/runs/s6b-rsync-mem.txt")
    dicops_run tree "s6b" "$WORK/tree-src" "$WORK/dicops/tree/latest"
    record s6b dicops
    read -r RSS6B_SRC HWM6B_SRC < <(mem_kib "$AGENT_src01")
    read -r RSS6B_DST HWM6B_DST < <(mem_kib "$AGENT_dst01")
    log "  agents after the unchanged re-sync: src01 VmRSS $(kib_to_mib "$RSS6B_SRC") VmHWM $(kib_to_mib "$HWM6B_SRC") MiB;" \
        "dst01 VmRSS $(kib_to_mib "$RSS6B_DST") VmHWM $(kib_to_mib "$HWM6B_DST") MiB"
fi

# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------

# Per-run ratio lists.
ratio_list() {   # key_a key_b -> per-run a/b
    local -a a b
    read -r -a a <<<"${R[$1]:-}"
    read -r -a b <<<"${R[$2]:-}"
    local i
    for i in "${!a[@]}"; do
        awk -v x="${a[$i]}" -v y="${b[$i]:-0}" 'BEGIN { if (y != 0) printf "%.4f\n", x / y }'
    done
}
rs() { stats $(ratio_list "$1" "$2"); }
mb_s() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f", (t > 0) ? b / t / 1e6 : 0 }'; }
yes_no() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { ok = (op == ">=") ? v >= t : v <= t; print ok ? "yes" : "**no**" }'; }
mibs() {   # "median (min-max)" of a byte list, in MiB
    local k=$1
    # shellcheck disable=SC2046
    stats $(printf '%s\n' ${R[$k]:-} | awk '{ printf "%.2f\n", $1 / 1048576 }')
}

S1_SPEED=$(med "$(echo x)" 2>/dev/null || true)
for sc in s1 s2 s3 s4 s5 s6 s6b prep; do
    :
done

s1_ratio=$(ratio_list s1.rsync.t s1.dicops.t | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
s1_ratio_sync=$(ratio_list s1.rsync.sync s1.dicops.sync | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
s2_ratio=$(ratio_list s2.rsync.t s2.dicops.t | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
s2_ratio_rec=$(ratio_list s2.rsync.t s2.dicops.rec | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
ch4=$((DUMP_CHANGED << 20))
s4_vs_changed=$(div "$(med s4.dicops.bytes)" "$ch4")
s4_vs_plain=$(div "$(med s4.dicops.bytes)" "$(med s4.plain.bytes)")
s5_vs_changed=$(div "$(med s5.dicops.bytes)" "$ch4")

echo
echo "=== summary: median (min-max) of $RUNS runs; times in s; MiB = 2^20 bytes"
{
    echo
    echo "| scenario | figure | rsync -a over ssh | dicops | dicops vs rsync | target | met? |"
    echo "|---|---|---|---|---|---|---|"
    echo "| 1. fresh copy, $(awk -v b="$FRESH_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') ($BIG_FILES x $BIG_MIB MiB + $SMALL_FILES files) | time | $(st s1.rsync.t) | $(st s1.dicops.t) (run record $(st s1.dicops.rec)) | $(rs s1.rsync.t s1.dicops.t)x rsync's speed | >= 1.5x | $(yes_no "$s1_ratio" '>=' 1.5) |"
    echo "| | time + sync | $(st s1.rsync.sync) | $(st s1.dicops.sync) | $(rs s1.rsync.sync s1.dicops.sync)x | >= 1.5x | $(yes_no "$s1_ratio_sync" '>=' 1.5) |"
    echo "| | throughput (median time) | $(mb_s "$FRESH_BYTES" "$(med s1.rsync.t)") MB/s | $(mb_s "$FRESH_BYTES" "$(med s1.dicops.t)") MB/s | | | |"
    echo "| | bytes sent (tool's count; TCP payload) | $(mibs s1.rsync.bytes); $(mibs s1.rsync.tcp) MiB | $(mibs s1.dicops.bytes); $(mibs s1.dicops.tcp) MiB | | | |"
    echo "| 2. re-sync, nothing changed | time | $(st s2.rsync.t) | $(st s2.dicops.t) (run record $(st s2.dicops.rec)) | $(rs s2.rsync.t s2.dicops.t)x faster (run record: $(rs s2.rsync.t s2.dicops.rec)x) | >= 5x | $(yes_no "$s2_ratio" '>=' 5) (run record: $(yes_no "$s2_ratio_rec" '>=' 5)) |"
    echo "| | bytes sent (tool's count; TCP payload) | $(mibs s2.rsync.bytes); $(mibs s2.rsync.tcp) MiB | $(mibs s2.dicops.bytes); $(mibs s2.dicops.tcp) MiB | | | |"
    echo "| 3. $SMALL_CHANGED small files (1 KiB each) + $APPEND_MIB MiB appended | time | $(st s3.rsync.t) | $(st s3.dicops.t) (run record $(st s3.dicops.rec)) | $(rs s3.rsync.t s3.dicops.t)x faster | | |"
    echo "| | bytes sent (tool's count; TCP payload); changed $(mib "$CHANGED_S3") MiB | $(mibs s3.rsync.bytes); $(mibs s3.rsync.tcp) MiB | $(mibs s3.dicops.bytes); $(mibs s3.dicops.tcp) MiB | | | |"
    echo "| 4. new dump under a new name, $DUMP_CHANGED of $DUMP_MIB 1-MiB blocks changed ($(mib "$ch4") MiB) | bytes sent (tool's count) | plain $(mibs s4.plain.bytes); --fuzzy $(mibs s4.fuzzy.bytes) MiB | $(mibs s4.dicops.bytes) MiB | $(div "$(med s4.dicops.bytes)" "$ch4")x changed; $(awk -v a="$(med s4.dicops.bytes)" -v b="$(med s4.plain.bytes)" 'BEGIN { printf "%.1f%%", (b > 0) ? 100 * a / b : 0 }') of plain rsync; $(div "$(med s4.dicops.bytes)" "$(med s4.fuzzy.bytes)")x --fuzzy | <= 1.25x changed and <= 10% of plain rsync | $(yes_no "$s4_vs_changed" '<=' 1.25) / $(yes_no "$s4_vs_plain" '<=' 0.10) |"
    echo "| | TCP payload | plain $(mibs s4.plain.tcp); --fuzzy $(mibs s4.fuzzy.tcp) MiB | $(mibs s4.dicops.tcp) MiB | $(div "$(med s4.dicops.tcp)" "$ch4")x changed | | |"
    echo "| | time | plain $(st s4.plain.t); --fuzzy $(st s4.fuzzy.t) | $(st s4.dicops.t) (run record $(st s4.dicops.rec)) | $(rs s4.fuzzy.t s4.dicops.t)x --fuzzy's speed | | |"
    echo "| 5. dump in a new dated folder, $DUMP_CHANGED blocks changed ($(mib "$ch4") MiB) | bytes sent (tool's count) | --fuzzy $(mibs s5.fuzzy.bytes) MiB | $(mibs s5.dicops.bytes) MiB | $(div "$(med s5.dicops.bytes)" "$ch4")x changed; rsync --fuzzy $(div "$(med s5.fuzzy.bytes)" "$ch4")x | <= 1.25x changed | $(yes_no "$s5_vs_changed" '<=' 1.25) |"
    echo "| | TCP payload | --fuzzy $(mibs s5.fuzzy.tcp) MiB | $(mibs s5.dicops.tcp) MiB | $(div "$(med s5.dicops.tcp)" "$ch4")x changed | | |"
    echo "| | time | --fuzzy $(st s5.fuzzy.t) | $(st s5.dicops.t) (run record $(st s5.dicops.rec)) | $(rs s5.fuzzy.t s5.dicops.t)x --fuzzy's speed | | |"
    if ((TREE_FILES > 0)); then
        echo "| 6. $TREE_FILES files ($(awk -v b="$TREE_BYTES" 'BEGIN { printf "%.0f MB", b / 1e6 }')), fresh copy | time (+ sync) | $(st s6.rsync.t) (+ $(awk -v a="$(med s6.rsync.sync)" -v b="$(med s6.rsync.t)" 'BEGIN { printf "%.2f", a - b }')) | $(st s6.dicops.t) (+ $(awk -v a="$(med s6.dicops.sync)" -v b="$(med s6.dicops.t)" 'BEGIN { printf "%.2f", a - b }')); run record $(st s6.dicops.rec) | $(rs s6.rsync.t s6.dicops.t)x rsync's speed | | |"
        echo "| | peak memory (VmHWM) | sender $(kib_to_mib "$R6_SENDER"), generator $(kib_to_mib "$R6_GEN"), receiver $(kib_to_mib "$R6_RECV") MiB | src01 $(kib_to_mib "$HWM6_SRC"), dst01 $(kib_to_mib "$HWM6_DST") MiB (at start $(kib_to_mib "$HWM_SRC_START"), $(kib_to_mib "$HWM_DST_START")) | | < 256 MiB per agent | $(yes_no "$(awk -v a="$HWM6_SRC" -v b="$HWM6_DST" 'BEGIN { print ((a > b) ? a : b) / 1024 }')" '<=' 255.99) |"
        echo "| | bytes sent (tool's count; TCP payload) | $(mibs s6.rsync.bytes); $(mibs s6.rsync.tcp) MiB | $(mibs s6.dicops.bytes); $(mibs s6.dicops.tcp) MiB | | | |"
        echo "| 6b. same tree, nothing changed | time | $(st s6b.rsync.t) | $(st s6b.dicops.t) (run record $(st s6b.dicops.rec)) | $(rs s6b.rsync.t s6b.dicops.t)x faster | | |"
        echo "| | peak memory (VmHWM, whole life) | sender $(kib_to_mib "$R6B_SENDER"), generator $(kib_to_mib "$R6B_GEN"), receiver $(kib_to_mib "$R6B_RECV") MiB | src01 $(kib_to_mib "$HWM6B_SRC"), dst01 $(kib_to_mib "$HWM6B_DST") MiB | | < 256 MiB per agent | $(yes_no "$(awk -v a="$HWM6B_SRC" -v b="$HWM6B_DST" 'BEGIN { print ((a > b) ? a : b) / 1024 }')" '<=' 255.99) |"
        echo "| | bytes sent (tool's count; TCP payload) | $(mibs s6b.rsync.bytes); $(mibs s6b.rsync.tcp) MiB | $(mibs s6b.dicops.bytes); $(mibs s6b.dicops.tcp) MiB | | | |"
    fi
    echo "| agents' VmHWM after scenarios 1-5 (all runs) | | | src01 $(kib_to_mib "$HWM_SRC_S15"), dst01 $(kib_to_mib "$HWM_DST_S15") MiB | | < 256 MiB per agent | $(yes_no "$(awk -v a="$HWM_SRC_S15" -v b="$HWM_DST_S15" 'BEGIN { print ((a > b) ? a : b) / 1024 }')" '<=' 255.99) |"
    echo
    echo "Untimed step between 3 and 4 (yesterday's dump added as two files of the same $DUMP_MIB MiB content):" \
        "rsync $(st prep.rsync.t) s, $(mibs prep.rsync.bytes) MiB sent; dicops $(st prep.dicops.t) s, $(mibs prep.dicops.bytes) MiB on the wire."
    echo
    echo "Every run (run, scenario, tool, time s, sync s, run record s (dicops), bytes sent, TCP payload bytes, others' CPU % of a core, load 1 5 15):"
    echo
    echo '```'
    cat "$WORK/runs/all.txt"
    echo '```'
    echo
    echo "Others' CPU above ${DISTURBED_PCT}% of a core during: ${R[disturbed]:-no run}"
    echo "Load (1 min) before the timed runs: $(st s1.rsync.load) ... all runs: $(stats $(awk '{ print $(NF-2) }' "$WORK/runs/all.txt"))"
} | tee "$WORK/summary.md"
if ((${#FAILED[@]})); then
    echo
    echo "FAILURES:"
    printf '  %s\n' "${FAILED[@]}"
fi
echo
echo "took ${SECONDS} s"
if [[ -n "${KEEP:-}" ]]; then
    echo "logs: $WORK/logs, run outputs: $WORK/runs"
fi
