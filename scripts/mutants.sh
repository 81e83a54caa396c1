#!/usr/bin/env bash
# Mutation testing of the core with cargo-mutants: would the tests notice a
# plausible bug? See TESTING.md, "Mutation testing".
#
#   bash scripts/mutants.sh [FILE...]   # default: every core file (slow: ~45 min)
#   bash scripts/mutants.sh --sample    # CI: a fixed sample that must all be caught
#
# The test command, the excluded files and the code no test build compiles
# are in .cargo/mutants.toml. Results go to mutants.out/ (MUTANTS_OUT=dir
# puts them in dir/mutants.out/); the summary at the end is read from its
# caught/missed/unviable/timeout lists. MUTANTS_JOBS (default 1) is passed
# as `--jobs`.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -qx "cargo-mutants $VERSION"; then
    cargo install cargo-mutants --version "$VERSION" --locked
fi

# The core: `src/` without `checking/` and `vfio/` (their own tests) and
# `design.rs` (no code); excluded in .cargo/mutants.toml too. In the order
# the last full run took them.
CORE=(
    src/ring.rs src/remote.rs src/tracker.rs src/mapping/unmapper.rs
    src/mapping/page.rs src/mapping/meta_block.rs src/gate.rs src/held.rs src/device.rs
    src/mapping/region.rs
    src/page.rs src/pool.rs src/shared.rs src/frag.rs src/sync.rs
    src/unwind.rs src/memory/regions.rs src/memory/mod.rs src/dma.rs
    src/error.rs src/into_bytes.rs src/stats.rs src/iova.rs src/identity.rs
)

# The CI sample: one planted bug per mechanism, each a mutant the suite
# catches (name regexes, matched against `cargo mutants --list` output).
SAMPLE=(
    'src/ring\.rs:.*replace Ring<T>::close -> Vec<NonNull<T>> with vec!\[\]$'
    'src/tracker\.rs:.*replace InFlightTracker<T>::remove -> bool with true$'
    'src/remote\.rs:.*replace <impl Drop for Batches>::drop with \(\)$'
    'src/held\.rs:.*replace wait_for_threads with \(\)$'
    'src/mapping/unmapper\.rs:.*replace == with != in Unmapper::push_mapping$'
    'src/device\.rs:.*replace unmap_everything with \(\)$'
)

out=${MUTANTS_OUT:-.}
args=(--no-shuffle --jobs "${MUTANTS_JOBS:-1}" --output "$out")
sample=false
if [[ ${1:-} == --sample ]]; then
    sample=true
    shift
    for re in "${SAMPLE[@]}"; do
        args+=(--re "$re")
    done
    files=(src/ring.rs src/tracker.rs src/remote.rs src/held.rs src/mapping/unmapper.rs src/device.rs)
elif [[ $# -gt 0 ]]; then
    files=("$@")
else
    files=("${CORE[@]}")
fi
for f in "${files[@]}"; do
    args+=(--file "$f")
done

if $sample; then
    listed=$(cargo mutants --list "${args[@]}")
    echo "$listed"
    for re in "${SAMPLE[@]}"; do
        if [[ $(grep -cE "$re" <<<"$listed" || true) -ne 1 ]]; then
            echo "sample mutant $re does not match exactly one mutant: update SAMPLE" >&2
            exit 1
        fi
    done
    # cargo-mutants 27.1.0 also lists the "delete field ... from struct
    # expression" mutants of these files whatever `--re` and `--exclude-re`
    # say (device.rs has one); they run too and must be caught as well.
    expected=$(grep -c . <<<"$listed")
fi

SECONDS=0
status=0
cargo mutants "${args[@]}" || status=$?

# Summary: per file, from the outcome lists.
dir="$out/mutants.out"
count() { # FILE LIST
    [[ -f $dir/$2.txt ]] || { echo 0; return; }
    awk -F: -v f="$1" '$1 == f' "$dir/$2.txt" | wc -l
}
printf '\n| file | mutants | caught | missed | unviable | timed out |\n'
printf '| --- | ---: | ---: | ---: | ---: | ---: |\n'
t_c=0 t_m=0 t_u=0 t_t=0
for f in $(cat "$dir"/{caught,missed,unviable,timeout}.txt 2>/dev/null | cut -d: -f1 | sort -u); do
    c=$(count "$f" caught) m=$(count "$f" missed) u=$(count "$f" unviable) t=$(count "$f" timeout)
    printf '| `%s` | %d | %d | %d | %d | %d |\n' "$f" $((c + m + u + t)) "$c" "$m" "$u" "$t"
    t_c=$((t_c + c)) t_m=$((t_m + m)) t_u=$((t_u + u)) t_t=$((t_t + t))
done
printf '| total | %d | %d | %d | %d | %d |\n' $((t_c + t_m + t_u + t_t)) $t_c $t_m $t_u $t_t
viable=$((t_c + t_m + t_t))
if [[ $viable -gt 0 ]]; then
    # Caught rate over the viable mutants (those that build); a timeout
    # counts as caught (the suite noticed), as cargo-mutants' docs suggest.
    echo "caught rate: $(( (100 * (t_c + t_t)) / viable ))% of $viable viable mutants, in ${SECONDS}s"
fi
if [[ -s $dir/missed.txt ]]; then
    echo "missed:"
    cat "$dir/missed.txt"
fi

if $sample; then
    if [[ $t_c -ne $expected ]]; then
        echo "mutation sample: $t_c of $expected planted mutants caught" >&2
        exit 1
    fi
    echo "mutation sample: all $expected planted mutants caught"
    exit 0
fi
# cargo-mutants: 2 = some missed, 3 = some timed out, 4 = baseline failed.
exit "$status"
