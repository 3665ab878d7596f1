#!/usr/bin/env bash
# Proxy benchmarks of the data plane (issue 12), with the real deltaplane-cp / deltaplane-dp
# release binaries and, in the same run, nginx as the peer. See `examples/proxybench.rs`.
#
#   scripts/bench-proxy.sh             # efficiency vs nginx, Admin write → route served, churn
#   scripts/bench-proxy.sh --quick     # short durations (a smoke run)
#   scripts/bench-proxy.sh --keep      # other arguments go to `proxybench` (see --help)
#   scripts/bench-proxy.sh --realtime --runs 3   # on a machine shared with builds: SCHED_FIFO
#                                                # for the harness and the proxies (root), and
#                                                # 3 interleaved rounds (medians)
#
# nginx comes from Debian's `nginx-light` package (installed here when `nginx` is missing and
# apt-get is usable); without it the deltaplane side still runs and the comparison is skipped
# with the reason. NGINX=/path/to/nginx picks another binary.
set -euo pipefail
cd "$(dirname "$0")/.."

nginx_bin="${NGINX:-nginx}"
nginx_args=()
if ! command -v "$nginx_bin" >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    why=""
    if [ -n "${NGINX:-}" ]; then
        why="NGINX=$NGINX is not an executable"
    elif ! command -v apt-get >/dev/null 2>&1; then
        why="nginx is not installed and apt-get is not available"
    else
        echo "nginx not found: installing Debian's nginx-light package" >&2
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then
            if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
        fi
        apt_install() {
            $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light >&2 ||
                $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y nginx >&2
        }
        if ! apt_install && ! { $sudo apt-get update >&2 && apt_install; }; then
            why="apt-get install nginx-light (or nginx) failed (see above)"
        elif ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
            why="nginx installed but no nginx on PATH or in /usr/sbin"
        fi
    fi
    if [ -n "$why" ]; then
        echo "nginx comparison skipped: $why" >&2
        nginx_args=(--no-nginx)
    fi
fi
if [ ${#nginx_args[@]} -eq 0 ]; then
    if command -v "$nginx_bin" >/dev/null 2>&1; then
        nginx_args=(--nginx "$(command -v "$nginx_bin")")
    else
        nginx_args=(--nginx /usr/sbin/nginx)
    fi
fi

# Build once, then run private copies of the binaries: a target dir shared with other builds
# may have its top-level target/release/deltaplane-* replaced meanwhile.
bin_dir="$(mktemp -d -t bench-proxy-bin.XXXXXX)"
trap 'rm -rf "$bin_dir"' EXIT
cargo build --release --bins --example proxybench --message-format=json-render-diagnostics \
    | { grep -o '"executable":"[^"]*"' || true; } | cut -d'"' -f4 | while read -r exe; do
        case "$(basename "$exe")" in
            deltaplane-cp | deltaplane-dp | proxybench) cp "$exe" "$bin_dir/" ;;
        esac
    done
for b in deltaplane-cp deltaplane-dp proxybench; do
    [ -x "$bin_dir/$b" ] || { echo "build did not produce $b" >&2; exit 1; }
done
"$bin_dir/proxybench" --bin-dir "$bin_dir" "${nginx_args[@]}" "$@"
