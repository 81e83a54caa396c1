#!/usr/bin/env python3
"""Counts the cache lines the two sides of a phased benchmark hand each other.

Runs one phased workload of `benches/pool.rs` (an `rx_pipeline`,
`cross_thread` or `cross_thread_bulk64` id) under valgrind's lackey tool,
which records every load and store the program makes, and replays the
accesses over 64-byte lines. The benchmark marks each side's half of a round
(a load of a marker variable), so every access made while the producer's or
the consumer's half runs is that side's. Accesses outside both halves (the
channel that carries the round between the threads, the harness) are left
out.

Per packet, steady state (rounds after the first two), it prints:

- transfers: lines one side accesses, holding no copy, whose last write
  was the other side's (a dirty line moving between cores: what costs on
  every CPU), split into
  frame lines (the first line of a 4 KiB page: the buffer's frame) and the
  rest (handles, metadata, queue slots, ring, locks, counters);
- invalidations: lines one side writes while both sides hold a copy (a
  shared line upgraded: a coherence round trip, no data);
- each side's distinct lines touched.

The figure does not depend on the CPU: it is what the code does to memory.
What a transfer costs in nanoseconds does.

Usage: scripts/line_transfers.py <bench binary> <group/name> [packets]
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

LINE = 64
ROUND = 512
SKIP_ROUNDS = 2


def run(binary, workload, packets):
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "lackey.log")
        env = dict(os.environ, PAGEPOOL_COUNT=f"lines:{workload}:{packets}")
        proc = subprocess.run(
            ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", binary],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            check=True,
        )
        m = re.search(r"markers producer=(0x[0-9a-f]+) consumer=(0x[0-9a-f]+) idle=(0x[0-9a-f]+)", proc.stderr)
        if not m:
            sys.exit("no marker line in the benchmark's output:\n" + proc.stderr)
        markers = {int(m.group(1), 16): "P", int(m.group(2), 16): "C", int(m.group(3), 16): None}
        with open(log) as f:
            return replay(f, markers)


def replay(lines, markers):
    side = None
    # Each line's last writer and the sides holding a valid copy (an MSI
    # model with caches large enough to keep everything: what is counted
    # is coherence, not capacity).
    last_writer = {}
    valid = collections.defaultdict(set)
    rounds = []  # one Counter per round
    cur = None
    touched = set()
    for raw in lines:
        if not raw.startswith(" "):
            continue
        kind = raw[1]
        try:
            addr_s, size_s = raw[3:].split(",")
            addr, size = int(addr_s, 16), int(size_s)
        except ValueError:
            continue
        if kind == "L" and addr in markers:
            new = markers[addr]
            if new == "P":
                cur = collections.Counter()
                rounds.append(cur)
            if new is not None:
                touched = set()
            side = new
            continue
        if side is None or cur is None:
            continue
        other = "C" if side == "P" else "P"
        first, last = addr // LINE, (addr + max(size, 1) - 1) // LINE
        for line in range(first, last + 1):
            what = "frame" if (line * LINE) % 4096 == 0 else "other"
            if line not in touched:
                touched.add(line)
                cur[f"touched_{side}"] += 1
            holders = valid[line]
            if side not in holders and last_writer.get(line) == other:
                cur[f"transfer_to_{side}_{what}"] += 1
            if kind in "SM":
                if side in holders and other in holders:
                    cur[f"invalidate_by_{side}_{what}"] += 1
                last_writer[line] = side
                holders.clear()
            holders.add(side)
    return rounds


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    binary, workload = sys.argv[1], sys.argv[2]
    packets = int(sys.argv[3]) if len(sys.argv) > 3 else 8 * ROUND
    rounds = run(binary, workload, packets)[SKIP_ROUNDS:]
    if not rounds:
        sys.exit("no steady-state round traced")
    total = collections.Counter()
    for r in rounds:
        total.update(r)
    n = len(rounds) * ROUND

    def per(key):
        return total[key] / n

    frame = per("transfer_to_P_frame") + per("transfer_to_C_frame")
    other = per("transfer_to_P_other") + per("transfer_to_C_other")
    inval = sum(per(f"invalidate_by_{s}_{w}") for s in "PC" for w in ("frame", "other"))
    print(
        f"{workload}: per packet: transfers {frame + other:.3f} "
        f"(frame {frame:.3f}, other {other:.3f}; to consumer {per('transfer_to_C_frame') + per('transfer_to_C_other'):.3f}, "
        f"to producer {per('transfer_to_P_frame') + per('transfer_to_P_other'):.3f}), "
        f"invalidations {inval:.3f}, lines touched: producer {per('touched_P'):.2f}, consumer {per('touched_C'):.2f} "
        f"({len(rounds)} rounds of {ROUND})"
    )


if __name__ == "__main__":
    main()
