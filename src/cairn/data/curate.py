"""``cairn data prepare``: curate documents and pack them into token shards for pre-training.

documents (``cairn.data.corpus.iter_documents``) → exact dedup → near-duplicate removal (MinHash LSH) → Gopher
quality and repetition filters → a train/validation split by document → ``[BOS] + encode(text)`` per document,
concatenated into flat token arrays (``cairn.data.shards`` describes and reads the output).

The curation steps are HF ``datatrove``'s (the field's standard; its executors run the same steps on Slurm or Ray).
Here they run in this process, one stage after the other, over documents held in memory: on a few megabytes
(the default corpus is 5 MB) a ``LocalPipelineExecutor`` only adds process start-up, and it resets loguru's
handlers. Word splitting is spaCy's blank English tokenizer (rules only, no model download).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cairn.data.corpus import Document, iter_documents
from cairn.errors import CairnError

# Thresholds of the quality filters. datatrove's defaults are the Gopher paper's (Rae et al. 2021, table A1), tuned
# for web pages; plays are verse in short lines with a speaker's name before each speech and much punctuation.
# Measured on the 42 documents of the default corpus (min/max over them), the defaults drop 21 real plays:
#  - alphabetic-word ratio: spaCy makes every comma and full stop a "word", so plays score 0.765-0.856 and half
#    fall under the default 0.8. 0.7 keeps them all with a margin and still drops symbol and number soup (the
#    tests' planted table of numbers scores 0).
#  - duplicate-line fraction: speaker headings ("HAMLET.") are a fifth to almost a third of a play's lines
#    (0.155-0.303; The Merry Wives 0.303 > the default 0.3). 0.45 keeps them; the repeated *characters* in
#    duplicate lines stay at the default 0.2 (plays: at most 0.105), which is what catches boilerplate and
#    copy-pasted text.
#  - maximum length: Gopher drops documents over 100,000 words as web junk; a whole book is legitimate here
#    (the longest play, Hamlet, is 32,000), so there is no upper limit.
# Everything else keeps Gopher's value with a wide margin on this corpus: mean word length 4.0-4.35 (3-10);
# no "#" or "..."; top 2/3/4-gram character fractions at most 0.028/0.031/0.024 (0.20/0.18/0.16); duplicate
# 5-gram characters at most 0.089 (The Comedy of Errors, twins; 0.15); duplicate paragraphs at most 0.10 (0.3).
MIN_ALPHA_WORDS_RATIO = 0.7
MAX_DUP_LINE_FRAC = 0.45
MIN_WORDS = 50  # Gopher's minimum; the shortest real poem here (The Phoenix and the Turtle) has 370

# Near duplicates: datatrove's MinHash defaults (5-word shingles, 14 bands of 8 hashes: the detection curve's
# midpoint is a Jaccard similarity of about 0.72; pairs at 0.8 are caught with 92% probability, at 0.9 with 99.96%).
MINHASH_BUCKETS, MINHASH_HASHES_PER_BUCKET, MINHASH_NGRAMS = 14, 8, 5


def _tokenizer_bos(tok) -> int:
    bos = tok.tok.token_to_id("<|endoftext|>")
    if bos is None:
        bos = tok.bos_id
    if bos is None:
        raise CairnError("the tokenizer has neither <|endoftext|> nor a bos_token to begin documents with: "
                         "train one with `cairn train tokenizer`")
    return bos


@contextlib.contextmanager
def _quiet_datatrove(log_path: Path) -> Iterator[None]:
    """datatrove logs through loguru at INFO and draws tqdm bars: send both to ``log_path``.

    Importing datatrove already replaces loguru's handlers with one of its own (stderr, DEBUG and up); this puts
    that one back afterwards. Nothing in cairn itself logs through loguru."""
    import datatrove.utils.logging  # noqa: F401  (its import-time reset must happen before ours)
    from loguru import logger

    logger.remove()
    handler = logger.add(str(log_path), level="DEBUG")  # its one warning, "No .remove file", means no duplicates
    try:
        with open(log_path, "a") as log, contextlib.redirect_stderr(log):
            yield
    finally:
        logger.remove(handler)
        logger.add(sys.stderr)


def _whitespace_words():
    """A datatrove word tokenizer that splits on whitespace, for MinHash shingles only.

    MinHash shingles the text after ``simplify_text`` (lower case, punctuation removed, whitespace collapsed);
    spaCy's rules add nothing there but cost 9 of the 28 seconds the default corpus took to prepare (measured)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return WhitespaceWords("en")


