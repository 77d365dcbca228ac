"""``cairn cache list`` and ``cairn cache clear [ENTRY]``: what cairn keeps in its cache directory, and removing it.

The cache (``$CAIRN_CACHE_DIR``, else ``$XDG_CACHE_HOME/cairn``, else ``~/.cache/cairn``) holds GGUF files
converted to cairn checkpoints (``gguf/``, one entry per file digest, least recently used first out past the cap
``CAIRN_CACHE_MAX_GB``) and the compiled C kernels (``kernels/``). Everything in it is rebuilt on demand.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from cairn.errors import CairnError
from cairn.weights import gguf


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "cache", help="list or clear cairn's cache (converted GGUF models, compiled kernels)",
        description="cairn's cache directory ($CAIRN_CACHE_DIR, else $XDG_CACHE_HOME/cairn, else ~/.cache/cairn) "
                    "holds GGUF files converted to cairn checkpoints, least recently used removed first past "
                    "CAIRN_CACHE_MAX_GB (default 8), and the compiled C kernels; all of it is rebuilt on demand.")
    sub = p.add_subparsers(dest="cache_command", metavar="COMMAND")
    sub.required = True
    ls = sub.add_parser("list", help="each entry with its size, source file and last use; the total against the cap")
    ls.set_defaults(func=cmd_list)
    cl = sub.add_parser("clear", help="remove every entry, or the one named",
                        description="Remove cached entries: all of them, or the one ENTRY names (an entry name or its "
                                    "first characters as `cairn cache list` shows them, the GGUF file it was "
                                    "converted from, or `kernels`). Entries are rebuilt when next needed.")
    cl.add_argument("entry", nargs="?", default=None, help="the entry to remove (default: all)")
    cl.set_defaults(func=cmd_clear)
    pr = sub.add_parser("prepare", help="convert a model into the cache and build the C kernels now, ahead of its "
                                        "first start",
                        description="Do now what a model's first start would do: convert MODEL (a GGUF file; "
                                    "default: the bundled SmolLM2-135M-Instruct) into the cache, or convert it again "
                                    "if its entry is damaged, and compile every C kernel not yet built for this CPU. "
                                    "`cairn serve`, `generate` and `chat` then start as from a warm cache. `make run` "
                                    "runs it before it serves. An HF or cairn checkpoint directory is read as it "
                                    "is: only the kernels are built for it.")
    pr.add_argument("model", nargs="?", default=None,
                    help="a GGUF file, HF directory or cairn checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    pr.set_defaults(func=cmd_prepare)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return "just now"


def _sources() -> dict[str, str]:
    """Entry digest -> the GGUF file it was converted from (as remembered in hashes.json)."""
    return {digest: key.split("|", 1)[0] for key, digest in gguf.known_hashes().items()}


def _kernels() -> tuple[int, int, float]:
    """(number of compiled kernel libraries, their bytes with checksums, newest modification time)."""
    root = gguf.cache_dir() / "kernels"
    files = [f for f in root.iterdir() if f.is_file()] if root.is_dir() else []
    return (sum(f.suffix == ".so" for f in files), sum(f.stat().st_size for f in files),
            max((f.stat().st_mtime for f in files), default=0.0))


def cmd_list(args) -> int:
    limit = gguf.cache_limit_bytes()
    root = gguf.cache_dir()
    entries, sources, now = gguf.cache_entries(), _sources(), time.time()
    print(f"cache: {root}")
    rows = [(e.name, human_bytes(size), human_age(now - used), sources.get(e.name.split("-v")[0], "?"))
            for used, size, e in reversed(entries)]  # most recently used first
    n_kernels, kernel_bytes, kernel_time = _kernels()
    if n_kernels:
        rows.append(("kernels", human_bytes(kernel_bytes), human_age(now - kernel_time),
                     f"{n_kernels} compiled C kernel librar{'y' if n_kernels == 1 else 'ies'}"))
    if not rows:
        print("(empty)")
    else:
        widths = [max(len(r[i]) for r in [("ENTRY", "SIZE", "USED", "SOURCE"), *rows]) for i in range(3)]
        for r in [("ENTRY", "SIZE", "USED", "SOURCE"), *rows]:
            print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    models = sum(size for _, size, _ in entries)
    print(f"converted models: {human_bytes(models)} of {human_bytes(limit)} (CAIRN_CACHE_MAX_GB; the least recently "
          f"used are removed past it); total with kernels {human_bytes(models + kernel_bytes)}")
    return 0


def cmd_clear(args) -> int:
    root = gguf.cache_dir()
    if args.entry is None:
        freed = sum(size for _, size, _ in gguf.cache_entries()) + _kernels()[1]
        for part in ("gguf", "kernels"):
            shutil.rmtree(root / part, ignore_errors=True)
        print(f"cleared {root} ({human_bytes(freed)} freed)")
        return 0
    target = _find(args.entry)
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    shutil.rmtree(target)
    print(f"removed {target} ({human_bytes(size)} freed)")
    return 0


def cmd_prepare(args) -> int:
    """Convert the model into the cache and build the kernels, without importing torch; a ``CairnError`` (exit 2)
    names what could not be done and how to fix it."""
    from cairn.weights import kernel_builder, resolve

    path = resolve(args.model)
    print(f"cache: {gguf.cache_dir()}")
    if path.is_file() and gguf.is_gguf(path):
        entry = gguf.entry_path(path)
        if gguf.entry_intact(entry):
            print(f"{path.name}: already converted ({entry.name})")
        else:
            again = entry.exists()  # (its files fail their digests, or it is half there)
            start = time.perf_counter()
            try:
                gguf.convert(path, again=True)
            except OSError as e:
                raise CairnError(f"cannot write the cache entry {entry} ({e.strerror or e}): set CAIRN_CACHE_DIR to "
                                 "a writable directory with room for it") from None
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            print(f"{path.name}: {'converted again (its entry was damaged)' if again else 'converted'} in "
                  f"{time.perf_counter() - start:.2f} s ({entry.name}, {human_bytes(size)})")
    else:
        print(f"{path}: read as it is at each start (not a GGUF file): nothing to convert")
    build = kernel_builder()
    missing = [name for name in build.LIBRARIES if not build.built(name)]
    start = time.perf_counter()
    for name in missing:
        build.library(name)  # KernelUnavailable (a CairnError) names the missing compiler or the failed build
    done = "already built" if not missing else f"built {', '.join(missing)} in {time.perf_counter() - start:.1f} s"
    print(f"kernels ({', '.join(build.LIBRARIES)}): {done}")
    return 0


def _find(name: str) -> Path:
    root = gguf.cache_dir()
    if name == "kernels":
        if not (root / "kernels").is_dir():
            raise CairnError(f"no compiled kernels in {root}: nothing to clear")
        return root / "kernels"
    entries = [e for _, _, e in gguf.cache_entries()]
    path = Path(name).expanduser()
    if path.is_file():  # the GGUF file an entry was converted from
        wanted = str(path.resolve())
        digests = {d for d, src in _sources().items() if src == wanted}
        hits = [e for e in entries if e.name.split("-v")[0] in digests]
    else:
        hits = [e for e in entries if e.name.startswith(name)] if name else []
    if len(hits) == 1:
        return hits[0]
    names = ", ".join(e.name for e in (hits or entries)) or "none"
    if hits:
        raise CairnError(f"{name!r} matches several cache entries ({names}): give more of the name")
    raise CairnError(f"no cache entry {name!r} in {root} (entries: {names}; see `cairn cache list`)")

