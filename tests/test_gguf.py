"""GGUF files written here (as llama.cpp writes them) load in cairn exactly as in transformers' GGUF loader."""

import json
import sys

import numpy as np
import pytest
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gq

from cairn.errors import CairnError
from cairn.weights import load_model

T = GGMLQuantizationType
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (the inverse of what loaders undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with finite fp16 scales (gguf-py can read these types but not write them)."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin first
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    elif qtype == T.Q6_K:  # d last; int8 sub-scales before it
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def write_gguf(path, hf, qtype, arch="llama", rng=None, metadata=None):
    """``hf``'s weights as llama.cpp writes them; ``metadata(writer)`` adds more keys (a tokenizer, say)."""
    cfg = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if metadata is not None:
        metadata(w)
    for name, t in hf.state_dict().items():
        a = t.float().numpy()
        gname = gguf_name(name)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias")):
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif arch == "llama" and gname.endswith(("attn_k.weight", "attn_k.bias")):
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != T.F32:
            if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
                data = k_quant_blocks(a.shape[0], a.shape[1], qtype, rng)
            else:
                data = gq.quantize(a, qtype)
            w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_hf(model_type="llama", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(
        model_type=model_type, vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=512, max_position_embeddings=128, tie_word_embeddings=False,
        rms_norm_eps=1e-5)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


QTYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_K, T.Q6_K]


# every type on llama; qwen2 (biases, no Q/K permutation) on two of them: the dequantization path is shared
CASES = [("llama", q) for q in QTYPES] + [("qwen2", T.F32), ("qwen2", T.Q4_K)]


@pytest.mark.parametrize("arch,qtype", CASES, ids=[f"{a}-{q.name}" for a, q in CASES])
def test_gguf_matches_transformers_loader(tmp_path, qtype, arch):
    hf = tiny_hf(arch)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, hf, qtype, arch, rng=np.random.default_rng(0))
    ours = load_model(path).model
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x).logits, ours(x)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() <= 1e-4
    if qtype == T.F32:  # unquantized: the GGUF round trip gives back the very model we wrote
        with torch.no_grad():
            assert (hf(x).logits - b).abs().max().item() <= 1e-4


def test_unsupported_quantization_type_is_named(tmp_path):
    path = tmp_path / "q8k.gguf"
    write_gguf(path, tiny_hf(), T.Q8_K, rng=np.random.default_rng(0))
    with pytest.raises(CairnError, match="Q8_K"):
        load_model(path)


def test_second_load_comes_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_hf(), T.Q8_0)
    first = load_model(path)
    entries = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    import cairn.weights.gguf as g

    monkeypatch.setattr(g, "read_gguf", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    second = load_model(path)
    for (n, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_cache_entry_from_older_converter_is_not_reused(tmp_path, monkeypatch):
    import cairn.weights.gguf as g

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_hf(), T.F32)
    load_model(path)
    monkeypatch.setattr(g, "CONVERTER_VERSION", g.CONVERTER_VERSION + 1)
    load_model(path)
    entries = sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir())
    assert len(entries) == 2 and entries[0].split("-v")[0] == entries[1].split("-v")[0]


@pytest.mark.parametrize("damage", ["weights", "config", "missing"])
def test_a_damaged_or_edited_cache_entry_is_converted_again(tmp_path, monkeypatch, damage):
    """Corrupted bytes in the converted weights ran and printed wrong text; an edited cached config or a deleted
    file was used as it was. Each entry keeps its files' digests; a load that finds them changed converts anew."""
    import cairn.weights.gguf as g

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_hf(), T.F32)
    want = load_model(path).model.state_dict()
    (entry,) = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    if damage == "weights":
        raw = bytearray((entry / "model.safetensors").read_bytes())
        raw[-100] ^= 0x40
        (entry / "model.safetensors").write_bytes(bytes(raw))
    elif damage == "config":
        cfg = json.loads((entry / "config.json").read_text())
        (entry / "config.json").write_text(json.dumps(dict(cfg, rope_theta=1.0)))
    else:
        (entry / "config.json").unlink()
    converted = []
    real = g.read_gguf
    monkeypatch.setattr(g, "read_gguf", lambda *a, **k: converted.append(1) or real(*a, **k))
    got = load_model(path)
    assert converted == [1] and got.config.rope_theta == load_model(path).config.rope_theta != 1.0
    assert all(torch.equal(want[k], v) for k, v in got.model.state_dict().items())
    assert converted == [1]  # the rebuilt entry is intact: used as it is


