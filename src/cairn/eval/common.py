"""What every ``cairn eval`` verb shares: the ``--out DIR`` it writes into, progress bars, and the JSON and PNG files
it leaves there (written atomically: a killed eval never leaves a half-written result)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from cairn.errors import CairnError
from cairn.weights.native import atomic_write, atomic_write_text


def add_out_arg(p, default: str) -> None:
    """``--out DIR`` on an eval's parser (``default``: a folder under the current directory)."""
    p.add_argument("--out", default=default, metavar="DIR",
                   help="folder for the JSON results and the PNG pictures (default %(default)s; created if missing)")


def out_dir(path: str | Path) -> Path:
    """``--out``'s folder, created if missing; a path that is a file is a clear error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CairnError(f"--out {out}: is a file, not a folder; give a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data, indent: int | None = 2) -> Path:
    """``indent=None``: one compact line (for large arrays such as attention weights)."""
    atomic_write_text(Path(path), json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
    return Path(path)


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (evals run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(items: Iterable, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm bar on stderr over ``items`` (``enabled=False``: the items as they are, e.g. under ``--json``)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)


def add_quantize_args(p) -> None:
    """``--quantize`` and ``--group-size`` on an eval that runs the model's own forward pass (attention maps, probes):
    the same choices as ``generate``'s, read by ``load_with_engine_weights``."""
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default=None,
                   help="the weights to run: those the engine's decode kernels hold for int8 (per channel) or int4 "
                        "(group-wise), dequantized into the model (activations stay fp32); none: fp32; auto "
                        "(default): the file's own precision class, as generate (int4 for the default model, whose "
                        "4-bit values are then exactly the file's)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4 group size")


def load_with_engine_weights(args):
    """``(loaded model, weights)``: the model ``args`` name with, for every layer's projections, the weights an engine
    built with ``--quantize``/``--group-size`` multiplies by in its decode steps, dequantized (``weights``: the
    engine's mode, "int8", "int4" or "none"), so that the model's own forward pass (``model.hidden``: its hooks and
    attention probe) shows what quantization does to hidden states and attention.

    The numbers are the kernels' own: each matrix is built by the engine's ``InferenceWeights`` (from the file's
    GGUF blocks where the engine runs those as they are, e.g. the default model's Q4_1) and read back with its
    ``dequantized()``. Embeddings and norms are the engine's too (fp32, or looked up from the file's blocks); the
    output head is not set (``model.hidden`` does not use it). Not reproduced: the kernels' rounding of activations
    (per group of 32, to int16 in prompts and int8 in decode steps for 4-bit weights), and that the engine's long
    prompt chunks (over 512 rows) multiply by the fp32 weights the model was loaded with."""
    import torch

    from cairn.cli import _load
    from cairn.engine.engine import resolve_quantize
    from cairn.engine.runner import InferenceWeights, _matrix_names
    from cairn.model.moe import MoE
    from cairn.weights import dequantize_weights

    loaded = _load(args, quantized=True)
    mode = resolve_quantize(getattr(args, "quantize", None) or "auto", loaded.config)
    if mode == "none":
        dequantize_weights(loaded)
        return loaded, mode
    model = loaded.model
    weights = InferenceWeights(model, mode, getattr(args, "group_size", 32), tokenizer=loaded.tokenizer,
                               blocks=loaded.quantized)
    state: dict[str, torch.Tensor] = {}
    for i, block in enumerate(model.layers):
        keys = ("qkv", "o") if isinstance(block.mlp, MoE) else ("qkv", "o", "gate_up", "down")  # experts: fp32
        for key in keys:
            names = _matrix_names(model, i, key)
            rows = [model.get_parameter(n).shape[0] for n in names]
            dtype = model.get_parameter(names[0]).dtype
            for name, part in zip(names, getattr(weights, key)[i].dequantized().split(rows), strict=True):
                state[name] = part.to(dtype).clone()
    model.load_state_dict(state, strict=False, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    # the engine's fused views now point at the replaced tensors: no engine may be built from this model
    del model._cairn_fused
    if loaded.quantized:  # blocks the engine ran as they are (e.g. a Q8_0 head): their fp32 parameters stay meta
        loaded.quantized = {k: v for k, v in loaded.quantized.items() if k not in state}
    return loaded, mode
