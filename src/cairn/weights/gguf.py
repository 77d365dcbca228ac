"""GGUF files (llama.cpp's format), read with the ``gguf`` package.

Quantized tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, ...) are dequantized to fp32 with ``gguf.quants``, and
llama.cpp's row permutation of the Q/K projections (done for the ``llama`` architecture when it converts from HF)
is undone. Opening a GGUF and dequantizing takes seconds, so the converted model is cached as a cairn checkpoint
in the user cache directory, keyed by the file's hash; later loads read that instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.memory import check_model_fits

GGUF_MAGIC = b"GGUF"
# Part of the cache key: bump it whenever conversion changes, so no entry made by older code is reused.
CONVERTER_VERSION = 3  # 3: the config records weight_bits
_LAYER = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.q.weight",
    "attn_k.weight": "attn.k.weight",
    "attn_v.weight": "attn.v.weight",
    "attn_output.weight": "attn.o.weight",
    "attn_q.bias": "attn.q.bias",
    "attn_k.bias": "attn.k.bias",
    "attn_v.bias": "attn.v.bias",
    "attn_output.bias": "attn.o.bias",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
    # mixture of experts: 3-D expert stacks [E, F, D] / [E, D, F], router, shared expert
    "ffn_gate_inp.weight": "mlp.router.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate",
    "ffn_up_exps.weight": "mlp.experts.up",
    "ffn_down_exps.weight": "mlp.experts.down",
    "ffn_gate_shexp.weight": "mlp.shared.gate.weight",
    "ffn_up_shexp.weight": "mlp.shared.up.weight",
    "ffn_down_shexp.weight": "mlp.shared.down.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_gate.weight",
}
_TOP = {"token_embd.weight": "embed.weight", "output_norm.weight": "norm.weight", "output.weight": "head.weight"}


def cache_dir() -> Path:
    root = os.environ.get("CAIRN_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cairn"


def file_hash(path: Path) -> str:
    """The file's blake2b digest, remembered per (path, size, mtime) so a cached load does not re-read it."""
    st = path.stat()
    memo = cache_dir() / "gguf" / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = _hash_bytes(path)
    # one key per path (an older size/mtime of this file is stale), and only paths that still exist
    prefix = f"{path.resolve()}|"
    known = {k: v for k, v in known.items() if not k.startswith(prefix) and Path(k.split("|", 1)[0]).exists()}
    known[key] = digest
    try:
        from cairn.weights.native import atomic_write_text

        atomic_write_text(memo, json.dumps(known))
    except OSError:
        pass
    return digest