def test_the_cache_keeps_under_its_cap_evicting_the_least_recently_used(tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"m{seed}.gguf")
        write_gguf(paths[-1], tiny_hf(seed=seed), T.F32)
    root = tmp_path / "cache" / "gguf"
    load_model(paths[0])
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    size = sum(f.stat().st_size for f in entry.iterdir())
    monkeypatch.setenv("CAIRN_CACHE_MAX_GB", str(2.5 * size / 2**30))  # room for two entries
    os.utime(entry, (time.time() - 100, time.time() - 100))
    load_model(paths[1])
    os.utime(entry, (time.time() - 200, time.time() - 200))
    load_model(paths[0])  # a use: m0's entry is now the most recent
    load_model(paths[2])  # a third entry: m1's, the least recently used, goes
    names = {e.name for e in root.iterdir() if e.is_dir()}
    from cairn.weights.gguf import CONVERTER_VERSION, file_hash

    assert names == {f"{file_hash(p)}-v{CONVERTER_VERSION}" for p in (paths[0], paths[2])}
    # hashes.json remembers each path once, and forgets files that are gone
    paths[1].unlink()
    write_gguf(paths[0], tiny_hf(seed=7), T.F32)  # the same path, new contents
    load_model(paths[0])
    known = json.loads((root / "hashes.json").read_text())
    assert sorted(k.split("|")[0] for k in known) == sorted(str(p.resolve()) for p in (paths[0], paths[2]))
    monkeypatch.setenv("CAIRN_CACHE_MAX_GB", "lots")
    with pytest.raises(CairnError, match="CAIRN_CACHE_MAX_GB='lots'"):
        load_model(paths[2])


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": 3}, "the metadata says 3 layers .block_count. but the file holds tensors for 2"),
    ({"num_hidden_layers": 2**31}, "n_layers=2147483648 .at most 4,096."),  # once grew a process to 22 GB
    ({"num_attention_heads": 8}, "tensor blk.0.attn_k.weight has shape .128, 256., which the metadata"),
    ({"intermediate_size": 0}, "d_ff=0"),
])
def test_metadata_that_disagrees_with_the_tensors_is_an_error_naming_the_file(tmp_path, change, message):
    hf = tiny_hf()
    for k, v in change.items():  # the metadata says this; the tensors stay those of the model
        setattr(hf.config, k, v)
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf, T.F32)
    with pytest.raises(CairnError, match=message) as e:
        load_model(path)
    assert str(e.value).startswith(str(path))


def test_weights_of_other_dimensions_are_an_error_naming_them(tmp_path):
    hf = tiny_hf()
    path = tmp_path / "bad.gguf"
    hf.config.vocab_size = 80  # the metadata's vocabulary; the embedding matrix keeps its 64 rows
    write_gguf(path, hf, T.F32)
    with pytest.raises(CairnError, match=r"weights do not match the config's dimensions \(embed.weight is "
                                         r"\[64, 256\], the config gives \[80, 256\]; head.weight"):
        load_model(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_not_run(tmp_path, value):
    hf = tiny_hf()
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[3, :5] = value
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf, T.F32)
    with pytest.raises(CairnError, match="tensor blk.1.ffn_up.weight holds 5 NaN or infinite values"):
        load_model(path)


def _entry_files(root):
    (entry,) = [p for p in (root / "gguf").iterdir() if p.is_dir()]
    return {f.name: f.read_bytes() for f in sorted(entry.iterdir())}


def test_a_first_start_converts_in_a_child_process_what_a_load_converts_in_process(tmp_path, monkeypatch):
    """``cairn serve`` converts a new GGUF in a child process (numpy only) while it imports the server: the entry is
    byte for byte the one an in-process load writes, and the load after it converts nothing."""
    import cairn.weights.gguf as g
    from cairn.weights import default_model_path, prepared_ahead

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "inproc"))
    want = load_model(None, quantized=True)
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "child"))
    assert g.needs_conversion(default_model_path())
    with monkeypatch.context() as m:  # (as in a server's start: torch not imported yet, so a child converts)
        m.delitem(sys.modules, "torch")
        with prepared_ahead(None, kernels=()):
            pass
    assert not g.needs_conversion(default_model_path())
    assert _entry_files(tmp_path / "child") == _entry_files(tmp_path / "inproc")
    monkeypatch.setattr(g, "read_gguf", lambda *a, **k: (_ for _ in ()).throw(AssertionError("converted again")))
    got = load_model(None, quantized=True)
    assert got.quantized.keys() == want.quantized.keys()
    assert all(torch.equal(got.quantized[k].data, b.data) for k, b in want.quantized.items())
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), want.model.state_dict().values(),
                                                  strict=True) if not a.is_meta)
    with prepared_ahead(None, kernels=()):  # an entry there: no child
        assert not g.needs_conversion(default_model_path())


