"""Compare two source trees of thinkling on one workload, alternating processes (A B, B A, ...).

    python benchmarks/versions.py WORKLOAD OLD_SRC NEW_SRC RUNS
    python benchmarks/versions.py benchmarks/versions_tiny.py /tmp/old/src src 4
    python benchmarks/versions.py benchmarks/versions_hf.py /tmp/old/src src 3

For a change that has no switch to time both sides in one process (an old checkout
from `git archive <commit> src | tar -x -C /tmp/old`). The workload prints lines
`RESULT <key> <value> <hash of its samples>` (CPU seconds or tokens per CPU second: one
torch thread, so other jobs on the machine disturb the figure less than the wall clock);
this prints each key's median, min–max and A/B ratio, and whether both trees sampled
the same tokens.
"""

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402


def main():
    script, a, b, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(f"# versions: {script}\ncommand: python benchmarks/versions.py {' '.join(sys.argv[1:])}\nmachine: {machine()}")
    res = {}
    for i in range(n):
        for tag, src in ([("A", a), ("B", b)] if i % 2 == 0 else [("B", b), ("A", a)]):
            out = subprocess.run([sys.executable, script], env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"},
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.startswith("RESULT"):
                    _, key, val, h = line.split()
                    res.setdefault((key, tag), []).append(float(val))
                    res.setdefault(("hash", key, tag), set()).add(h)
            print(tag, i, [line for line in out.splitlines() if line.startswith("RESULT")], flush=True)
    print("load after", os.getloadavg())
    for key in sorted({k[0] for k in res if k[0] != "hash"}):
        A, B = res[(key, "A")], res[(key, "B")]
        print(f"{key}: A {statistics.median(A):.3f} ({min(A):.3f}-{max(A):.3f})  B {statistics.median(B):.3f} "
              f"({min(B):.3f}-{max(B):.3f})  A/B {statistics.median(A) / statistics.median(B):.2f}  "
              f"same samples {res[('hash', key, 'A')] == res[('hash', key, 'B')]}")


if __name__ == "__main__":
    main()
