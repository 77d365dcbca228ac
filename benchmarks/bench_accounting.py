"""How long does `cairn params` take per preset, next to building the model on PyTorch's meta device?

For each preset: cairn's accounting time (the config → full JSON report: counts, bytes at six dtypes, KV cache,
FLOPs, training memory), median of --repeat runs, and, as the peer, HF transformers building the same model on
the meta device and summing ``numel`` (no weights allocated either way), with the counts compared.

    PYTHONPATH=src python benchmarks/bench_accounting.py [--repeat 20] [--no-peer]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from cairn import presets
from cairn.accounting.costs import account


def time_cairn(name: str, repeat: int) -> tuple[float, int]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        acc = account(presets.get(name))
        acc.to_json()
        times.append(time.perf_counter() - t)
    return statistics.median(times), acc.total_params


def time_hf_meta(name: str) -> tuple[float, int] | None:
    import torch
    import transformers

    entry = presets.describe(name)
    if "hf" not in entry:
        return None
    hf = entry["hf"]
    kind = {"t5": transformers.AutoModelForSeq2SeqLM, "bert": transformers.AutoModel}.get(
        hf["model_type"], transformers.AutoModelForCausalLM
    )
    t = time.perf_counter()
    try:
        config = transformers.AutoConfig.for_model(**hf)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = kind.from_config(config)
    except Exception:  # a family transformers cannot build from this config
        return None
    n = sum(p.numel() for p in model.parameters())
    n += sum(b.numel() for k, b in model.named_buffers() if k.endswith("e_score_correction_bias"))
    if hf["model_type"] == "t5" and hf.get("tie_word_embeddings") is False:
        n += hf["vocab_size"] * hf["d_model"]
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers meta-device peer")
    args = ap.parse_args()
    print(f"{'preset':26s} {'params':>20s} {'cairn ms':>9s} {'HF meta ms':>11s} {'HF/cairn':>9s}  counts")
    slowest = 0.0
    for name in presets.names():
        t, n = time_cairn(name, args.repeat)
        slowest = max(slowest, t)
        peer = None if args.no_peer else time_hf_meta(name)
        if peer is None:
            print(f"{name:26s} {n:>20,} {1e3 * t:9.2f} {'-':>11s} {'-':>9s}  -")
        else:
            pt, pn = peer
            same = "equal" if pn == n else f"HF {pn:,}"
            print(f"{name:26s} {n:>20,} {1e3 * t:9.2f} {1e3 * pt:11.1f} {pt / t:9.0f}x  {same}")
    print(f"\nslowest preset: {1e3 * slowest:.2f} ms (target < 10 ms)")


if __name__ == "__main__":
    main()
