#!/usr/bin/env bash
# The side-by-side benchmark of issue 9, in one command: builds the release binaries,
# installs the Debian peers when missing, runs every scenario binary with --tsv (tocsin
# and its peer in the same run) and prints ONE Markdown table with medians, min–max, the
# ratio tocsin / peer and whether the issue's target is met.
#
#   bash bench/side-by-side.sh [--quick] [--only SCENARIO] [--no-build]
#   bash bench/side-by-side.sh --render FILE.tsv     # only print the table of saved rows
#
# Scenarios, in order (full run / --quick):
#   footprint  bench-agent-cost SECONDS RUNS 0    60 s x 3 runs  / 5 s x 1   (3.3 min / 10 s)
#   onset      bench-onset RUNS                   5 runs         / 1 run     (skipped if not built)
#   ingest     bench-ingest 100 EVENTS            100 agents x 2000 / x 200  (15 s / 1 s)
#   restart    bench-restart RUNS                 20 kills each  / 3         (2.3 min / 25 s)
# Measured on 2 cores without onset: 5.8 min for a full run, 40 s with --quick, plus the
# build; with onset a full run should stay under 15 minutes. Every scenario is bounded
# by the binary itself.
#
# Raw rows go to target/side-by-side.tsv (one row per metric and peer, described in
# BENCHMARKS.md), progress and each binary's own tables to
# target/side-by-side.log and stderr, the table to stdout. Loopback only. Every process
# started is stopped: the binaries stop theirs (also on SIGTERM); on Ctrl-C or SIGTERM
# this script stops the running binary and its descendants, by PID.
set -euo pipefail

usage() {
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
}

cd "$(dirname "$0")/.."

SCENARIOS=(footprint onset ingest restart)
quick=0
only=""
build=1
render=""
while (($#)); do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --quick) quick=1 ;;
        --no-build) build=0 ;;
        --only)
            [[ $# -ge 2 ]] || {
                echo "--only needs a scenario: ${SCENARIOS[*]}" >&2
                exit 2
            }
            only=$2
            shift
            ;;
        --render)
            [[ $# -ge 2 ]] || {
                echo "--render needs a TSV file" >&2
                exit 2
            }
            render=$2
            shift
            ;;
        *)
            echo "unknown argument: $1 (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done
if [[ -n $only ]] && [[ " ${SCENARIOS[*]} " != *" $only "* ]]; then
    echo "unknown scenario: $only (one of: ${SCENARIOS[*]})" >&2
    exit 2
fi

# Prints the Markdown table of the rows in $1. Rows: 11 tab-separated fields; lines
# starting with "#note<TAB>SCENARIO<TAB>TEXT" become note rows.
render_table() {
    awk -F '\t' '
    function num(x) { return x != "-" && x ~ /^-?[0-9.]+(e[-+]?[0-9]+)?$/ }
    function ms(x, unit) { return unit == "s" ? x * 1000 : x }
    # The target text against the row: yes, no or - (cannot be decided here).
    # A compound target "A, B" is met when every part is; "-" when any part cannot be decided.
    function met(target, unit, t, peer, p, ratio,    parts, k, np, r, all) {
        np = split(target, parts, /, */)
        all = "yes"
        for (k = 1; k <= np; k++) {
            r = met1(parts[k], unit, t, peer, p, ratio)
            if (r == "-") return "-"
            if (r == "no") all = "no"
        }
        return all
    }
    function met1(target, unit, t, peer, p, ratio,    f, n, lim, tu) {
        n = split(target, f, " ")
        if (target == "-" || n < 2 || !num(t)) return "-"
        if (n == 4 && f[3] == "x" && f[4] == "peer") {
            if (ratio == "-") return "-"
            return (f[1] == "<=" ? ratio + 0 <= f[2] + 0 : ratio + 0 >= f[2] + 0) ? "yes" : "no"
        }
        if (num(f[2])) {
            lim = f[2]; tu = (n >= 3 ? f[3] : unit)
            if (tu != unit) {
                if ((tu == "ms" || tu == "s") && (unit == "ms" || unit == "s")) { lim = ms(lim, tu); t = ms(t, unit) }
                else return "-"
            }
        } else if (n == 2 && f[2] == peer && num(p)) {
            lim = p
        } else return "-"
        if (f[1] == "<=") return t + 0 <= lim + 0 ? "yes" : "no"
        if (f[1] == ">=") return t + 0 >= lim + 0 ? "yes" : "no"
        return "-"
    }
    function spread(m, lo, hi, unit) {
        if (m == "-") return "-"
        return m " " unit " (" lo "–" hi ")"
    }
    BEGIN {
        print "| scenario | metric | tocsin median (min–max) | peer | peer median (min–max) | ratio tocsin/peer | target | met |"
        print "|---|---|---|---|---|---:|---|---|"
    }
    /^#note\t/ { printf "| %s | - | %s | - | - | - | - | - |\n", $2, $3; next }
    /^#/ || NF == 0 { next }
    NF != 11 { row = $0; gsub(/\t/, " ", row); printf "| ? | - | malformed row (%d fields): %s | - | - | - | - | - |\n", NF, row; next }
    {
        ratio = (num($4) && num($8) && $8 + 0 != 0) ? $4 / $8 : "-"
        printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, spread($4, $5, $6, $3),
            $7, spread($8, $9, $10, $3), ratio == "-" ? "-" : sprintf("%.2f", ratio), $11,
            met($11, $3, $4, $7, $8, ratio)
    }' "$1"
}