def test_the_conversion_child_never_imports_torch(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import cairn

    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_hf(), T.Q4_1)
    code = ("import sys; from cairn.weights.gguf import convert; entry = convert(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print(entry)")
    env = dict(os.environ, CAIRN_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(Path(cairn.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (Path(r.stdout.strip()) / "model.safetensors").is_file()


def test_a_file_the_child_cannot_convert_fails_in_the_load_as_it_always_did(tmp_path, monkeypatch):
    from cairn.weights import prepared_ahead

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    hf = tiny_hf()
    hf.config.num_hidden_layers = 3  # the metadata disagrees with the tensors
    path = tmp_path / "bad.gguf"
    write_gguf(path, hf, T.Q4_1)
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "torch")
        with prepared_ahead(path, kernels=()):
            pass
    with pytest.raises(CairnError, match="the metadata says 3 layers"):
        load_model(path)
    with prepared_ahead(tmp_path / "missing.gguf", kernels=()):  # nothing to convert: the load names the problem
        pass
    with pytest.raises(CairnError, match="missing.gguf: no such file"):
        load_model(tmp_path / "missing.gguf")


def _maps(path) -> bool:
    return str(path) in open("/proc/self/maps").read()


def _resident_kib(path) -> int:
    """Resident KiB of this process's maps of ``path`` (/proc/self/smaps)."""
    total, ours = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a map's header line
            ours = line.rstrip().endswith(str(path))
        elif ours and first == "Rss:":
            total += int(line.split()[1])
    return total


def test_a_cached_loads_blocks_are_views_of_the_entry_that_go_with_its_map(tmp_path, monkeypatch):
    """A cached load maps the entry (no copy of its bytes): the blocks are views of the map, every other tensor its
    own copy, so the map lasts only as long as the blocks (which an engine drops once its tiles hold them), and a
    block's pages leave the process as soon as a kernel takes its bytes (an engine's start peaks at one copy)."""
    import gc

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_hf(), T.Q4_1)
    want = load_model(path)  # converts (fp32 weights)
    (entry,) = [p for p in (tmp_path / "cache" / "gguf").iterdir() if p.is_dir()]
    lm = load_model(path, quantized=True)
    assert lm.quantized and _maps(entry / "model.safetensors")
    for b in lm.quantized.values():  # read every block, as a kernel's packing does
        b.dequantize()
    assert _resident_kib(entry / "model.safetensors") > 0.9 * sum(b.data.nbytes for b in lm.quantized.values()) / 1024
    *taken, last = lm.quantized.values()
    for b in taken:  # a kernel took their bytes: their pages are given back at once, the map still there
        b.rehome(lambda index: None)
    assert _maps(entry / "model.safetensors")
    # (a block's first and last pages may hold a neighbour's bytes too: those stay)
    assert _resident_kib(entry / "model.safetensors") < (last.data.nbytes + 2 * 4096 * len(lm.quantized)) / 1024
    last.rehome(lambda index: None)
    norm = lm.model.layers[0].attn_norm.weight
    assert torch.equal(norm, want.model.layers[0].attn_norm.weight)
    del lm
    gc.collect()
    assert not _maps(entry / "model.safetensors")  # the norm, still here, is not a view of it
    assert torch.equal(norm, want.model.layers[0].attn_norm.weight)
    got = load_model(path)  # fp32 from the cached blocks: nothing keeps the map either
    gc.collect()
    assert not _maps(entry / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), want.model.state_dict().values(),
                                                  strict=True))


@pytest.mark.parametrize("header,why", [
    (b"", "no header"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', "disagree"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 160]}}', "disagree"),
    (b'{"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}', "tensor w"),
    (b'{"w": ', "header"),
])
def test_a_malformed_safetensors_entry_is_an_error_not_a_crash(tmp_path, header, why):
    from cairn.weights.gguf import _tensors

    data = len(header).to_bytes(8, "little") + header + bytes(16) if header else b"\x00" * 4
    with pytest.raises(CairnError, match=f"cannot read safetensors file .*{why}"):
        _tensors(tmp_path / "model.safetensors", bytearray(data))
