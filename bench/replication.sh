#!/usr/bin/env bash
# Replication: dicops side by side with `rsync -a` over ssh, in the same run,
# on loopback (127.0.0.1 only). Figures in BENCHMARKS.md, section 5.
#
#     bash bench/replication.sh                   # builds with cargo build --release first
#     SKIP_BUILD=1 bash bench/replication.sh      # reuses target/release (or $CARGO_TARGET_DIR/release)
#     DICOPS_BIN_DIR=/path/to/release bash bench/replication.sh
#
# About 17 minutes on the 2-core machine of BENCHMARKS.md (without the
# build); about 30 GB free under WORK_PARENT (checked first). Runs as root
# (the rsync side logs in as root to a private sshd).
#
# dicops: a controller and two agents from real configs and a real PKI
# (`dicops pki init/issue`): src01 in site dc1 serves its exports on its data
# port, dst01 in site dc2 pulls them into its root `replicas`. One
# replication job per data set, without schedule, started with
# `dicops run JOB --follow --config cli.yaml`. Time: the wall clock of that
# command (which polls every 0.5 s), and the run record's
# finished_at - created_at. Bytes: RunInfo.bytes of the run record (`dicops
# show RUN --json`: the chunk answers' bodies as they crossed, after zstd),
# and the same plus the run's manifest (which RunInfo.bytes leaves out; its
# size is that of the copy the destination keeps in <root>/<job>/manifests/).
#
# rsync: `rsync -a --stats -e "ssh -p PORT -i KEY -o StrictHostKeyChecking=no
# -o UserKnownHostsFile=/dev/null -o LogLevel=VERBOSE" SRC/ root@127.0.0.1:DST/`
# (a push) to a private sshd this script starts on a free loopback port with
# its own host key and an authorized key for root; the system's sshd and its
# config are not touched. Bytes: `Total bytes sent` of --stats, and ssh's own
# count of what it sent (`Transferred: sent N`, printed at LogLevel=VERBOSE,
# encryption included). rsync's target folders persist across scenarios, as
# dicops's snapshots do.
#
# Both: `sync` is timed after each run as a second figure (dicops fsyncs each
# file before it publishes; rsync does not).
#
# Scenarios (RUNS repetitions unless said otherwise):
#  1. fresh copy of BIG_FILES x BIG_MIB MiB incompressible files (AES-CTR
#     keystream) + SMALL_FILES text-like files of SMALL_MIN..SMALL_MAX bytes:
#     rsync RUNS times into new folders, dicops FRESH_RUNS times (new jobs);
#  2. re-sync with nothing changed;
#  3. re-sync after SMALL_CHANGED_PCT % of the small files got 1 KiB
#     overwritten and one large file got APPEND_MIB MiB appended (new changes
#     each repetition);
#     (untimed figures kept: yesterday's DUMP_MIB MiB dump, text rows that
#     zstd shrinks about 3x, copied once as dumps/db-2026-11-27.dump and once
#     as 2026-11-27/db.dump, into a dumps export of its own)
#  4. each "day" k: a new dump under a new name, dumps/db-2026-11-(27+k).dump,
#     yesterday's with DUMP_CHANGED_PCT % of its 1 MiB blocks rewritten:
#     dicops, rsync, rsync --fuzzy (plain rsync writes into a hard-linked
#     clone of rsync's folder, removed after);
#  5. the same day: 2026-11-(27+k)/db.dump beside yesterday's dated folder,
#     other blocks rewritten: dicops and rsync --fuzzy (no basis in a new
#     folder). Then the dumps of day k-1 are rotated out (deleted from the
#     source and rsync's folder; dicops keeps its last 2 snapshots);
#  6. a tree of TREE_FILES small files (TREE_MIN..TREE_MAX bytes), fresh copy
#     and unchanged re-sync, once: peak memory (VmHWM) of both dicops agents,
#     restarted just before; rsync's sender, generator and receiver VmHWM,
#     sampled every 0.2 s.
#
# Measuring honestly on this machine (/work/shared/BENCHMARKING.md): before
# every timed run, wait for a quiet machine (at most QUIET_MAX s), record
# `uptime`'s load, re-read the source and that tool's destination (cat >
# /dev/null) and afterwards record the CPU used by processes outside this
# script's process tree. The order of the tools alternates between
# repetitions. On this ext4 (no journal), creating files is up to 20x slower
# for about 5.5 minutes after many files were deleted (the kernel skips
# recently deleted inodes). Up to commit a4c24ce, dicops stored every
# fetched chunk as a file and deleted them all after it published, so runs
# that create many files waited REST_AFTER_DELETE s after such a run. Since
# 748fa6e it writes chunks straight into their files and deletes nothing
# in bulk: the default rest is 0 (set REST_AFTER_DELETE=330 to measure an
# older build). rsync's fresh copies still run first.
#
# Knobs: RUNS=3 FRESH_RUNS=1 BIG_FILES=4 BIG_MIB=512 SMALL_FILES=20000
# SMALL_MIN=2048 SMALL_MAX=8192 SMALL_CHANGED_PCT=1 APPEND_MIB=16 DUMP_MIB=1024
# DUMP_CHANGED_PCT=5 TREE_FILES=200000 TREE_MIN=512 TREE_MAX=4096 (TREE_FILES=0
# skips scenario 6) REST_AFTER_DELETE=0 QUIET_MAX=60 DISTURBED_PCT=10 WORK_PARENT=/tmp
# KEEP=1 (keep the work folder; the large files of finished steps are deleted
# as the script goes, to stay near 30 GB of disk) SKIP_INSTALL=1 (never
# apt-get install rsync, openssh-server, openssh-client).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

RUNS=${RUNS:-3}
FRESH_RUNS=${FRESH_RUNS:-1}
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
QUIET_MAX=${QUIET_MAX:-60}
WORK_PARENT=${WORK_PARENT:-/tmp}