if [[ -n $render ]]; then
    render_table "$render"
    exit 0
fi

mkdir -p target
TSV=target/side-by-side.tsv
LOG=target/side-by-side.log
: >"$TSV"
: >"$LOG"
note() { printf '%s\n' "side-by-side: $*" | tee -a "$LOG" >&2; }

# The running scenario binary; stopped with its descendants on Ctrl-C or SIGTERM.
child=""
descendants() {
    local p
    for p in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$p"
        descendants "$p"
    done
}
stop_tree() {
    local root=$1 pids p
    pids=$(descendants "$root")
    # The binary first: it stops what it started (bench-restart also on SIGTERM).
    kill -TERM "$root" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$root" 2>/dev/null || true
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
}
on_signal() {
    trap - INT TERM
    if [[ -n $child ]]; then
        note "interrupted: stopping PID $child and its descendants"
        stop_tree "$child"
    fi
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

wanted() { [[ -z $only || $only == "$1" ]]; }

# Debian peers per scenario (each binary also installs its own when missing).
declare -A PEERS=(
    [footprint]="prometheus-node-exporter collectd-core"
    [onset]="prometheus prometheus-node-exporter prometheus-alertmanager stress-ng"
    [ingest]=""
    [restart]="monit"
)
missing=()
for s in "${SCENARIOS[@]}"; do
    wanted "$s" || continue
    for pkg in ${PEERS[$s]}; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
        fi
    done
done
if ((${#missing[@]})); then
    note "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1 ||
        { apt-get update >>"$LOG" 2>&1 && apt-get install -y --no-install-recommends "${missing[@]}" >>"$LOG" 2>&1; } ||
        note "could not install ${missing[*]} (not root?); the scenarios needing them will fail"
fi

if ((build)); then
    note "building the release binaries"
    cargo build --release --locked --bins
fi

# Runs one scenario binary with --tsv; its rows go to the TSV, a failure to a note row.
run() {
    local scenario=$1 bin=target/release/$2 part rc
    shift 2
    if [[ ! -x $bin ]]; then
        note "$scenario: $bin is not built; skipped"
        printf '#note\t%s\tnot run: %s is not built\n' "$scenario" "$bin" >>"$TSV"
        return
    fi
    note "$scenario: $bin $* --tsv"
    part=$(mktemp)
    local start=$SECONDS
    "$bin" "$@" --tsv >"$part" 2> >(tee -a "$LOG" >&2) &
    child=$!
    if wait "$child"; then rc=0; else rc=$?; fi
    child=""
    if ((rc != 0)); then
        note "$scenario: failed with exit code $rc (see $LOG)"
        printf '#note\t%s\tfailed with exit code %s (see %s)\n' "$scenario" "$rc" "$LOG" >>"$TSV"
    fi
    cat "$part" >>"$TSV"
    rm -f "$part"
    note "$scenario: done in $((SECONDS - start)) s"
}

if ((quick)); then
    wanted footprint && run footprint bench-agent-cost 5 1 0
    wanted onset && run onset bench-onset 1
    wanted ingest && run ingest bench-ingest 100 200
    wanted restart && run restart bench-restart 3
else
    wanted footprint && run footprint bench-agent-cost 60 3 0
    wanted onset && run onset bench-onset 5
    wanted ingest && run ingest bench-ingest 100 2000
    wanted restart && run restart bench-restart 20
fi

mode=""
((quick)) && mode=", --quick"
mem=$(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
printf '\nSide by side (issue 9), %s, %s cores, %s RAM%s; raw rows: %s\n\n' \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" "$mem" "$mode" "$TSV"
render_table "$TSV"