def _hash_bytes(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def open_gguf(path: Path):
    """A ``gguf.GGUFReader`` over ``path``, with bad files turned into a CairnError that names them."""
    import gguf

    if not is_gguf(path):
        raise CairnError(f"{path}: not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # truncated files surface as ValueError/IndexError/struct errors from numpy memmaps
        raise CairnError(f"{path}: cannot read this GGUF file, it looks truncated or corrupt ({e})") from None


def read_metadata(reader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:  # a field gguf cannot decode is not one cairn needs
            continue
    return meta


def gguf_config(path: Path) -> ModelConfig:
    """The architecture of a GGUF file, from its metadata alone (no tensor is read)."""
    reader = open_gguf(Path(path))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig.from_gguf(read_metadata(reader), has_output=has_output, source=str(path))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K rows (interleaved → rotate-half pairing)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Config, fp32 state dict (cairn names) and metadata of a GGUF file (slow: no cache)."""
    import gguf
    import torch

    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, has_output="output.weight" in names, source=str(path))
    _check_layers(path, cfg, names)
    check_model_fits(cfg, str(path))  # before any tensor is read
    # llama.cpp permutes Q/K rows when it writes the GGUF architecture "llama" (Mixtral included)
    permuted = meta.get("general.architecture") == "llama"
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _TOP:
            name = _TOP[t.name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
            if not m or m.group(2) not in _LAYER:
                if t.name == "rope_freqs.weight":  # llama3 frequency factors: cairn recomputes them from metadata
                    continue
                raise CairnError(f"{path}: tensor {t.name!r} is not part of an architecture cairn runs")
            name = f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CairnError(
                f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which cairn cannot read; "
                "re-quantize the model to Q8_0, Q4_K, Q5_K, Q6_K or F16"
            ) from None
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if not np.isfinite(arr).all():  # NaN/inf scales or values: the model would run and print garbage
            bad = int(arr.size - np.isfinite(arr).sum())
            raise CairnError(f"{path}: tensor {t.name} holds {bad:,} NaN or infinite values after dequantization "
                             "(corrupt blocks or scales): the file is damaged; download or convert it again")
        rows = _ROWS.get(t.name.split(".")[-2])
        if rows is not None and shape[0] != rows(cfg):
            raise CairnError(f"{path}: tensor {t.name} has shape {list(shape)}, which the metadata's head counts and "
                             f"sizes do not give ({cfg.n_heads} heads, {cfg.n_kv_heads} KV heads of {cfg.head_dim}, "
                             f"d_model {cfg.d_model}): the file is corrupt")
        if permuted and m_is(t.name, "attn_q.weight", "attn_q.bias"):
            arr = _unpermute(arr, cfg.n_heads)
        elif permuted and m_is(t.name, "attn_k.weight", "attn_k.bias"):
            arr = _unpermute(arr, cfg.n_kv_heads)
        state[name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    layer_types = [t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    if layer_types:
        cfg = dataclasses.replace(cfg, weight_bits=tensor_type_bits(max(set(layer_types), key=layer_types.count)))
    return cfg, state, meta


# rows each kind of tensor must have, from the config (the checks run before any reshape by them)
_ROWS = {
    "attn_q": lambda c: c.n_heads * c.head_dim,
    "attn_k": lambda c: c.n_kv_heads * c.head_dim,
    "attn_v": lambda c: c.n_kv_heads * c.head_dim,
}


def _check_layers(path: Path, cfg: ModelConfig, names: set[str]) -> None:
    """The metadata's layer count against the layers the file holds tensors for."""
    have = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    if have != set(range(cfg.n_layers)):
        raise CairnError(f"{path}: the metadata says {cfg.n_layers} layers (block_count) but the file holds tensors "
                         f"for {len(have)} (blk.0 to blk.{max(have, default=-1)}): the file is corrupt")


def tensor_type_bits(name: str) -> int | None:
    """Bits per weight of a GGUF tensor type, by its family (Q4_1 -> 4, IQ4_XS -> 4, Q6_K -> 6, BF16 -> 16)."""
    m = re.match(r"I?Q(\d)", name)
    if m:
        return int(m.group(1))
    return {"F32": 32, "F16": 16, "BF16": 16, "F64": 64}.get(name)


def m_is(name: str, *suffixes: str) -> bool:
    return any(name.endswith("." + s) for s in suffixes)


def load_gguf(path: Path, use_cache: bool = True, progress=None):
    """``(ModelConfig, state_dict, Tokenizer)`` for a GGUF file, through the converted-checkpoint cache."""
    from cairn.tokenizer import Tokenizer
    from cairn.weights import native

    path = Path(path)
    if use_cache:
        cache_limit_bytes()  # a bad setting is an error before any work
        entry = cache_dir() / "gguf" / f"{file_hash(path)}-v{CONVERTER_VERSION}"
        if _entry_intact(entry):
            try:
                cfg = native.load_checkpoint_config(entry)
                check_model_fits(cfg, str(path))
                state = native.load_checkpoint_tensors(entry)
                has_tok = (entry / "tokenizer.json").is_file()
                tok = Tokenizer.from_hf_dir(entry) if has_tok else None
                os.utime(entry)  # last use, for the cache's least-recently-used eviction
                return cfg, state, tok
            except CairnError:
                pass  # a damaged cache entry: convert again below
    if progress:
        progress(f"converting {path.name} (first load; cached afterwards)")
    cfg, state, meta = read_gguf(path)
    tok = Tokenizer.from_gguf(meta, source=str(path)) if "tokenizer.ggml.model" in meta else None
    if use_cache:
        try:
            _save_entry(entry, cfg, state, tok)
        except OSError:
            pass  # an unwritable cache only costs speed
    return cfg, state, tok


def _save_entry(entry: Path, cfg: ModelConfig, state: dict[str, Any], tok) -> None:
    from cairn.weights import native

    def write(tmp: Path) -> None:
        native.save_state_checkpoint(tmp, state, cfg, tok)
        # what the entry holds, file by file: a load checks it, so an edited or damaged entry is converted again
        native.atomic_write_text(tmp / _MANIFEST, json.dumps(_digests(tmp), indent=1))

    if entry.exists():
        import shutil

        shutil.rmtree(entry)  # a damaged entry (an intact one would have been used)
    native.write_dir(entry, write)
    evict(keep=entry)


_MANIFEST = "digests.json"


def _digests(entry: Path) -> dict[str, str]:
    """xxh3 digest of each file of a cache entry (~0.2 s for a 135M model's 540 MB: cheap next to loading it)."""
    import xxhash

    out = {}
    for f in sorted(entry.iterdir()):
        if f.is_file() and f.name != _MANIFEST:
            h = xxhash.xxh3_64()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            out[f.name] = h.hexdigest()
    return out


def _entry_intact(entry: Path) -> bool:
    try:
        want = json.loads((entry / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(want, dict) and "model.safetensors" in want and _digests(entry) == want


def cache_limit_bytes() -> int:
    """The converted-model cache's size cap: ``CAIRN_CACHE_MAX_GB`` (default 8)."""
    raw = os.environ.get("CAIRN_CACHE_MAX_GB", "8")
    try:
        gb = float(raw)
        if not gb > 0:
            raise ValueError
    except ValueError:
        raise CairnError(f"CAIRN_CACHE_MAX_GB={raw!r}: give the cache's size cap in GB, a positive number") from None
    return int(gb * 2**30)


def evict(keep: Path | None = None) -> list[Path]:
    """Remove the least recently used converted models until the cache is under its cap (never ``keep``, the
    entry just written); returns what was removed."""
    import shutil

    root = cache_dir() / "gguf"
    entries = []
    for e in root.iterdir() if root.is_dir() else []:
        if e.is_dir():
            size = sum(f.stat().st_size for f in e.iterdir() if f.is_file())
            entries.append((e.stat().st_mtime, size, e))
    total, removed = sum(size for _, size, _ in entries), []
    for _, size, e in sorted(entries):
        if total <= cache_limit_bytes():
            break
        if keep is not None and e == keep:
            continue
        shutil.rmtree(e, ignore_errors=True)
        total -= size
        removed.append(e)
    return removed