def _dedup(docs: list[Document], work: Path) -> tuple[list[Document], list[Document]]:
    """(exact duplicates removed, then near duplicates removed), each keeping the first of its cluster.

    datatrove's stages, as its executors would run them with one task: signatures, matches, (clusters,) filter."""
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    def content(doc: DTDocument) -> bytes:  # datatrove picks its hash function by this annotation
        return doc.text.encode()

    def stream(ds: list[Document]) -> Iterator[DTDocument]:
        return (DTDocument(text=d.text, id=d.id) for d in ds)

    def kept_by(step, before: list[Document]) -> list[Document]:
        by_id = {d.id: d for d in before}
        return [by_id[d.id] for d in step.run(stream(before), 0, 1)]

    w = {name: str(work / name) for name in ("exact_sigs", "exact_dups", "mh_sigs", "mh_buckets", "mh_remove")}
    exact = ExactDedupConfig(content_getter=content)
    ExactDedupSignature(w["exact_sigs"], exact).run(stream(docs), 0, 1)
    ExactFindDedups(w["exact_sigs"], w["exact_dups"], exact).run(None, 0, 1)
    after_exact = kept_by(ExactDedupFilter(w["exact_dups"], exact), docs)

    mh = MinhashConfig(n_grams=MINHASH_NGRAMS, num_buckets=MINHASH_BUCKETS, hashes_per_bucket=MINHASH_HASHES_PER_BUCKET)
    MinhashDedupSignature(w["mh_sigs"], mh, language=_whitespace_words()).run(stream(after_exact), 0, 1)
    for bucket in range(mh.num_buckets):  # one task per bucket
        MinhashDedupBuckets(w["mh_sigs"], w["mh_buckets"], config=mh).run(None, bucket, mh.num_buckets)
    MinhashDedupCluster(w["mh_buckets"], w["mh_remove"], config=mh).run(None, 0, 1)
    after_near = kept_by(MinhashDedupFilter(w["mh_remove"]), after_exact)
    return after_exact, after_near


_FILTERS: tuple | None = None


def _quality_rule(text: str, min_words: int) -> str | None:
    """The first Gopher rule ``text`` fails (a report key), or None when it passes them all."""
    global _FILTERS
    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    if _FILTERS is None or _FILTERS[0] != min_words:
        quality = GopherQualityFilter(min_doc_words=min_words, max_doc_words=None,
                                      max_non_alpha_words_ratio=MIN_ALPHA_WORDS_RATIO)
        _FILTERS = (min_words, quality, GopherRepetitionFilter(dup_line_frac=MAX_DUP_LINE_FRAC))
    doc = DTDocument(text=text, id="")
    for f, prefix in ((_FILTERS[1], ""), (_FILTERS[2], "gopher_repetition_")):
        res = f.filter(doc)  # True, or (False, reason); the two share one spaCy word split (datatrove's lru_cache)
        if res is not True:
            return prefix + (res[1] if isinstance(res, tuple) else "dropped")
    return None


