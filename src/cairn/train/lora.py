"""LoRA: low-rank adapters on a frozen model, in PEFT's file layout.

``LoRALinear`` is an ``nn.Linear`` whose output gains ``(alpha / r) · B(A(dropout(x)))``: ``A`` [r, in] starts
Kaiming-uniform and ``B`` [out, r] at zero, as in PEFT, so a fresh adapter changes nothing. It keeps the wrapped
layer's own ``weight`` and ``bias`` Parameters under their own names, so the base's state-dict names do not change
(``layers.0.attn.q.weight``) and the adapter's are beside them (``layers.0.attn.q.lora_A``).

``apply_lora`` wraps the named projections of every block (cairn's names: ``q, k, v, o, gate, up, down``) and
freezes everything else; ``merge`` / ``unmerge`` fold the update into the weights and back; ``merge_and_unload``
leaves plain ``nn.Linear`` layers with merged weights (what the engine fuses and quantizes).

Files: ``save_adapter`` writes PEFT's layout, ``adapter_model.safetensors`` (keys such as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) and ``adapter_config.json``, so
``peft.PeftModel.from_pretrained(hf_model, dir)`` loads it; ``load_adapter`` reads that layout, adapters made by
PEFT included. cairn keeps q/k rows in HF's order (the GGUF loader undoes llama.cpp's Q/K permutation), so adapter
matrices need no permutation either way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError
from cairn.train.lora_flags import DEFAULT_ALPHA, DEFAULT_DROPOUT, DEFAULT_RANK, TARGETS  # (the flags: no torch)

HF_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
            "down": "down_proj"}
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
_PREFIX = "base_model.model."  # PEFT's prefix: PeftModel.base_model (LoraModel) .model (the CausalLM)
# a projection of a block, whatever wrappers (activation checkpointing, torch.compile) sit between
_WRAPPERS = re.compile(r"(_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)\.")
_SITE = re.compile(r"layers\.(\d+)\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))")


def clean_name(name: str) -> str:
    """A module or parameter name without the wrappers' own path parts (as the state dict names it)."""
    return _WRAPPERS.sub("", name)


class LoRALinear(nn.Linear):
    """``y = x Wᵀ + b + (alpha / r) · dropout(x) Aᵀ Bᵀ``, sharing ``W`` and ``b`` with the layer it wraps."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=w.dtype, device=w.device))
        if not w.is_meta:
            with torch.no_grad():  # PEFT's init: nn.Linear's default for A, zeros for B
                a = torch.empty(self.lora_A.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                self.lora_A.copy_(a)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """The update ``(alpha / r) · B A`` [out, in] that merging adds to the weight (fp32)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------- applying
