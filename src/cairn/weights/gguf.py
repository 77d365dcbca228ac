"""GGUF files (llama.cpp's format), read with the ``gguf`` package.

Quantized tensors (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, ...) are dequantized to fp32 with ``gguf.quants``, and
llama.cpp's row permutation of the Q/K projections (done for the ``llama`` architecture when it converts from HF)
is undone. Opening a GGUF and dequantizing takes seconds, so the converted model is cached as a cairn checkpoint
in the user cache directory, keyed by the file's hash; later loads read that instead.

The matrices stored as Q4_1 or Q8_0 are kept as their blocks (``Blocks``: the file's own bytes, rows unpermuted),
in the cache too (5 and 8.5 bits a weight instead of 32): cairn's 4- and 8-bit kernels run those numbers as they are
(``cairn.kernels.pack_q4_1_blocks``), so an engine needs no fp32 copy of them; ``Blocks.dequantize`` gives the
fp32 values ``gguf.quants`` would, bit for bit, to whatever needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.memory import check_model_fits

GGUF_MAGIC = b"GGUF"
# Part of the cache key: bump it whenever conversion changes, so no entry made by older code is reused.
CONVERTER_VERSION = 5  # 3: the config records weight_bits; 5: Q4_1/Q8_0 matrices kept as blocks
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


# GGUF types kept as blocks: (bytes a block of 32 weights takes, bytes of fp16 scales/minima at its start)
BLOCK_TYPES = {"Q4_1": (20, 4), "Q8_0": (34, 2)}
# the matrices kept as blocks (others, and every vector, are dequantized): those an engine runs through its kernels
_BLOCK_NAMES = re.compile(r"layers\.\d+\.(attn\.[qkvo]|mlp\.(gate|up|down))\.weight|embed\.weight|head\.weight")
_STORED = "#"  # a cache entry stores a Blocks weight as the tensor ``{name}#{kind}``


class Blocks:
    """A matrix kept as the GGUF blocks it was stored in: ``kind`` "Q4_1" or "Q8_0", ``data`` uint8
    [rows, cols / 32, block bytes] in cairn's row order. Once a kernel holds the same bytes in its own layout,
    ``rehome`` drops this copy and reads them from there when asked."""

    def __init__(self, kind: str, data):
        if kind not in BLOCK_TYPES or data.dim() != 3 or data.shape[2] != BLOCK_TYPES[kind][0]:
            raise ValueError(f"not {kind} blocks: {list(data.shape)}")
        self.kind, self._data, self._source = kind, data, None
        self.shape = data.shape[:1] + (data.shape[1] * 32,)  # (a torch.Size)
        self._unmap = None  # a cached load's: gives the pages of a mapped entry that ``data`` views back

    @property
    def data(self):
        return self._data if self._data is not None else self._source(None)

    def rows(self, index):
        """The blocks of the rows ``index`` (a tensor of row numbers)."""
        if self._data is not None:
            return self._data[index]
        out = self._source(index)
        return out.view(*index.shape, *out.shape[1:])

    def rehome(self, source) -> None:
        """Drop the bytes: ``source(index)`` gives back those of the rows ``index`` (all of them for None)."""
        self._data, self._source = None, source
        if self._unmap is not None:  # (at once: the map itself lasts until the last of its blocks is dropped)
            self._unmap()
            self._unmap = None

    def dequantize(self, rows=None):
        """fp32 [rows, cols] (or the rows indexed by ``rows``): ``q·d + m`` (Q4_1), ``q·d`` (Q8_0), in fp32 as
        ``gguf.quants`` computes them."""
        import torch

        # numpy, as gguf.quants: one thread (torch's threads spin against each other on a busy machine, 15x slower)
        b = (self.data if rows is None else self.rows(rows)).numpy()
        d = np.ascontiguousarray(b[..., 0:2]).view(np.float16).astype(np.float32)  # [..., groups, 1]
        if self.kind == "Q4_1":
            m = np.ascontiguousarray(b[..., 2:4]).view(np.float16).astype(np.float32)
            qs = b[..., 4:]
            q = np.empty(qs.shape[:-1] + (32,), dtype=np.uint8)
            np.bitwise_and(qs, 0x0F, out=q[..., :16])
            np.right_shift(qs, 4, out=q[..., 16:])
            w = q.astype(np.float32)
            w *= d  # (d·q + m in fp32, in place: the values of gguf's (d * qs) + m)
            w += m
        else:
            w = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32)
            w *= d
        return torch.from_numpy(w.reshape(*b.shape[:-2], -1))


def dequantize_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every ``Blocks`` weight dequantized to fp32 (a weight shared under several names stays one
    tensor)."""
    done: dict[int, Any] = {}
    return {k: done.setdefault(id(v), v.dequantize()) if isinstance(v, Blocks) else v for k, v in state.items()}


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
    known = known_hashes()
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