SMALL_CHANGED=$(((SMALL_FILES * SMALL_CHANGED_PCT + 50) / 100))
DUMP_CHANGED=$(((DUMP_MIB * DUMP_CHANGED_PCT + 50) / 100))
((RUNS >= 1 && FRESH_RUNS >= 1)) || die "RUNS and FRESH_RUNS must be at least 1"

trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
# Tools, binaries, work folder
# ---------------------------------------------------------------------------

need_install=()
command -v rsync >/dev/null || need_install+=(rsync)
[[ -x /usr/sbin/sshd ]] || need_install+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } >/dev/null || need_install+=(openssh-client)
for tool in openssl perl ss curl; do
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

mkdir -p "$WORK_PARENT"
free_gb=$(df -P -B1G "$WORK_PARENT" | awk 'NR == 2 { print $4 }')
need_gb=$(((BIG_FILES * BIG_MIB * 5 + DUMP_MIB * 16) / 1024 + TREE_FILES * (TREE_MIN + TREE_MAX) * 2 / 1000000000 + 2))
((free_gb >= need_gb)) || die "$WORK_PARENT has $free_gb GB free; this run needs about $need_gb GB (WORK_PARENT= elsewhere, or smaller sizes)"

WORK=$(mktemp -d "$WORK_PARENT/dicops-bench-replication.XXXXXX")
SECONDS=0
mkdir -p "$WORK/logs" "$WORK/runs" "$WORK/gen" "$WORK/src" "$WORK/dicops" "$WORK/rsync"
PKI=$WORK/pki
CLI=$WORK/cli.yaml

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

now() { echo "$EPOCHREALTIME"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (b != 0 && a != "n/a") printf "%.3f", a / b; else print "n/a" }'; }
mib() { awk -v b="$1" 'BEGIN { if (b == "n/a") print b; else printf "%.2f", b / 1048576 }'; }
load() { cut -d' ' -f1-3 /proc/loadavg; }

declare -A R # key -> space-separated values, one per repetition
add() { R[$1]="${R[$1]:-}$2 "; }
# shellcheck disable=SC2086
st() { stats ${R[$1]:-}; } # median (min-max)
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# shellcheck disable=SC2086
med() { printf '%s\n' ${R[$1]:-} | grep -v '^n/a$' | median; }
# shellcheck disable=SC2086
mibs() { stats $(printf '%s\n' ${R[$1]:-} | awk '$1 != "n/a" { printf "%.2f\n", $1 / 1048576 }'); }
# Per-repetition ratios of two lists: $1[i] / $2[i].
ratios() {
    local -a a b
    read -r -a a <<<"${R[$1]:-}"
    read -r -a b <<<"${R[$2]:-}"
    local i
    for i in "${!a[@]}"; do
        awk -v x="${a[$i]}" -v y="${b[$i]:-0}" 'BEGIN { if (y != 0 && x != "n/a" && y != "n/a") printf "%.4f\n", x / y }'
    done
}
# shellcheck disable=SC2046
rs() { stats $(ratios "$1" "$2"); }
rmed() { ratios "$1" "$2" | median; }
yes_no() { awk -v v="$1" -v op="$2" -v t="$3" 'BEGIN { if (v == "n/a") { print "n/a"; exit } ok = (op == ">=") ? v >= t : v <= t; print ok ? "yes" : "**no**" }'; }

# Snapshot of every process: "pid utime+stime+cutime+cstime ppid". Read
# through cat: a process that exits while awk reads its file names would
# make (m)awk stop reading, and the processes after it would later count
# whole (bench/lib.sh's cpu_snapshot has that race).
tree_snapshot() {
    { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk '{ line = $0; pid = $1; sub(/^.*\) /, "", line); split(line, f, " ");
           print pid, f[12] + f[13] + f[14] + f[15], f[2] }'
}
# Waits until processes outside this script's tree used less than 10% of a
# core over 3 s, at most QUIET_MAX s (then measures anyway, and says so).
quiet() {
    local a b t start=$SECONDS
    a=$(mktemp) b=$(mktemp)
    while :; do
        tree_snapshot >"$a"
        sleep 3
        tree_snapshot >"$b"
        t=$(others_outside "$a" "$b" 3)
        if awk -v t="$t" 'BEGIN { exit !(t < 10) }'; then
            break
        fi
        if ((SECONDS - start >= QUIET_MAX)); then
            log "machine not quiet after ${QUIET_MAX} s (others: ${t}% of a core: $(others_outside_top "$a" "$b")); measuring anyway"
            break
        fi
        log "waiting for a quiet machine (others: ${t}% of a core: $(others_outside_top "$a" "$b"))"
    done
    rm -f "$a" "$b"
}
# Ticks of processes outside this script's process tree between snapshots
# $1 and $2, one "ticks pid" line per process (a process new in $2 counts
# whole; children a process reaped count through its cutime).
others_lines() {
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
        }' "$1" "$2"
}
# Their CPU in % of one core over $3 seconds, and the top three.
others_outside() { others_lines "$1" "$2" | awk -v s="$3" -v hz="$TICKS" '{ t += $1 } END { printf "%.1f", (s > 0) ? 100 * t / hz / s : 0 }'; }
others_outside_top() {
    others_lines "$1" "$2" | sort -rn | head -3 | while read -r d pid; do
        printf '%s=%s ' "$(cat "/proc/$pid/comm" 2>/dev/null || echo gone)" "$d"
    done
}

# Re-reads files so that the page cache is warm.
warm() {
    local d
    for d in "$@"; do
        [[ -e "$d" ]] || continue
        find -L "$d" -type f -print0 2>/dev/null | xargs -0 -r cat >/dev/null 2>&1 || true
    done
}

# Before a timed run: quiet machine, load, warm caches, start of the window.
before_run() {
    quiet
    LOAD=$(load)
    warm "$@"
    SNAP_A=$(mktemp)
    SNAP_B=$(mktemp)
    tree_snapshot >"$SNAP_A"
    T0=$(now)
}
# Right after the command: end of the window.
end_run() {
    T1=$(now)
    tree_snapshot >"$SNAP_B"
}
# Then: wall time T, others' CPU OTHERS and OTHERS_TOP, a timed sync SYNC_T.
after_run() {
    T=$(sub "$T1" "$T0")
    OTHERS=$(others_outside "$SNAP_A" "$SNAP_B" "$T")
    OTHERS_TOP=$(others_outside_top "$SNAP_A" "$SNAP_B")
    rm -f "$SNAP_A" "$SNAP_B"
    local s0
    s0=$(now)
    sync
    SYNC_T=$(sub "$(now)" "$s0")
}