def _quality(docs: list[Document], min_words: int, progress: bool) -> tuple[list[Document], dict[str, str]]:
    """The documents the Gopher filters keep, and the rule that dropped each of the others (by document id).

    In this process: spaCy's word split is most of the time (about 10 s of 13 on the default corpus), but a pool
    of two spawned workers measured slower here (29 s for the whole prepare against 17 s, on 2 shared CPUs; each
    worker imports spaCy and datatrove), and spawning needs every caller's script to guard its ``__main__``."""
    from tqdm import tqdm

    kept, dropped = [], {}
    for d in tqdm(docs, desc="quality filters", unit="doc", disable=not progress):
        rule = _quality_rule(d.text, min_words)
        if rule is None:
            kept.append(d)
        else:
            dropped[d.id] = rule
    return kept, dropped


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Document indices (train, val): a seeded shuffle, val gets round(n * fraction) documents, at least one when
    n >= 2 and the fraction is positive, and never all of them; each split keeps the input order."""
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, max(n - 1, 0))
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(perm[:n_val].tolist())
    train = sorted(perm[n_val:].tolist())
    return train, val


def _write_array(path: Path, arr: np.ndarray, npy: bool = False) -> None:
    from cairn.weights.native import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            if npy:
                np.save(f, arr)
            else:
                arr.tofile(f)

    atomic_write(path, write)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    from cairn.weights.native import atomic_write

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                 "special_tokens_map.json"):
        if (src / name).is_file():
            atomic_write(dst / name, lambda tmp, s=src / name: shutil.copyfile(s, tmp))


def prepare(
    paths: list[Path] | list[str],
    tokenizer_dir: Path | str,
    out_dir: Path | str,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_words: int = MIN_WORDS,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Curate, split and pack ``paths`` into ``out_dir``; return the report (also written as report.json)."""
    from cairn.data.shards import FORMAT, dtype_for
    from cairn.tokenizer import Tokenizer
    from cairn.weights.native import atomic_write_text

    t0 = time.perf_counter()
    if not 0 <= val_fraction < 1:
        raise CairnError(f"--val-fraction {val_fraction}: use a fraction in [0, 1), e.g. 0.1")
    if min_words < 1:
        raise CairnError(f"min_words {min_words}: use 1 or more")
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CairnError(f"{tokenizer_dir}: no tokenizer.json; train one with `cairn train tokenizer --out DIR` "
                         "or pass an HF model directory")
    tok = Tokenizer.from_hf_dir(tokenizer_dir)
    bos = _tokenizer_bos(tok)
    progress = sys.stderr.isatty() if progress is None else progress
    docs = list(iter_documents(paths))
    timings = {"read": time.perf_counter() - t0}
    if not docs:
        raise CairnError(f"no documents in {', '.join(map(str, paths))}")
    if out_dir.exists() and not out_dir.is_dir():
        raise CairnError(f"--out {out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix=".curate-", dir=out_dir))
    try:
        t = time.perf_counter()
        with _quiet_datatrove(out_dir / "prepare.log"):
            after_exact, after_near = _dedup(docs, work)
        timings["dedup"] = time.perf_counter() - t
        t = time.perf_counter()
        kept, quality_dropped = _quality(after_near, min_words, progress)
        timings["quality"] = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)

    exact_ids = {d.id for d in after_exact}
    near_ids = {d.id for d in after_near}
    removed_documents = {}
    for d in docs:
        if d.id not in exact_ids:
            removed_documents[d.id] = "exact_duplicate"
        elif d.id not in near_ids:
            removed_documents[d.id] = "near_duplicate"
    removed_documents.update(quality_dropped)
    removed: dict[str, int] = {"exact_duplicate": 0, "near_duplicate": 0}
    removed.update(Counter(removed_documents.values()))
    if not kept:
        raise CairnError(f"curation removed every document ({json.dumps(removed)}): give more or longer text "
                         f"(documents need at least {min_words} words)")

    (out_dir / "meta.json").unlink(missing_ok=True)  # from here on the directory does not look complete
    t = time.perf_counter()
    train_idx, val_idx = split_documents(len(kept), val_fraction, seed)
    dtype = dtype_for(tok.vocab_size)
    splits_meta, tokens, n_docs, n_bytes = {}, {}, {}, {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        texts = [kept[i].text for i in idx]
        encoded = [e.ids for e in tok.tok.encode_batch(texts, add_special_tokens=False)] if texts else []
        lengths = np.array([1 + len(e) for e in encoded], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(idx) else \
            np.zeros(0, np.int64)
        flat = np.empty(int(lengths.sum()), dtype=dtype)
        for s, e in zip(starts, encoded, strict=True):
            flat[s] = bos
            flat[s + 1: s + 1 + len(e)] = e
        _write_array(out_dir / f"{split}.bin", flat)
        _write_array(out_dir / f"{split}.idx.npy", starts, npy=True)
        tokens[split], n_docs[split] = int(flat.size), len(idx)
        n_bytes[split] = sum(len(t.encode()) for t in texts)
        splits_meta[split] = {"file": f"{split}.bin", "index": f"{split}.idx.npy", "tokens": int(flat.size),
                              "documents": len(idx), "bytes": n_bytes[split]}
    if tokenizer_dir.resolve() != (out_dir / "tokenizer").resolve():
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)  # no stale files of another tokenizer
        _copy_tokenizer(tokenizer_dir, out_dir / "tokenizer")
    timings["tokenize"] = time.perf_counter() - t

    bytes_kept = sum(len(d.text.encode()) for d in kept)
    report = {
        "documents_in": len(docs),
        "bytes_in": sum(len(d.text.encode()) for d in docs),
        "documents_kept": len(kept),
        "bytes_kept": bytes_kept,
        "removed": removed,
        "documents": n_docs,
        "tokens": tokens,
        "split_bytes": n_bytes,
        "bytes_per_token": round(bytes_kept / max(1, tokens["train"] + tokens["val"] - len(kept)), 3),
        "val_documents": [kept[i].id for i in val_idx],
        "removed_documents": removed_documents,
        "settings": {"val_fraction": val_fraction, "seed": seed, "min_words": min_words,
                     "min_alpha_words_ratio": MIN_ALPHA_WORDS_RATIO, "max_dup_line_frac": MAX_DUP_LINE_FRAC,
                     "minhash": {"n_grams": MINHASH_NGRAMS, "buckets": MINHASH_BUCKETS,
                                 "hashes_per_bucket": MINHASH_HASHES_PER_BUCKET},
                     "tokenizer": str(tokenizer_dir)},
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    meta = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size, "bos_id": bos,
            "splits": splits_meta}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=2))  # last: the directory is complete
    return report