def known_hashes() -> dict[str, str]:
    """The remembered digests: ``{"path|size|mtime_ns": digest}`` (a cache entry is named by its file's digest)."""
    try:
        known = json.loads((cache_dir() / "gguf" / "hashes.json").read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


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
        return _reader_class(gguf)(path)
    except Exception as e:  # truncated files surface as ValueError/IndexError/struct errors from numpy memmaps
        raise CairnError(f"{path}: cannot read this GGUF file, it looks truncated or corrupt ({e})") from None


_READER = None


def _reader_class(gguf):
    """``gguf.GGUFReader``, made ~4x faster on the metadata (the tokenizer's ~100,000 strings took seconds): its
    values are read from a plain ndarray view of the file rather than numpy memmap slices (whose Python-level
    ``__getitem__`` dominated), and an array of scalars or strings is read in one pass (one ndarray, or one
    memoryview a string) instead of one field per element. ``field.contents()`` gives the same values."""
    global _READER
    if _READER is not None:
        return _READER
    kinds = gguf.GGUFValueType

    class Reader(gguf.GGUFReader):
        def _plain(self) -> np.ndarray:
            plain = self.__dict__.get("_plain_view")
            if plain is None:
                plain = self._plain_view = self.data.view(np.ndarray)
            return plain

        def _get(self, offset, dtype, count=1, override_order=None):
            dt, count = np.dtype(dtype), int(count)
            arr = self._plain()[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(arr.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != kinds.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            if len(raw_itype) < 1 or len(alen) < 1:
                raise ValueError("an array field runs past the end of the file")
            itype, n, offs = kinds(int(raw_itype[0])), int(alen[0]), orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(itype)
            types = [kinds.ARRAY] + ([itype] if n else [])
            if nptype is not None:
                values = self._get(offs, nptype, n)
                if len(values) < n:
                    raise ValueError(f"an array of {n:,} values runs past the end of the file")
                return 12 + values.nbytes, [raw_itype, alen, values], [2] if n else [], types
            if itype != kinds.STRING:  # arrays of arrays: the library's own way
                return super()._get_field_parts(orig_offs, raw_type)
            data = memoryview(self._plain())
            size, little = len(data), (self.byte_order == "I") == (sys.byteorder == "little")
            length_at = struct.Struct("<Q" if little else ">Q").unpack_from
            parts: list = [raw_itype, alen]
            append = parts.append
            try:
                for _ in range(n):
                    (length,) = length_at(data, offs)
                    offs += 8
                    append(data[offs:offs + length])  # (contents() calls .tobytes(), which a memoryview has)
                    offs += length
                    if offs > size:
                        raise ValueError(f"a string of {length:,} bytes runs past the end of the file")
            except struct.error:
                raise ValueError(f"an array of {n:,} strings runs past the end of the file") from None
            return offs - orig_offs, parts, list(range(2, len(parts))), types

    _READER = Reader
    return Reader


def read_metadata(reader) -> dict[str, Any]:
    import gguf

    strings = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    meta = {}
    for key, field in reader.fields.items():
        try:
            if field.types == strings:  # (what contents() gives, decoded from the parts without copying them)
                meta[key] = [str(field.parts[i], "utf-8") for i in field.data]
            else:
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


def read_gguf(path: Path, blocks: bool = False) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """Config, fp32 state dict (cairn names) and metadata of a GGUF file (slow: no cache). ``blocks``: the Q4_1
    and Q8_0 matrices an engine runs stay ``Blocks``."""
    import torch

    cfg, arrays, meta = read_gguf_arrays(path, blocks)
    # (each its own writable copy: the arrays may be views of the file's read-only map)
    return cfg, _from_stored({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}), meta


def read_gguf_arrays(path: Path, blocks: bool = False) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """``read_gguf`` in numpy, without torch: the tensors as a cache entry stores them (``_to_stored``: a
    ``Blocks`` weight is its uint8 blocks under ``{name}#{kind}``), some of them views of the file's map."""
    import gguf

    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig.from_gguf(meta, has_output="output.weight" in names, source=str(path))
    _check_layers(path, cfg, names)
    check_model_fits(cfg, str(path))  # before any tensor is read
    # llama.cpp permutes Q/K rows when it writes the GGUF architecture "llama" (Mixtral included)
    permuted = meta.get("general.architecture") == "llama"
    state: dict[str, np.ndarray] = {}
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
        shape = tuple(int(d) for d in reversed(t.shape))
        kind = t.tensor_type.name
        if blocks and kind in BLOCK_TYPES and len(shape) == 2 and _BLOCK_NAMES.fullmatch(name):
            state[f"{name}{_STORED}{kind}"] = _read_blocks(path, t, kind, shape, cfg, permuted)
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CairnError(
                f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which cairn cannot read; "
                "re-quantize the model to Q8_0, Q4_K, Q5_K, Q6_K or F16"
            ) from None
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
        state[name] = arr
    layer_types = [t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    if layer_types:
        cfg = dataclasses.replace(cfg, weight_bits=tensor_type_bits(max(set(layer_types), key=layer_types.count)))
    return cfg, state, meta


def _read_blocks(path: Path, t, kind: str, shape: tuple[int, ...], cfg: ModelConfig, permuted: bool) -> np.ndarray:
    """One Q4_1/Q8_0 matrix's blocks, uint8 [rows, cols / 32, block bytes] in cairn's row order, after the checks
    ``read_gguf`` makes of dequantized ones."""
    size, scales = BLOCK_TYPES[kind]
    rows, cols = shape
    try:
        raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, cols // 32, size)
    except ValueError:
        raise CairnError(f"{path}: tensor {t.name} holds {np.asarray(t.data).nbytes:,} bytes, not the {kind} blocks "
                         f"of a {rows} x {cols} matrix: the file is corrupt") from None
    # the fp16 scales (and minima) are the only values that can be NaN or infinite: the codes are integers
    halves = np.ascontiguousarray(raw[..., :scales]).view(np.float16)
    if not np.isfinite(halves).all():
        bad = int(halves.size - np.isfinite(halves).sum())
        raise CairnError(f"{path}: tensor {t.name} holds {bad:,} NaN or infinite block scales (corrupt blocks or "
                         "scales): the file is damaged; download or convert it again")
    check = _ROWS.get(t.name.split(".")[-2])
    if check is not None and rows != check(cfg):
        raise CairnError(f"{path}: tensor {t.name} has shape {list(shape)}, which the metadata's head counts and "
                         f"sizes do not give ({cfg.n_heads} heads, {cfg.n_kv_heads} KV heads of {cfg.head_dim}, "
                         f"d_model {cfg.d_model}): the file is corrupt")
    if permuted and m_is(t.name, "attn_q.weight"):
        raw = _unpermute(raw, cfg.n_heads)
    elif permuted and m_is(t.name, "attn_k.weight"):
        raw = _unpermute(raw, cfg.n_kv_heads)
    return raw


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


def load_gguf(path: Path, use_cache: bool = True, progress=None, blocks: bool = False):
    """``(ModelConfig, state_dict, Tokenizer)`` for a GGUF file, through the converted-checkpoint cache.
    ``blocks``: Q4_1 and Q8_0 matrices as ``Blocks`` (else fp32, as every other tensor)."""
    from cairn.tokenizer import Tokenizer
    from cairn.weights import native

    path = Path(path)
    if use_cache:
        cache_limit_bytes()  # a bad setting is an error before any work
        entry = entry_path(path)
        mapped: dict[str, Any] = {}
        try:
            if entry_intact(entry, mapped):
                cfg = native.load_checkpoint_config(entry)
                check_model_fits(cfg, str(path))
                # from the map the digest check read (no copy of the file's bytes: see _tensors)
                data = mapped.pop("model.safetensors", b"")  # (none for an empty file: an error below)
                state = _from_stored(_tensors(entry / "model.safetensors", data))
                if isinstance(data, mmap.mmap):
                    _unmap_when_rehomed(state, data)
                has_tok = (entry / "tokenizer.json").is_file()
                tok = Tokenizer.from_hf_dir(entry) if has_tok else None
                os.utime(entry)  # last use, for the cache's least-recently-used eviction
                return cfg, state if blocks else dequantize_state(state), tok
        except CairnError:
            pass  # a damaged cache entry: convert again below
        finally:
            mapped.clear()  # (the map lives on only in the blocks returned)
    if progress:
        progress(f"converting {path.name} (first load; cached afterwards)")
    cfg, state, meta = read_gguf(path, blocks=True)
    tok = Tokenizer.from_gguf(meta, source=str(path)) if "tokenizer.ggml.model" in meta else None
    if use_cache:
        try:
            _save_entry(entry, cfg, {k: v.numpy() for k, v in _to_stored(state).items()}, tok)
        except OSError:
            pass  # an unwritable cache only costs speed
    return cfg, state if blocks else dequantize_state(state), tok


def entry_path(path: Path) -> Path:
    """The cache entry of the GGUF file ``path`` (named by its digest and ``CONVERTER_VERSION``)."""
    return cache_dir() / "gguf" / f"{file_hash(Path(path))}-v{CONVERTER_VERSION}"


def convert(path: Path, again: bool = False) -> Path:
    """Convert the GGUF file ``path`` into its cache entry, as a first ``load_gguf`` does, without importing torch
    (what ``start_conversion``'s child process runs); an entry already there is left as it is (a load checks it),
    unless ``again`` (the caller found it damaged: it is replaced). Errors are ``load_gguf``'s: a ``CairnError``
    naming the problem, ``OSError`` for an unwritable cache."""
    from cairn.tokenizer import Tokenizer

    path = Path(path)
    cache_limit_bytes()
    entry = entry_path(path)
    if (entry / _MANIFEST).is_file() and not again:
        return entry
    cfg, arrays, meta = read_gguf_arrays(path, blocks=True)
    tok = Tokenizer.from_gguf(meta, source=str(path)) if "tokenizer.ggml.model" in meta else None
    _save_entry(entry, cfg, arrays, tok)
    return entry


def needs_conversion(path: Path) -> bool:
    """Whether loading the file ``path`` would convert it first: a GGUF file with no entry in the cache (as far as
    can be told without reading it: a file whose digest is not remembered counts as new; a damaged entry is found
    by the load, which converts it again)."""
    path = Path(path)
    try:
        if not path.is_file() or not is_gguf(path):
            return False
        cache_limit_bytes()
        st = path.stat()
    except (OSError, CairnError):
        return False  # (the load reports it)
    digest = known_hashes().get(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return digest is None or not (cache_dir() / "gguf" / f"{digest}-v{CONVERTER_VERSION}" / _MANIFEST).is_file()


def start_conversion(path: Path):
    """A child process (``subprocess.Popen``) converting the GGUF file ``path`` into the cache (``convert``: numpy
    only, no torch), or None when there is nothing to convert. The caller goes on with its own start and waits for
    the child before it loads; the load then finds the entry, or, if the child failed for any reason, converts in
    process as it always did and meets (and reports) the same errors itself."""
    import subprocess
    import sys

    import cairn

    if not needs_conversion(path):
        return None
    env = dict(os.environ)
    # the child imports this very cairn, wherever the parent found it
    root = str(Path(cairn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import sys; from cairn.weights.gguf import convert; convert(sys.argv[1])"
    try:
        return subprocess.Popen([sys.executable, "-c", code, str(Path(path).resolve())], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None  # (no child: the load converts in process)


def _to_stored(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors to save: a ``Blocks`` weight as its bytes, named ``{name}#{kind}``."""
    return {f"{k}{_STORED}{v.kind}" if isinstance(v, Blocks) else k: v.data if isinstance(v, Blocks) else v
            for k, v in state.items()}


def _from_stored(tensors: dict[str, Any]) -> dict[str, Any]:
    """``_to_stored``'s inverse (a ``CairnError`` for a tensor that is not what its name says)."""
    state: dict[str, Any] = {}
    for k, v in tensors.items():
        name, _, kind = k.partition(_STORED)
        try:
            state[name] = Blocks(kind, v) if kind else v
        except ValueError as e:
            raise CairnError(f"cache entry tensor {k}: {e}") from None
    return state


def _save_entry(entry: Path, cfg: ModelConfig, arrays: dict[str, np.ndarray], tok) -> None:
    """Write the entry from ``arrays`` (numpy, as ``_to_stored`` names them)."""
    from cairn.weights import native

    def write(tmp: Path) -> None:
        native.save_state_checkpoint(tmp, arrays, cfg, tok)
        # what the entry holds, file by file: a load checks it, so an edited or damaged entry is converted again
        native.atomic_write_text(tmp / _MANIFEST, json.dumps(_digests(tmp), indent=1))

    if entry.exists():
        import shutil

        shutil.rmtree(entry)  # a damaged entry (an intact one would have been used)
    native.write_dir(entry, write)
    evict(keep=entry)


_MANIFEST = "digests.json"


def _digests(entry: Path, mapped: dict[str, Any] | None = None) -> dict[str, str]:
    """xxh3 digest of each file of a cache entry (~0.02 s for the default model's 94 MB); ``mapped`` gets a map
    (``mmap``, copy-on-write) of its model.safetensors, which the digest read, for ``_tensors``."""
    import xxhash

    out = {}
    for f in sorted(entry.iterdir()):
        if f.is_file() and f.name != _MANIFEST:
            if mapped is not None and f.name == "model.safetensors" and f.stat().st_size > 0:
                with open(f, "rb") as fh:
                    mapped[f.name] = m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                out[f.name] = xxhash.xxh3_64(m).hexdigest()
                continue
            h = xxhash.xxh3_64()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            out[f.name] = h.hexdigest()
    return out


def entry_intact(entry: Path, mapped: dict[str, Any] | None = None) -> bool:
    """Whether the cache entry's files all match the digests written with it."""
    try:
        want = json.loads((entry / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(want, dict) and "model.safetensors" in want and _digests(entry, mapped) == want


# safetensors dtype names (the format: an 8-byte little-endian header length, a JSON header of
# {name: {"dtype", "shape", "data_offsets": [begin, end]}} and "__metadata__", then the data)
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _tensors(path: Path, data) -> dict[str, Any]:
    """The tensors of a safetensors file from a buffer of its bytes (the ``mmap`` the digest check read), by name
    in sorted order as ``load_file`` gives them. The blocks (``{name}#{kind}``) are views of the map, which an
    engine moves into its kernels' tiles and then drops (the map goes with the last of them; no copy of the file
    is made); every other tensor is its own copy, so none of them keeps the map."""
    import torch

    def bad(why: str) -> CairnError:
        return CairnError(f"{path}: cannot read safetensors file ({why})")

    size = len(data)
    n = int.from_bytes(data[:8], "little") if size >= 8 else -1
    if not 0 < n <= size - 8:
        raise bad("no header")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    out = {}
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        try:
            dtype = getattr(torch, _DTYPES[info["dtype"]])
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name}: {info!r}") from None
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= size - 8 - n or end - begin != nbytes:
            raise bad(f"tensor {name}: shape {shape} and bytes {begin}-{end} disagree")
        if nbytes == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(data, dtype=torch.uint8, count=nbytes, offset=8 + n + begin)
        out[name] = (raw if _STORED in name else raw.clone()).view(dtype).view(shape)
    return out


def _unmap_when_rehomed(state: dict[str, Any], data: mmap.mmap) -> None:
    """Have each ``Blocks`` of ``state`` (views of the map ``data``) give its pages back to the page cache when a
    kernel takes its bytes (``rehome``): an engine's start then holds about one copy of the weights, not the map
    and the tiles both, at its peak. (A page read again afterwards comes back from the file, the same bytes.)"""
    import functools

    import torch

    base = torch.frombuffer(data, dtype=torch.uint8, count=1).data_ptr()
    page = mmap.PAGESIZE
    for b in state.values():
        if isinstance(b, Blocks):
            start = b.data.data_ptr() - base
            lo, hi = -(-start // page) * page, (start + b.data.nbytes) // page * page  # the whole pages it holds
            if 0 <= lo < hi <= len(data):
                b._unmap = functools.partial(data.madvise, mmap.MADV_DONTNEED, lo, hi - lo)


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


def cache_entries() -> list[tuple[float, int, Path]]:
    """The converted models in the cache as ``(last use, bytes, directory)``, least recently used first."""
    root = cache_dir() / "gguf"
    entries = []
    for e in root.iterdir() if root.is_dir() else []:
        if e.is_dir():
            size = sum(f.stat().st_size for f in e.iterdir() if f.is_file())
            entries.append((e.stat().st_mtime, size, e))
    return sorted(entries)


def evict(keep: Path | None = None) -> list[Path]:
    """Remove the least recently used converted models until the cache is under its cap (never ``keep``, the
    entry just written); returns what was removed."""
    import shutil

    entries = cache_entries()
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
