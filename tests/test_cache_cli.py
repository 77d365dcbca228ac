"""`cairn cache list` and `cairn cache clear`, over a cache directory made here (entries as load_gguf names them)."""

import json
import os
import time

import pytest

from cairn.cli import main
from cairn.weights import gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(root))
    monkeypatch.setenv("CAIRN_CACHE_MAX_GB", "1")
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    entries = {}
    for i, (digest, size, age) in enumerate([("a" * 32, 3 * 2**20, 7200), ("b" * 32, 2**20, 90)]):
        e = root / "gguf" / f"{digest}-v{gguf.CONVERTER_VERSION}"
        e.mkdir(parents=True)
        (e / "model.safetensors").write_bytes(b"\0" * size)
        t = time.time() - age
        os.utime(e, (t, t))
        entries[i] = e
    st = source.stat()
    (root / "gguf" / "hashes.json").write_text(json.dumps({f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}":
                                                           "a" * 32}))
    (root / "kernels").mkdir()
    (root / "kernels" / "step-0123.so").write_bytes(b"\0" * 2048)
    return root, source, entries


def test_list_shows_entries_sizes_ages_sources_and_the_cap(cache, capsys):
    root, source, entries = cache
    old, new = entries[0], entries[1]
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"cache: {root}"
    rows = {line.split()[0]: line for line in lines[2:5]}
    assert lines[2].startswith(new.name)  # most recently used first
    assert "3.0 MB" in rows[old.name] and "2 h ago" in rows[old.name] and str(source.resolve()) in rows[old.name]
    assert "1.0 MB" in rows[new.name] and "2 min ago" in rows[new.name] and rows[new.name].endswith("?")
    assert "2.0 KB" in rows["kernels"] and "1 compiled C kernel library" in rows["kernels"]
    assert "converted models: 4.0 MB of 1.0 GB (CAIRN_CACHE_MAX_GB" in out


def test_clear_one_entry_by_prefix_or_source_then_all(cache, capsys):
    root, source, entries = cache
    old, new = entries[0], entries[1]
    assert main(["cache", "clear", new.name[:6]]) == 0
    assert not new.exists() and old.exists() and "1.0 MB freed" in capsys.readouterr().out
    assert main(["cache", "clear", str(source)]) == 0
    assert not old.exists()
    assert main(["cache", "clear", "zzz"]) == 2
    assert "no cache entry 'zzz'" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0
    assert not (root / "kernels").exists() and not (root / "gguf").exists()
    assert main(["cache", "list"]) == 0 and "(empty)" in capsys.readouterr().out


def test_a_bad_cap_is_a_clear_error(cache, monkeypatch, capsys):
    monkeypatch.setenv("CAIRN_CACHE_MAX_GB", "lots")
    assert main(["cache", "list"]) == 2
    assert "CAIRN_CACHE_MAX_GB='lots'" in capsys.readouterr().err


def test_prepare_converts_the_model_and_builds_the_kernels_without_torch(tmp_path, monkeypatch):
    """`cairn cache prepare` leaves what a first start would make: the default model's intact entry (a load finds
    it: nothing to convert) and every kernel library; run again it does nothing; a damaged entry is converted
    again and a missing library built. No torch is imported for any of it."""
    import shutil
    import subprocess
    import sys

    from cairn.weights import default_model_path, kernel_builder

    build = kernel_builder()
    built = {name: build.library(name) for name in build.LIBRARIES}  # (the suite's cache: built once for all tests)
    root = tmp_path / "cache"
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(root))
    (root / "kernels").mkdir(parents=True)
    for name, lib in built.items():
        if name != "rows":  # one to build (rows.c: the quickest), the others as a set-up left them
            shutil.copy(lib, root / "kernels" / lib.name)
            shutil.copy(lib.with_suffix(".sha256"), root / "kernels" / lib.with_suffix(".sha256").name)
    code = ("import sys; from cairn.cli import main; code = main(['cache', 'prepare']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")

    def prepare() -> str:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    model = default_model_path()
    assert gguf.needs_conversion(model)
    out = prepare()
    assert f"cache: {root}" in out and f"{model.name}: converted in " in out, out
    assert "kernels (qgemm, attention, rows, step): built rows in " in out, out
    entry = gguf.entry_path(model)
    assert not gguf.needs_conversion(model) and gguf.entry_intact(entry)
    assert all(build.built(name) for name in build.LIBRARIES)
    out = prepare()
    assert f"{model.name}: already converted" in out and "kernels (qgemm, attention, rows, step): already built" in out
    (entry / "tokenizer.json").write_text("{}")  # damaged (edited): converted again
    assert not gguf.entry_intact(entry)
    assert "converted again (its entry was damaged)" in prepare()
    assert gguf.entry_intact(entry)


def test_prepare_names_a_missing_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["cache", "prepare", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf: no such file or directory" in capsys.readouterr().err
