"""Two OpenMP spin settings for the decoding commands, side by side: fresh processes alternating, paired requests.

    .venv/bin/python benchmarks/bench_spin.py [--spins 2000,30000] [--pairs 8] [--new-tokens 256] [--threads 2]

``GOMP_SPINCOUNT`` is read once by libgomp when torch loads, so each setting needs processes of its own (see
``cairn.openmp``). Each pair starts, for one setting and then the other (the order turning every pair), a fresh
``cairn serve`` and a fresh in-process worker (``bench_http.py --inproc-worker``), both with that value, and takes
the median of two 256-token greedy decodes from each: one streaming client of the server (``bench_http.stream_chat``)
and ``Engine.events`` in the worker. Reported: each setting's medians, and the second setting against the first per
pair (median of the pairs), which cancels the host's drift between pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_http as B  # noqa: E402


def one(spin: str, threads: int, n: int, pair: int) -> dict:
    env = {"GOMP_SPINCOUNT": spin}
    with contextlib.ExitStack() as procs:
        server = B.started(procs, B.cairn_server(None, threads, env))
        worker = B.started(procs, B.InProcess(None, threads, env))
        B.stream_chat(server.port, B.messages(999), 32)  # warm-up (the worker warms itself up)
        served, local = [], []
        for k in range(2):
            served.append(B.stream_chat(server.port, B.messages(500 + 2 * pair + k), n)["decode_tok_s"])
            local.append(worker.decode(n)["decode_tok_s"])
    return {"serve": statistics.median(served), "inproc": statistics.median(local)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spins", default="2000,30000", help="two GOMP_SPINCOUNT values, the reference first")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    spins = args.spins.split(",")
    if len(spins) != 2 or not all(s.isdigit() for s in spins):
        ap.error(f"--spins takes two whole numbers, e.g. 2000,30000 (got {args.spins!r})")
    runs: dict[str, list[dict]] = {s: [] for s in spins}
    for p in range(args.pairs):
        for s in (spins if p % 2 == 0 else spins[::-1]):
            runs[s].append(one(s, args.threads, args.new_tokens, p))
            B.log(f"pair {p}, GOMP_SPINCOUNT={s}: {runs[s][-1]}")
    a, b = spins
    out = {}
    for where in ("serve", "inproc"):
        ratios = [y[where] / x[where] for x, y in zip(runs[a], runs[b], strict=True)]
        out[where] = {a: statistics.median(r[where] for r in runs[a]), b: statistics.median(r[where] for r in runs[b]),
                      "ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios]}
        print(f"{'cairn serve, one client' if where == 'serve' else 'in process'}: {a} spins {out[where][a]:.1f} "
              f"tok/s, {b} spins {out[where][b]:.1f} tok/s (medians); {b} / {a} per pair: median "
              f"{out[where]['ratio_median']:.3f} ({', '.join(map(str, out[where]['ratios']))})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