LAST_MASS_DELETE=0
# Waits until REST_AFTER_DELETE s have passed since dicops last deleted many
# staged chunk files.
rest_after_delete() {
    local left
    left=$(awk -v l="$LAST_MASS_DELETE" -v n="$(now)" -v r="$REST_AFTER_DELETE" 'BEGIN { x = l + r - n; printf "%d", (x > 0) ? x + 1 : 0 }')
    if ((left > 0)); then
        log "waiting ${left} s: dicops deleted many staged chunk files less than ${REST_AFTER_DELETE} s ago, and file creation is slow until then"
        sleep "$left"
    fi
}

# The generators: text-like small files, dump blocks, changes, rsync's memory.
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
# One 1 MiB block of a dump: rows of a table, seeded by (seed, index).
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
if ($cmd eq 'small') {            # DIR COUNT SEED MIN MAX: COUNT files, 100 per folder; prints their bytes
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
} elsif ($cmd eq 'patch') {       # FILE SEED BLOCKS COUNT: rewrites COUNT distinct 1 MiB blocks; prints them
  my ($file, $seed, $n, $count) = @ARGV; srand($seed); my %pick;
  $pick{int(rand($n))} = 1 while keys(%pick) < $count;
  open(my $f, '+<', $file) or die $!; binmode $f;
  for my $i (sort { $a <=> $b } keys %pick) { seek($f, $i * 1048576, 0) or die; print $f block($seed + 7919, $i); }
  close $f or die $!;
  print join(',', sort { $a <=> $b } keys %pick), "\n";
} elsif ($cmd eq 'touch') {       # DIR COUNT SEED: 1 KiB overwritten in COUNT files (temp + rename); prints bytes
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
} elsif ($cmd eq 'rsync-mem') {   # SCRIPT_PID STOPFILE: highest VmHWM of rsync processes under SCRIPT_PID
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
# $2 bytes of AES-128-CTR keystream from passphrase $1: incompressible and
# reproducible.
keystream() {
    { openssl enc -aes-128-ctr -pass "pass:$1" -nosalt -pbkdf2 -in /dev/zero 2>/dev/null || true; } | head -c "$2"
}

# ---------------------------------------------------------------------------
# rsync over a private sshd
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
# sshd needs its privilege separation folder (made at boot by the package's
# init script, which does not run here).
[[ -d /run/sshd ]] || mkdir -p /run/sshd
/usr/sbin/sshd -D -f "$SSH_DIR/sshd_config" -E "$WORK/logs/sshd.log" &
SSHD=$!
BENCH_PIDS+=("$SSHD")
RSH="ssh -p $SSH_PORT -i $SSH_DIR/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=VERBOSE"
for i in $(seq 50); do
    $RSH root@127.0.0.1 true >/dev/null 2>&1 && break
    ((i < 50)) || die "the private sshd on port $SSH_PORT does not answer; see $WORK/logs/sshd.log"
    sleep 0.1
done
SSH_CIPHER=$($RSH -v root@127.0.0.1 true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)

# ---------------------------------------------------------------------------
# dicops: PKI, configs, controller, agents
# ---------------------------------------------------------------------------

CPORT=$(free_port)
DPORT=$(free_port)
"$BIN/dicops" pki init --dir "$PKI" >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --controller >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --operator bench >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --agent src01 >/dev/null
"$BIN/dicops" pki issue --dir "$PKI" --agent dst01 >/dev/null

# Jobs (and exports of the same name without the dash): fresh-K, dumps, tree.
JOBS=()
for k in $(seq "$FRESH_RUNS"); do JOBS+=("fresh-$k"); done
JOBS+=(dumps tree)
{
    printf 'listen: 127.0.0.1:%s\nstate:\n  database: %s/controller.db\n' "$CPORT" "$WORK"
    printf 'tls:\n  ca: %s/ca.pem\n  cert: %s/controller.pem\n  key: %s/controller-key.pem\n' "$PKI" "$PKI" "$PKI"
    printf 'health:\n  report_interval: 5s\n  down_after_missed_reports: 3\n'
    printf 'sites:\n  - name: dc1\n  - name: dc2\n'
    printf 'agents:\n  - id: src01\n    site: dc1\n  - id: dst01\n    site: dc2\n'
    printf 'replications:\n'
    for job in "${JOBS[@]}"; do
        keep=10
        [[ $job == dumps ]] && keep=2
        printf '  - {name: %s, source: {agent: src01, export: %s}, destination: {agent: dst01, root: replicas}, retention: {keep_last: %s}, retries: 0, max_runtime: 2h}\n' \
            "$job" "${job//-/}" "$keep"
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
    for job in "${JOBS[@]}"; do
        mkdir -p "$WORK/src/$job"
        printf '  %s: %s/src/%s\n' "${job//-/}" "$WORK" "$job"
    done
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
            for my $site (@{ $s->{sites} }) { $up{$_->{id}} = $_->{up} ? 1 : 0 for @{ $site->{agents} } }
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

# ---------------------------------------------------------------------------
# One timed run of each tool
# ---------------------------------------------------------------------------

FAILED=()

# Seconds since the epoch of an RFC 3339 time in an agent log line.
log_time() { perl -MTime::Local -ne 'if (/^(\d+)-(\d+)-(\d+)T(\d+):(\d+):(\d+)(\.\d+)?Z/) { printf "%.3f\n", timegm($6, $5, $4, $3, $2 - 1, $1) + ($7 // 0); exit }'; }

# The phases of dicops run $1 (snapshot $2) from dst01's log: manifest (the
# source reads its tree) + plan, transfer (chunks fetched and staged),
# publish (files built and fsynced, staged chunks deleted), then verify
# (every file of the snapshot read again), retention and report.
dicops_phases() {
    local run=$1 snap=$2 f=$WORK/logs/agent-dst01.log a b c d e
    a=$(grep -m1 "replicating run=$run " "$f" | log_time)
    b=$(grep -m1 "replication planned run=$run " "$f" | log_time)
    # The snapshot is named after the time its publish starts (seconds).
    c=$(echo "${snap:0:19}" | sed 's/T\(..\)-\(..\)-\(..\)/T\1:\2:\3/' | sed 's/$/Z/' | log_time)
    d=$(grep -m1 "snapshot published job=.* snapshot=$snap " "$f" | log_time)
    e=$(grep -m1 "snapshot published run=$run " "$f" | log_time)
    if [[ -n "$a" && -n "$b" && -n "$c" && -n "$d" && -n "$e" ]]; then
        echo "phases: manifest+plan $(sub "$b" "$a") s, transfer $(sub "$c" "$b") s and publish $(sub "$d" "$c") s (split +-1 s), verify+report $(sub "$e" "$d") s"
    else
        echo "phases not found in the log"
    fi
}

# dicops job $1, label $2; warms $3... Sets D_T D_SYNC D_REC D_BYTES
# D_MANIFEST D_TOTAL D_OTHERS D_LOAD D_TAIL D_ID.
dicops_run() {
    local job=$1 label=$2
    shift 2
    local out=$WORK/runs/$label-dicops.txt rc=0
    before_run "$@"
    "$BIN/dicops" run "$job" --follow --config "$CLI" >"$out" 2>&1 || rc=$?
    end_run
    after_run
    D_ID=$(sed -n 's/^started run \([0-9]*\) of .*/\1/p' "$out" | head -1)
    [[ -n "$D_ID" ]] || die "dicops run $job did not start: $(cat "$out")"
    "$BIN/dicops" show "$D_ID" --json --config "$CLI" >"$WORK/runs/$label-dicops.json"
    read -r D_STATUS D_BYTES D_REC < <(perl -MJSON::PP -e '
        my $r = decode_json(join "", <STDIN>);
        printf "%s %s %.3f\n", $r->{status}, $r->{bytes} // 0, ($r->{finished_at} // 0) - $r->{created_at}' <"$WORK/runs/$label-dicops.json")
    D_TAIL=$(perl -MJSON::PP -e 'my $r = decode_json(join "", <STDIN>); my $t = $r->{output_tail} // ""; $t =~ s/\s+$//; print $t' <"$WORK/runs/$label-dicops.json")
    D_T=$T D_SYNC=$SYNC_T D_OTHERS=$OTHERS D_LOAD=$LOAD D_MANIFEST=n/a D_TOTAL=n/a
    if ((rc != 0)) || [[ "$D_STATUS" != succeeded ]]; then
        log "dicops run $D_ID of $job FAILED ($D_STATUS): $(perl -MJSON::PP -e 'print decode_json(join "", <STDIN>)->{error} // ""' <"$WORK/runs/$label-dicops.json")"
        log "  see $out, $WORK/logs/agent-src01.log, $WORK/logs/agent-dst01.log, $WORK/logs/controller.log"
        FAILED+=("$label: dicops run $D_ID of $job $D_STATUS")
        return 0
    fi
    local snap
    snap=$(sed -n 's/^snapshot \([^:]*\):.*/\1/p' <<<"$D_TAIL")
    if [[ -f "$WORK/dicops/$job/manifests/$snap.ndjson" ]]; then
        D_MANIFEST=$(stat -c %s "$WORK/dicops/$job/manifests/$snap.ndjson")
        D_TOTAL=$((D_BYTES + D_MANIFEST))
    fi
    log "  $label dicops: ${D_T} s (+ sync ${D_SYNC} s; run record ${D_REC} s), chunks on the wire $(mib "$D_BYTES") MiB + manifest $(mib "$D_MANIFEST") MiB," \
        "others ${D_OTHERS}% [$OTHERS_TOP] load $LOAD"
    log "    run $D_ID: $D_TAIL"
    log "    $(dicops_phases "$D_ID" "$snap")"
}

# rsync label $1 from $2 to $3 with extra options $4 (may be empty); warms
# $5... Sets S_T S_SYNC S_SENT S_RECV S_LIT S_SSH S_OTHERS S_LOAD RSYNC_PID.
rsync_run() {
    local label=$1 src=$2 dst=$3 opts=$4
    shift 4
    local out=$WORK/runs/$label-rsync${opts// /}.txt rc=0
    before_run "$@"
    # shellcheck disable=SC2086
    rsync -a $opts --stats -e "$RSH" "$src/" "root@127.0.0.1:$dst/" >"$out" 2>&1 &
    RSYNC_PID=$!
    wait "$RSYNC_PID" || rc=$?
    end_run
    after_run
    ((rc == 0)) || { FAILED+=("$label: rsync exit $rc"); log "rsync $label failed ($rc): $(tail -3 "$out")"; }
    S_SENT=$(sed -n 's/^Total bytes sent: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_RECV=$(sed -n 's/^Total bytes received: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_LIT=$(sed -n 's/^Literal data: \([0-9,]*\).*/\1/p' "$out" | tr -d ,)
    S_SSH=$(sed -n 's/^Transferred: sent \([0-9]*\), received.*/\1/p' "$out" | tail -1)
    S_SENT=${S_SENT:-n/a} S_RECV=${S_RECV:-n/a} S_LIT=${S_LIT:-n/a} S_SSH=${S_SSH:-n/a}
    S_T=$T S_SYNC=$SYNC_T S_OTHERS=$OTHERS S_LOAD=$LOAD
    log "  $label rsync${opts:+ $opts}: ${S_T} s (+ sync ${S_SYNC} s), sent $(mib "$S_SENT") MiB (literal data $(mib "$S_LIT"), received $(mib "$S_RECV"); ssh sent $(mib "$S_SSH") MiB)," \
        "others ${S_OTHERS}% [$OTHERS_TOP] load $LOAD"
}

# Records the last run of tool $2 (dicops|rsync|fuzzy|plain) under scenario
# $1, repetition $3.
record() {
    local sc=$1 tool=$2 rep=$3 line
    if [[ $tool == dicops ]]; then
        add "$sc.dicops.t" "$D_T"
        add "$sc.dicops.sync" "$(awk -v a="$D_T" -v b="$D_SYNC" 'BEGIN { print a + b }')"
        add "$sc.dicops.rec" "$D_REC"
        add "$sc.dicops.bytes" "$D_BYTES"
        add "$sc.dicops.total" "$D_TOTAL"
        add "$sc.dicops.others" "$D_OTHERS"
        line="$D_T $D_SYNC $D_REC $D_BYTES $D_TOTAL $D_OTHERS $D_LOAD"
        OTH=$D_OTHERS
    else
        add "$sc.$tool.t" "$S_T"
        add "$sc.$tool.sync" "$(awk -v a="$S_T" -v b="$S_SYNC" 'BEGIN { print a + b }')"
        add "$sc.$tool.bytes" "$S_SENT"
        add "$sc.$tool.total" "$S_SSH"
        add "$sc.$tool.lit" "$S_LIT"
        add "$sc.$tool.others" "$S_OTHERS"
        line="$S_T $S_SYNC - $S_SENT $S_SSH $S_OTHERS $S_LOAD"
        OTH=$S_OTHERS
    fi
    if awk -v o="$OTH" -v m="$DISTURBED_PCT" 'BEGIN { exit !(o > m) }'; then
        add disturbed "$sc/$tool/$rep"
    fi
    echo "$sc $rep $tool $line" >>"$WORK/runs/all.txt"
}

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
mkdir -p "$WORK/gen/base/big" "$WORK/gen/base/small"
for i in $(seq "$BIG_FILES"); do
    keystream "dicops-bench-big-$i" $((BIG_MIB << 20)) >"$WORK/gen/base/big/big-$i.bin"
done
SMALL_BYTES=$(genpl small "$WORK/gen/base/small" "$SMALL_FILES" 1 "$SMALL_MIN" "$SMALL_MAX")
FRESH_BYTES=$((BIG_FILES * (BIG_MIB << 20) + SMALL_BYTES))
# Every dicops fresh copy reads its own export (its own chunk cache); all
# are hard links to one tree, made now (a link changes the files' ctime,
# which dicops's chunk cache checks).
for k in $(seq "$FRESH_RUNS"); do
    rmdir "$WORK/src/fresh-$k"
    cp -al "$WORK/gen/base" "$WORK/src/fresh-$k"
done
genpl dump "$WORK/gen/dump-27" 27 "$DUMP_MIB"
DUMP_ZSTD=n/a
if command -v zstd >/dev/null; then
    DUMP_ZSTD=$(head -c $((64 << 20)) "$WORK/gen/dump-27" | zstd -3 -c | wc -c)
fi
TREE_BYTES=0
if ((TREE_FILES > 0)); then
    TREE_BYTES=$(genpl small "$WORK/src/tree" "$TREE_FILES" 6 "$TREE_MIN" "$TREE_MAX")
fi
sync
log "data made in $(sub "$(now)" "$t") s"
echo "fresh set: $BIG_FILES x $BIG_MIB MiB incompressible + $SMALL_FILES text files of $SMALL_MIN-$SMALL_MAX bytes ($SMALL_BYTES bytes) = $FRESH_BYTES bytes"
echo "dump: $DUMP_MIB MiB of text rows (zstd -3 makes $DUMP_ZSTD bytes of its first 64 MiB); each new dump has $DUMP_CHANGED of its 1 MiB blocks rewritten"
echo "tree: $TREE_FILES files of $TREE_MIN-$TREE_MAX bytes ($TREE_BYTES bytes)"

SRC=$WORK/src/fresh-1
RT=$WORK/rsync/fresh-1
DT=$WORK/dicops/fresh-1

# ---------------------------------------------------------------------------
# 1. Fresh copies by rsync, and rsync's part of 6, while no mass delete has
#    happened
# ---------------------------------------------------------------------------

echo
echo "--- 1. fresh copy ($FRESH_BYTES bytes): rsync x $RUNS, then dicops"
for r in $(seq "$RUNS"); do
    rsync_run "s1-$r" "$SRC" "$WORK/rsync/fresh-$r" "" "$SRC"
    record s1 rsync "$r"
    # Only the first copy is used again; the large files of the others go.
    ((r == 1)) || find "$WORK/rsync/fresh-$r" -type f -size +100M -delete
done

if ((TREE_FILES > 0)); then
    echo
    echo "--- 6. (rsync) $TREE_FILES files"
    rsync_mem() { # label: runs rsync_run while sampling; sets M_SENDER M_GEN M_RECV (KiB)
        local stop=$WORK/runs/$1-mem.stop
        rm -f "$stop"
        genpl rsync-mem $$ "$stop" >"$WORK/runs/$1-mem.txt" &
        local sampler=$!
        BENCH_PIDS+=("$sampler")
        rsync_run "$1" "$WORK/src/tree" "$WORK/rsync/tree" "" "$WORK/src/tree" "$WORK/rsync/tree"
        touch "$stop"
        wait "$sampler" || true
        forget_pid "$sampler"
        # The client is the sender; on the server, the receiver is the child
        # of the generator.
        read -r M_SENDER M_GEN M_RECV < <(awk -v c="$RSYNC_PID" '
            { hwm[$1] = $3; parent[$1] = $2 }
            END { s = 0; g = 0; r = 0
                  for (p in hwm) { if (p == c) s = hwm[p]; else if ((parent[p] in hwm) && parent[p] != c) r = hwm[p]; else g = hwm[p] }
                  print s, g, r }' "$WORK/runs/$1-mem.txt")
        log "    rsync VmHWM: sender $(kib_to_mib "$M_SENDER") MiB, generator $(kib_to_mib "$M_GEN") MiB, receiver $(kib_to_mib "$M_RECV") MiB"
    }
    rsync_mem s6
    record s6 rsync 1
    R6=("$M_SENDER" "$M_GEN" "$M_RECV")
    rsync_mem s6b
    record s6b rsync 1
    R6B=("$M_SENDER" "$M_GEN" "$M_RECV")
fi

echo
echo "--- 1. (dicops) fresh copy"
dicops_run fresh-1 s1-1 "$SRC"
record s1 dicops 1
LAST_MASS_DELETE=$(now)

# ---------------------------------------------------------------------------
# 2. and 3.
# ---------------------------------------------------------------------------

order_of() { if (($1 % 2)); then echo "rsync dicops"; else echo "dicops rsync"; fi; }

echo
echo "--- 2. nothing changed, x $RUNS"
for r in $(seq "$RUNS"); do
    for tool in $(order_of "$r"); do
        if [[ $tool == rsync ]]; then
            rsync_run "s2-$r" "$SRC" "$RT" "" "$SRC" "$RT"
            record s2 rsync "$r"
        else
            dicops_run fresh-1 "s2-$r" "$SRC" "$DT/latest"
            record s2 dicops "$r"
        fi
    done
done

echo
echo "--- 3. $SMALL_CHANGED small files and $APPEND_MIB MiB appended, x $RUNS"
for r in $(seq "$RUNS"); do
    changed=$(genpl touch "$SRC/small" "$SMALL_CHANGED" $((100 + r)))
    k=$(((r - 1) % BIG_FILES + 1))
    cp "$SRC/big/big-$k.bin" "$SRC/big/.big-$k.tmp"
    keystream "dicops-bench-append-$r" $((APPEND_MIB << 20)) >>"$SRC/big/.big-$k.tmp"
    mv "$SRC/big/.big-$k.tmp" "$SRC/big/big-$k.bin"
    sync
    add s3.changed $((changed + (APPEND_MIB << 20)))
    for tool in $(order_of "$r"); do
        if [[ $tool == rsync ]]; then
            rsync_run "s3-$r" "$SRC" "$RT" "" "$SRC" "$RT"
            record s3 rsync "$r"
        else
            dicops_run fresh-1 "s3-$r" "$SRC" "$DT/latest"
            record s3 dicops "$r"
        fi
    done
done

# ---------------------------------------------------------------------------
# 4. and 5.: the dumps export
# ---------------------------------------------------------------------------

DS=$WORK/src/dumps
RD=$WORK/rsync/dumps
DD=$WORK/dicops/dumps
day() { printf '2026-11-%02d' $((27 + $1)); }
echo
echo "--- yesterday's dump ($DUMP_MIB MiB, twice) into the dumps export (untimed figures)"
mkdir -p "$DS/dumps" "$DS/$(day 0)"
ln "$WORK/gen/dump-27" "$DS/dumps/db-$(day 0).dump"
ln "$WORK/gen/dump-27" "$DS/$(day 0)/db.dump"
rm "$WORK/gen/dump-27"
sync
for tool in rsync dicops; do
    if [[ $tool == rsync ]]; then
        rsync_run prep "$DS" "$RD" "" "$DS"
        record prep rsync 1
    else
        dicops_run dumps prep "$DS"
        record prep dicops 1
        LAST_MASS_DELETE=$(now)
    fi
done

echo
echo "--- 4. and 5.: $RUNS days, $DUMP_CHANGED of $DUMP_MIB 1 MiB blocks changed in each new dump"
for r in $(seq "$RUNS"); do
    y=$(day $((r - 1))) d=$(day "$r")
    # Today's dumps: yesterday's with other blocks rewritten (4: new name; 5: new folder).
    cp "$DS/dumps/db-$y.dump" "$WORK/gen/named.tmp"
    blocks4=$(genpl patch "$WORK/gen/named.tmp" $((40 + r)) "$DUMP_MIB" "$DUMP_CHANGED")
    mv "$WORK/gen/named.tmp" "$DS/dumps/db-$d.dump"
    cp "$DS/$y/db.dump" "$WORK/gen/dated.tmp"
    blocks5=$(genpl patch "$WORK/gen/dated.tmp" $((80 + r)) "$DUMP_MIB" "$DUMP_CHANGED")
    sync
    log "day $d: dumps/db-$d.dump blocks [$blocks4]; $d/db.dump blocks [$blocks5]"

    cp -al "$RD" "$WORK/rsync/dumps-plain"
    for tool in $(order_of "$r"); do
        if [[ $tool == rsync ]]; then
            rsync_run "s4-$r" "$DS" "$WORK/rsync/dumps-plain" "" "$DS/dumps" "$WORK/rsync/dumps-plain/dumps"
            record s4 plain "$r"
            rsync_run "s4-$r" "$DS" "$RD" "--fuzzy" "$DS/dumps" "$RD/dumps"
            record s4 fuzzy "$r"
        else
            dicops_run dumps "s4-$r" "$DS/dumps" "$DD/latest/dumps"
            record s4 dicops "$r"
        fi
    done
    rm -rf "$WORK/rsync/dumps-plain"

    mkdir -p "$DS/$d"
    mv "$WORK/gen/dated.tmp" "$DS/$d/db.dump"
    sync
    for tool in $(order_of "$r"); do
        if [[ $tool == rsync ]]; then
            rsync_run "s5-$r" "$DS" "$RD" "--fuzzy" "$DS/$y" "$DS/$d" "$RD/$y"
            record s5 fuzzy "$r"
        else
            dicops_run dumps "s5-$r" "$DS/$y" "$DS/$d" "$DD/latest/$y"
            record s5 dicops "$r"
        fi
    done
    # Rotation: yesterday's dumps go from the source and from rsync's
    # folder (dicops keeps its last 2 snapshots).
    rm -f "$DS/dumps/db-$y.dump" "$RD/dumps/db-$y.dump"
    rm -rf "${DS:?}/$y" "${RD:?}/$y"
done

# ---------------------------------------------------------------------------
# More dicops fresh copies (FRESH_RUNS > 1), each after a rest
# ---------------------------------------------------------------------------

for k in $(seq 2 "$FRESH_RUNS"); do
    echo
    echo "--- 1. (dicops) fresh copy $k"
    rest_after_delete
    dicops_run "fresh-$k" "s1-$k" "$WORK/src/fresh-$k"
    record s1 dicops "$k"
    LAST_MASS_DELETE=$(now)
    find "$WORK/dicops/fresh-$k" -type f -size +100M -delete
done
HWM_S15=$(mem_kib "$AGENT_src01" | awk '{ print $2 }')
HWM_D15=$(mem_kib "$AGENT_dst01" | awk '{ print $2 }')

# ---------------------------------------------------------------------------
# 6. (dicops) the tree: memory and time, on freshly started agents
# ---------------------------------------------------------------------------

if ((TREE_FILES > 0)); then
    echo
    echo "--- 6. (dicops) $TREE_FILES files, agents restarted"
    stop_pid "$AGENT_src01"
    stop_pid "$AGENT_dst01"
    start_agent src01
    start_agent dst01
    agents_up
    HWM_S0=$(mem_kib "$AGENT_src01" | awk '{ print $2 }')
    HWM_D0=$(mem_kib "$AGENT_dst01" | awk '{ print $2 }')
    rest_after_delete
    dicops_run tree s6 "$WORK/src/tree"
    record s6 dicops 1
    LAST_MASS_DELETE=$(now)
    read -r _ HWM_S6 < <(mem_kib "$AGENT_src01")
    read -r _ HWM_D6 < <(mem_kib "$AGENT_dst01")
    log "    agents' VmHWM after the fresh copy: src01 $(kib_to_mib "$HWM_S6") MiB, dst01 $(kib_to_mib "$HWM_D6") MiB" \
        "(right after start: $(kib_to_mib "$HWM_S0"), $(kib_to_mib "$HWM_D0")); VmRSS now: src01 $(mem_kib "$AGENT_src01" | awk '{ printf "%.1f", $1 / 1024 }'), dst01 $(mem_kib "$AGENT_dst01" | awk '{ printf "%.1f", $1 / 1024 }') MiB"
    dicops_run tree s6b "$WORK/src/tree" "$WORK/dicops/tree/latest"
    record s6b dicops 1
    read -r _ HWM_S6B < <(mem_kib "$AGENT_src01")
    read -r _ HWM_D6B < <(mem_kib "$AGENT_dst01")
    log "    agents' VmHWM after the unchanged re-sync: src01 $(kib_to_mib "$HWM_S6B") MiB, dst01 $(kib_to_mib "$HWM_D6B") MiB"
fi

# ---------------------------------------------------------------------------
# Summary, in the form of BENCHMARKS.md
# ---------------------------------------------------------------------------

ch=$((DUMP_CHANGED << 20))
max_mib() { awk -v a="$1" -v b="$2" 'BEGIN { m = (a > b) ? a : b; printf "%.2f", m / 1024 }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "n/a") printf "%.1f%%", 100 * a / b; else print "n/a" }'; }
mbs() { awk -v b="$1" -v t="$2" 'BEGIN { if (t > 0) printf "%.1f", b / t / 1e6; else print "n/a" }'; }

echo
echo "=== summary: median (min-max); times in s; MiB = 2^20 bytes; rsync's \"bytes\" = Total bytes sent (ssh's count);"
echo "=== dicops's = RunInfo.bytes (+ the manifest); x = per-repetition ratio, then median (min-max)"
{
    echo
    echo "| scenario | figure | rsync -a over ssh | dicops | dicops against rsync | target | met? |"
    echo "|---|---|---|---|---|---|---|"
    echo "| 1. fresh copy, $(awk -v b="$FRESH_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') ($BIG_FILES x $BIG_MIB MiB + $SMALL_FILES files); rsync $RUNS runs, dicops $FRESH_RUNS | time | $(st s1.rsync.t) | $(st s1.dicops.t) (run record $(st s1.dicops.rec)) | speed $(div "$(med s1.rsync.t)" "$(med s1.dicops.t)")x rsync's | >= 1.5x | $(yes_no "$(div "$(med s1.rsync.t)" "$(med s1.dicops.t)")" '>=' 1.5) |"
    echo "| | time + sync | $(st s1.rsync.sync) | $(st s1.dicops.sync) | $(div "$(med s1.rsync.sync)" "$(med s1.dicops.sync)")x | >= 1.5x | $(yes_no "$(div "$(med s1.rsync.sync)" "$(med s1.dicops.sync)")" '>=' 1.5) |"
    echo "| | throughput | $(mbs "$FRESH_BYTES" "$(med s1.rsync.t)") MB/s | $(mbs "$FRESH_BYTES" "$(med s1.dicops.t)") MB/s | | | |"
    echo "| | MiB sent | $(mibs s1.rsync.bytes) ($(mibs s1.rsync.total)) | $(mibs s1.dicops.bytes) (+ manifest: $(mibs s1.dicops.total)) | | | |"
    echo "| 2. nothing changed ($RUNS runs) | time | $(st s2.rsync.t) | $(st s2.dicops.t) (run record $(st s2.dicops.rec)) | $(rs s2.rsync.t s2.dicops.t)x faster (run record $(rs s2.rsync.t s2.dicops.rec)x) | >= 5x | $(yes_no "$(rmed s2.rsync.t s2.dicops.t)" '>=' 5) (run record: $(yes_no "$(rmed s2.rsync.t s2.dicops.rec)" '>=' 5)) |"
    echo "| | MiB sent | $(mibs s2.rsync.bytes) ($(mibs s2.rsync.total)) | $(mibs s2.dicops.bytes) (+ manifest: $(mibs s2.dicops.total)) | | | |"
    echo "| 3. $SMALL_CHANGED small files (1 KiB each) changed + $APPEND_MIB MiB appended: $(mibs s3.changed) MiB changed ($RUNS runs) | time | $(st s3.rsync.t) | $(st s3.dicops.t) (run record $(st s3.dicops.rec)) | $(rs s3.rsync.t s3.dicops.t)x faster | | |"
    echo "| | MiB sent | $(mibs s3.rsync.bytes) ($(mibs s3.rsync.total)) | $(mibs s3.dicops.bytes) (+ manifest: $(mibs s3.dicops.total)) | | | |"
    echo "| 4. new dump under a new name: $DUMP_CHANGED of $DUMP_MIB 1 MiB blocks changed = $(mib "$ch") MiB ($RUNS days) | MiB sent | plain $(mibs s4.plain.bytes); --fuzzy $(mibs s4.fuzzy.bytes) ($(mibs s4.fuzzy.total)) | $(mibs s4.dicops.bytes) (+ manifest: $(mibs s4.dicops.total)) | $(div "$(med s4.dicops.bytes)" "$ch")x the changed bytes (with manifest $(div "$(med s4.dicops.total)" "$ch")x); $(pct "$(med s4.dicops.bytes)" "$(med s4.plain.bytes)") of plain rsync's | <= 1.25x changed; <= 10% of plain rsync | $(yes_no "$(div "$(med s4.dicops.total)" "$ch")" '<=' 1.25) / $(yes_no "$(div "$(med s4.dicops.total)" "$(med s4.plain.bytes)")" '<=' 0.10) |"
    echo "| | time | plain $(st s4.plain.t); --fuzzy $(st s4.fuzzy.t) | $(st s4.dicops.t) (run record $(st s4.dicops.rec)) | $(rs s4.fuzzy.t s4.dicops.t)x --fuzzy's speed | | |"
    echo "| 5. same kind of dump in a new dated folder ($RUNS days) | MiB sent | --fuzzy $(mibs s5.fuzzy.bytes) ($(mibs s5.fuzzy.total)) | $(mibs s5.dicops.bytes) (+ manifest: $(mibs s5.dicops.total)) | $(div "$(med s5.dicops.bytes)" "$ch")x the changed bytes (with manifest $(div "$(med s5.dicops.total)" "$ch")x); rsync --fuzzy $(div "$(med s5.fuzzy.bytes)" "$ch")x | <= 1.25x changed | $(yes_no "$(div "$(med s5.dicops.total)" "$ch")" '<=' 1.25) |"
    echo "| | time | --fuzzy $(st s5.fuzzy.t) | $(st s5.dicops.t) (run record $(st s5.dicops.rec)) | $(rs s5.fuzzy.t s5.dicops.t)x --fuzzy's speed | | |"
    if ((TREE_FILES > 0)); then
        echo "| 6. $TREE_FILES files ($(awk -v b="$TREE_BYTES" 'BEGIN { printf "%.0f MB", b / 1e6 }')), fresh copy (1 run) | time (+ sync) | $(st s6.rsync.t) ($(st s6.rsync.sync)) | $(st s6.dicops.t) ($(st s6.dicops.sync)); run record $(st s6.dicops.rec) | speed $(div "$(med s6.rsync.t)" "$(med s6.dicops.t)")x rsync's | | |"
        echo "| | peak memory (VmHWM), MiB | sender $(kib_to_mib "${R6[0]}"), generator $(kib_to_mib "${R6[1]}"), receiver $(kib_to_mib "${R6[2]}") | src01 $(kib_to_mib "$HWM_S6"), dst01 $(kib_to_mib "$HWM_D6") (after start: $(kib_to_mib "$HWM_S0"), $(kib_to_mib "$HWM_D0")) | | < 256 MiB per agent | $(yes_no "$(max_mib "$HWM_S6" "$HWM_D6")" '<=' 255.99) |"
        echo "| | MiB sent | $(mibs s6.rsync.bytes) ($(mibs s6.rsync.total)) | $(mibs s6.dicops.bytes) (+ manifest: $(mibs s6.dicops.total)) | | | |"
        echo "| 6b. same tree, nothing changed (1 run) | time | $(st s6b.rsync.t) | $(st s6b.dicops.t) (run record $(st s6b.dicops.rec)) | $(div "$(med s6b.rsync.t)" "$(med s6b.dicops.t)")x faster | | |"
        echo "| | peak memory (VmHWM since start), MiB | sender $(kib_to_mib "${R6B[0]}"), generator $(kib_to_mib "${R6B[1]}"), receiver $(kib_to_mib "${R6B[2]}") | src01 $(kib_to_mib "$HWM_S6B"), dst01 $(kib_to_mib "$HWM_D6B") | | < 256 MiB per agent | $(yes_no "$(max_mib "$HWM_S6B" "$HWM_D6B")" '<=' 255.99) |"
    fi
    echo "| agents' VmHWM over scenarios 1-5 | | | src01 $(kib_to_mib "$HWM_S15"), dst01 $(kib_to_mib "$HWM_D15") MiB | | < 256 MiB per agent | $(yes_no "$(max_mib "$HWM_S15" "$HWM_D15")" '<=' 255.99) |"
    echo
    echo "Yesterday's dump, first copy (two files of the same $DUMP_MIB MiB, untimed in the scenarios): rsync $(st prep.rsync.t) s," \
        "$(mibs prep.rsync.bytes) MiB sent; dicops $(st prep.dicops.t) s, $(mibs prep.dicops.bytes) MiB of chunks on the wire (+ manifest: $(mibs prep.dicops.total))."
    echo
    echo "Every run: scenario, repetition, tool, time s, sync s, run record s, bytes sent, with manifest (dicops) or ssh's count (rsync), others' CPU % of a core, load (1 5 15 min) before:"
    echo
    echo '```'
    cat "$WORK/runs/all.txt"
    echo '```'
    echo
    echo "Runs during which other processes used more than ${DISTURBED_PCT}% of a core: ${R[disturbed]:-none}"
} | tee "$WORK/summary.md"
if ((${#FAILED[@]})); then
    echo
    echo "FAILURES:"
    printf '  %s\n' "${FAILED[@]}"
fi
echo
echo "took ${SECONDS} s"
[[ -z "${KEEP:-}" ]] || echo "logs: $WORK/logs; outputs of every run: $WORK/runs"
