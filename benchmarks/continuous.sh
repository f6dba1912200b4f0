#!/usr/bin/env bash
# `asv continuous` for asv's "existing" environment, which benchmarks one checkout only:
# install BASE, then HEAD (default: the current commit) from temporary git worktrees into this
# Python (editable, no dependencies, offline), run the quick suite of *this* checkout's
# benchmarks/ against each (asv run --set-commit-hash), put the original checkout back, and
# compare. Exits 1 when a benchmark got worse by more than the factor. Quick mode (one sample
# per benchmark) is the default, so the default factor is 1.5: it flags clear regressions, not
# noise; ASV_FULL=1 runs asv's full sampling, where --factor 1.1 is meaningful.
#
#   benchmarks/continuous.sh BASE [HEAD] [--factor 1.2] [-- extra asv run options]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
base=${1:?usage: benchmarks/continuous.sh BASE [HEAD] [--factor F] [-- asv run options]}
shift
head=HEAD
if [[ $# -gt 0 && $1 != --* ]]; then head=$1; shift; fi
factor=1.5
quick=--quick
[[ ${ASV_FULL:-0} == 1 ]] && quick=
if [[ ${1:-} == --factor ]]; then factor=$2; shift 2; fi
[[ ${1:-} == -- ]] && shift
machine=${ASV_MACHINE:-$(hostname)}
asv machine --yes --machine "$machine" > /dev/null

restore() { pip install -q --no-deps --no-build-isolation -e . > /dev/null; }
trap restore EXIT
for rev in "$base" "$head"; do
    sha=$(git rev-parse "$rev")
    tree=$(mktemp -d)/src
    git worktree add --detach "$tree" "$sha" > /dev/null 2>&1
    pip install -q --no-deps --no-build-isolation -e "$tree" > /dev/null
    asv run --python=same $quick --machine "$machine" --set-commit-hash "$sha" "$@" || true
    git worktree remove --force "$tree"
done
asv compare --machine "$machine" --factor "$factor" --split "$(git rev-parse "$base")" "$(git rev-parse "$head")" | tee .asv/compare.txt
# asv marks a benchmark that got worse beyond the factor with "+" in the Change column.
if grep -qE '^\| \+ ' .asv/compare.txt; then
    echo "asv: regression beyond factor $factor" >&2
    exit 1
fi
