#!/usr/bin/env bash
# Write → durably applied latency of deltaplane (real CP and DP processes, mTLS, durable at both
# ends) side by side with etcd (write → watch event, default durability), in the same runs with
# the writes alternating between the two systems. See `examples/loadtest.rs` (`latency`).
#
#   scripts/bench-latency.sh                    # 1 and 10 DPs / watchers, 300 writes, 3 runs
#   DPS=1 RUNS=1 scripts/bench-latency.sh --keep  # other arguments go to `loadtest latency`
#
# etcd comes from Debian's `etcd-server` package (installed here when `etcd` is missing and
# apt-get is usable); without it the deltaplane side still runs and the comparison is skipped
# with the reason. ETCD=/path/to/etcd picks another binary.
set -euo pipefail
cd "$(dirname "$0")/.."

etcd_bin="${ETCD:-etcd}"
etcd_args=()
if ! command -v "$etcd_bin" >/dev/null 2>&1; then
    why=""
    if [ -n "${ETCD:-}" ]; then
        why="ETCD=$ETCD is not an executable"
    elif ! command -v apt-get >/dev/null 2>&1; then
        why="etcd is not installed and apt-get is not available"
    else
        echo "etcd not found: installing Debian's etcd-server package" >&2
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
        fi
        apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y etcd-server >&2; }
        if ! apt_install && ! { $sudo apt-get update >&2 && apt_install; }; then
            why="apt-get install etcd-server failed (see above)"
        elif ! command -v etcd >/dev/null 2>&1; then
            why="etcd-server installed but no etcd on PATH"
        fi
    fi
    if [ -n "$why" ]; then
        echo "etcd comparison skipped: $why" >&2
        etcd_args=(--no-etcd)
    fi
fi
if [ ${#etcd_args[@]} -eq 0 ]; then
    etcd_args=(--etcd "$(command -v "$etcd_bin")")
fi

# Build once, then run private copies of the binaries: a target dir shared with other builds
# may have its top-level target/release/deltaplane-* replaced meanwhile.
bin_dir="$(mktemp -d -t bench-latency-bin.XXXXXX)"
trap 'rm -rf "$bin_dir"' EXIT
cargo build --release --bins --examples --message-format=json-render-diagnostics \
    | { grep -o '"executable":"[^"]*"' || true; } | cut -d'"' -f4 | while read -r exe; do
        case "$(basename "$exe")" in
            deltaplane-cp | deltaplane-dp | loadtest) cp "$exe" "$bin_dir/" ;;
        esac
    done
for b in deltaplane-cp deltaplane-dp loadtest; do
    [ -x "$bin_dir/$b" ] || { echo "build did not produce $b" >&2; exit 1; }
done
"$bin_dir/loadtest" --bin-dir "$bin_dir" latency \
    --dps "${DPS:-1,10}" --writes "${WRITES:-300}" --runs "${RUNS:-3}" "${etcd_args[@]}" "$@"