def parse_targets(targets: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """cairn target names from a comma-separated string or a list; HF names (``q_proj``) are accepted too.
    ``None`` stays None (every projection the model has)."""
    if targets is None:
        return None
    items = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    items = [t for t in items if t]
    hf = {v: k for k, v in HF_NAMES.items()}
    out, bad = [], []
    for t in items:
        name = hf.get(t, t)
        if name not in TARGETS:
            bad.append(t)
        elif name not in out:
            out.append(name)
    if bad:
        raise CairnError(f"--lora-targets: unknown module name(s) {', '.join(map(repr, bad))}: use some of "
                         f"{','.join(TARGETS)} (cairn's names; HF's q_proj … down_proj are accepted too)")
    if not out:
        raise CairnError(f"--lora-targets is empty: name some of {','.join(TARGETS)}")
    return tuple(out)


def _sites(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(clean name, parent module, attribute, module)`` of every block projection LoRA may wrap, each module
    once (layers sharing an FFN share its projections). MoE experts and routers are not among them."""
    from cairn.model.layers import MLP, Attention

    found, seen = [], set()
    for name, parent in model.named_modules():
        if not isinstance(parent, (Attention, MLP)):
            continue
        for attr in ("q", "k", "v", "o") if isinstance(parent, Attention) else ("gate", "up", "down"):
            mod = getattr(parent, attr, None)
            full = clean_name(f"{name}.{attr}")
            if isinstance(mod, nn.Linear) and _SITE.fullmatch(full) and id(mod) not in seen:
                seen.add(id(mod))
                found.append((full, parent, attr, mod))
    return found


def _check_settings(rank, alpha, dropout) -> None:
    bad = []
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        bad.append(f"the LoRA rank (--lora-rank) must be a whole number of at least 1, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        bad.append(f"LoRA alpha (--lora-alpha) must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        bad.append(f"LoRA dropout (--lora-dropout) must be in [0, 1), got {dropout!r}")
    if bad:
        raise CairnError("; ".join(bad))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by clean name, every name of a shared one included."""
    return {clean_name(n): m for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _freeze_all_but_adapters(model: nn.Module) -> None:
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)


def apply_lora(model: nn.Module, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
               dropout: float = DEFAULT_DROPOUT, targets: str | Iterable[str] | None = None,
               seed: int | None = 0) -> dict[str, LoRALinear]:
    """Wrap the ``targets`` projections of every block in ``LoRALinear`` (in place) and freeze every other
    parameter. ``targets=None``: all of q, k, v, o, gate, up, down that the model has. ``seed`` seeds the A
    matrices' initialisation (None: torch's global generator). Returns the new layers by name."""
    _check_settings(rank, alpha, dropout)
    wanted = parse_targets(targets)
    if has_lora(model):
        raise CairnError("the model already has LoRA adapters: apply LoRA once (or load an adapter into it)")
    if getattr(model, "_cairn_fused", None) is not None:
        raise CairnError("the model's weights are fused for inference: apply LoRA before building an engine")
    sites = _sites(model)
    present = {full.rsplit(".", 1)[1] for full, *_ in sites}
    if wanted is not None:
        missing = [t for t in wanted if t not in present]
        if missing:
            raise CairnError(f"--lora-targets {','.join(missing)}: this model has no such dense projection "
                             f"(it has {','.join(t for t in TARGETS if t in present) or 'none'}; MoE experts "
                             "take no LoRA): leave those names out")
    chosen = [s for s in sites if wanted is None or s[0].rsplit(".", 1)[1] in wanted]
    if not chosen:
        raise CairnError("this model has no projection LoRA can adapt (q, k, v, o, gate, up, down)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _, parent, attr, mod in chosen:
        setattr(parent, attr, LoRALinear(mod, rank, alpha, dropout, gen))
    _freeze_all_but_adapters(model)
    model._cairn_lora = {"r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout)}
    return lora_modules(model)


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, each shared one once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ------------------------------------------------------------------------------------------ merging
def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (outputs unchanged up to rounding; the adapter stops running)."""
    for m in {id(m): m for m in lora_modules(model).values()}.values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    """Take merged adapters back out of the weights."""
    for m in {id(m): m for m in lora_modules(model).values()}.values():
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put plain ``nn.Linear`` layers (the merged weights) back in place."""
    merge(model)
    replaced: dict[int, nn.Linear] = {}
    for _, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if id(child) not in replaced:
                    lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device="meta")
                    lin.weight, lin.bias = child.weight, child.bias
                    replaced[id(child)] = lin
                setattr(parent, attr, replaced[id(child)])
    model.__dict__.pop("_cairn_lora", None)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (no adapter tensors; unmerged weights if adapters are merged), each shared
    tensor once, with clean names."""
    from cairn.weights.native import unique_state_dict

    merged = {n: m for n, m in lora_modules(model).items() if m.merged}
    out = {}
    for name, t in unique_state_dict(model).items():
        name = clean_name(name)
        if ".lora_" in name:
            continue
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and owner in merged:
            t = (t.float() - merged[owner].delta()).to(t.dtype)
        out[name] = t
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model with every adapter merged in, without adapter tensors (the model is left as
    it is): what ``cairn convert`` would write for the adapted model."""
    adapters = lora_modules(model)
    out = {}
    for name, t in base_state_dict(model).items():
        owner = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and owner in adapters:
            t = (t.float() + adapters[owner].delta()).to(t.dtype)
        out[name] = t
    return out


# -------------------------------------------------------------------------------------- PEFT files
def _hf_module(cairn_module: str) -> str:
    from cairn.weights.hf import cairn_to_hf_name

    return cairn_to_hf_name(cairn_module + ".weight").removesuffix(".weight")


def _cairn_module(hf_module: str) -> str | None:
    from cairn.weights.hf import hf_to_cairn_name

    try:
        name = hf_to_cairn_name(hf_module + ".weight")
    except CairnError:
        return None
    return name.removesuffix(".weight") if name else None


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (every layer of a shared FFN under its own name)."""
    out = {}
    for name, m in lora_modules(model).items():
        key = _PREFIX + _hf_module(name)
        out[f"{key}.lora_A.weight"] = m.lora_A.detach().clone()
        out[f"{key}.lora_B.weight"] = m.lora_B.detach().clone()
    return out


def adapter_config(model: nn.Module, base_model_name: str | None = None) -> dict:
    """``adapter_config.json`` of the model's adapters, as PEFT's ``LoraConfig`` writes it."""
    mods = lora_modules(model)
    if not mods:
        raise CairnError("the model has no LoRA adapters to save: apply LoRA (--lora) first")
    settings = getattr(model, "_cairn_lora", None)
    first = next(iter(mods.values()))
    ranks = {m.rank for m in mods.values()}
    alphas = {m.alpha for m in mods.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise CairnError("the model's adapters differ in rank or alpha: cairn saves one rank and alpha per adapter")
    dropout = settings["lora_dropout"] if settings else (
        first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0)
    targets = sorted({HF_NAMES[n.rsplit(".", 1)[1]] for n in mods})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name: str | None = None,
                 extra: dict | None = None) -> Path:
    """Write the model's adapters to ``out_dir`` in PEFT's layout (``adapter_model.safetensors`` and
    ``adapter_config.json``; ``extra``, e.g. the training step, to ``cairn_extra.json``). Merged adapters are
    saved as they are (merging does not change A and B)."""
    from cairn.weights.native import atomic_write_text, save_tensors

    out = Path(out_dir)
    config = adapter_config(model, base_model_name)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / ADAPTER_FILE, peft_state_dict(model), {"format": "pt"})
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2))
    if extra:
        atomic_write_text(out / "cairn_extra.json", json.dumps(extra, indent=2, default=str))
    return out


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_adapter(path: str | Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``(adapter_config, {cairn module name: (A, B)})`` of a PEFT LoRA directory, checked for what cairn runs."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise CairnError(f"{path}: no such adapter directory (an adapter is a directory with {CONFIG_FILE} and "
                         f"{ADAPTER_FILE}, as PEFT and cairn train --lora write)")
    if not cfg_file.is_file():
        hint = " (it is a model, not an adapter: pass it as the model)" if (path / "config.json").is_file() else ""
        raise CairnError(f"{path}: no {CONFIG_FILE}, so not a LoRA adapter{hint}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CairnError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CairnError(f"{cfg_file}: expected a JSON object")
    _check_peft_config(cfg, cfg_file)
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CairnError(f"{path}: adapter_model.bin is a pickle, which cairn does not read: re-save the adapter "
                             "with PEFT's save_pretrained(dir, safe_serialization=True)")
        raise CairnError(f"{path}: no {ADAPTER_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type
        raise CairnError(f"{weights}: cannot read safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        module = _cairn_module(m.group(1)) if m else None
        if m is None or module is None or not _SITE.fullmatch(module):
            raise CairnError(f"{weights}: tensor {key!r} is not a LoRA matrix of a q/k/v/o/gate/up/down projection "
                             "(cairn runs LoRA on those only; embedding, head and DoRA adapters are not supported)")
        pairs.setdefault(module, {})[m.group(2)] = t.float()
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise CairnError(f"{weights}: {module} has {'/'.join(ab)} but not both lora_A and lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CairnError(f"{weights}: {module}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             "make a rank-r pair")
        out[module] = (a, b)
    if not out:
        raise CairnError(f"{weights}: no LoRA matrices in this file")
    return cfg, out


def _check_peft_config(cfg: dict, where) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CairnError(f"{where}: peft_type {cfg.get('peft_type')!r}: cairn loads LoRA adapters only")
    unsupported = [
        ("use_dora", cfg.get("use_dora"), "DoRA"), ("fan_in_fan_out", cfg.get("fan_in_fan_out"), "fan_in_fan_out"),
        ("modules_to_save", cfg.get("modules_to_save"), "fully trained extra modules"),
        ("alpha_pattern", cfg.get("alpha_pattern"), "per-module alpha"),
        ("lora_bias", cfg.get("lora_bias"), "LoRA biases"),
    ]
    bad = [f"{key} ({what})" for key, value, what in unsupported if value]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r} (trained biases)")
    if bad:
        raise CairnError(f"{where}: this adapter uses {', '.join(bad)}, which cairn does not support: train it with "
                         "those options off")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise CairnError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")


def load_adapter(model: nn.Module, path: str | Path) -> dict:
    """Load a PEFT-layout LoRA adapter into ``model`` (wrapping its projections, or into the ``LoRALinear`` layers
    it has) and freeze everything but the adapters. Returns the adapter's config."""
    cfg, pairs = read_adapter(path)
    if getattr(model, "_cairn_fused", None) is not None:
        raise CairnError("the model's weights are fused for inference: load the adapter before building an engine")
    sites = {full: (parent, attr, mod) for full, parent, attr, mod in _sites(model)}
    existing = lora_modules(model)
    dropout = float(cfg.get("lora_dropout") or 0.0)
    for module, (a, b) in pairs.items():
        rank = a.shape[0]
        alpha = float(cfg["lora_alpha"])
        if module in existing:
            target = existing[module]
        elif module in sites:
            target = None
        else:
            raise CairnError(f"{path}: the adapter has matrices for {module} ({_hf_module(module)}), which this "
                             "model does not have: use the adapter with the base model it was trained on")
        mod = target if target is not None else sites[module][2]
        if b.shape[0] != mod.out_features or a.shape[1] != mod.in_features:
            raise CairnError(f"{path}: {module} is {mod.out_features}x{mod.in_features} in this model but the "
                             f"adapter's matrices make {b.shape[0]}x{a.shape[1]}: use the adapter with the base "
                             "model it was trained on")
        if target is None:
            parent, attr, _ = sites[module]
            # its A is overwritten below: initialised from a generator of its own, leaving torch's global RNG alone
            target = LoRALinear(mod, rank, alpha, dropout, torch.Generator().manual_seed(0))
            setattr(parent, attr, target)
            existing = lora_modules(model)
        elif target.rank != rank:
            raise CairnError(f"{path}: {module} has rank {rank} in the adapter but {target.rank} in the model")
        if target.merged:
            raise CairnError("the model's adapters are merged: unmerge them before loading another adapter")
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        target.alpha, target.scaling = alpha, scaling
        with torch.no_grad():
            target.lora_A.copy_(a.to(target.lora_A.dtype))
            target.lora_B.copy_(b.to(target.lora_B.dtype))
    _freeze_all_but_adapters(model)
    model._cairn_lora = {"r": int(cfg.get("r") or next(iter(pairs.values()))[0].shape[0]),
                         "lora_alpha": float(cfg["lora_alpha"]), "lora_dropout": dropout}
    return cfg


def load_merged(loaded, adapter_dir: str | Path, dtype: torch.dtype = torch.float32, name: str | None = None):
    """A ``LoadedModel`` (fp32 weights, not yet given to an engine) with the adapter at ``adapter_dir`` merged in
    and cast to ``dtype``: plain ``nn.Linear`` layers again, ready for the engine to fuse and quantize. Its name is
    ``name`` or ``<model name>+<adapter directory name>``."""
    from dataclasses import replace

    if next(loaded.model.parameters()).dtype != torch.float32:
        raise CairnError("an adapter is merged into fp32 weights: load the base model in fp32 (the merged model "
                         "is cast to the dtype asked for afterwards)")
    load_adapter(loaded.model, adapter_dir)
    model = merge_and_unload(loaded.model).to(dtype).eval().requires_grad_(False)
    return replace(loaded, model=model, name=name or f"{loaded.name}+{Path(adapter_dir).resolve().name}")


# ------------------------------------------------------------------------------------------ training
def save_base(model: nn.Module, out_dir: str | Path, cfg, tokenizer=None) -> Path:
    """Write the frozen base (without adapters) as a cairn checkpoint: for a run whose base exists nowhere else,
    e.g. ``cairn train pretrain --lora`` from a random initialisation."""
    from cairn.weights.native import save_state_checkpoint

    return save_state_checkpoint(out_dir, base_state_dict(model), cfg, tokenizer)


def exporter(base_model_name: str | None) -> Callable:
    """The Trainer's ``exporter`` for a LoRA run: the adapter (PEFT's layout) into ``OUT/``."""

    def export(model: nn.Module, out_dir, extra: dict) -> None:
        save_adapter(model, out_dir, base_model_name, extra)

    return export


def from_args(model: nn.Module, args, base_model_name: str | None = None, log=print) -> Callable | None:
    """Apply LoRA to ``model`` (in place) as ``--lora``, ``--lora-rank``, ``--lora-alpha``, ``--lora-dropout`` and
    ``--lora-targets`` say; return the ``exporter`` to give the Trainer (None without ``--lora``: nothing done)."""
    flags = {"--lora-rank": (args.lora_rank, DEFAULT_RANK), "--lora-alpha": (args.lora_alpha, DEFAULT_ALPHA),
             "--lora-dropout": (args.lora_dropout, DEFAULT_DROPOUT),
             "--lora-targets": (args.lora_targets, ",".join(TARGETS))}
    if not args.lora:
        stray = [flag for flag, (value, default) in flags.items() if value != default]
        if stray:
            raise CairnError(f"{', '.join(stray)} given without --lora: add --lora to train adapters")
        return None
    if getattr(args, "parallel", "none") != "none":
        raise CairnError(f"--lora trains in one process: leave out --parallel {args.parallel} (and torchrun)")
    targets = None if args.lora_targets == ",".join(TARGETS) else args.lora_targets
    apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, seed=args.seed)
    n, total = trainable_count(model)
    names = sorted({site.rsplit(".", 1)[1] for site in lora_modules(model)}, key=TARGETS.index)
    log(f"LoRA r={args.lora_rank} alpha={args.lora_alpha:g} on {','.join(names)}: {n:,} trainable of "
        f"{total:,} parameters ({n / total:.2%})")
    return exporter(base_model_name)
