"""The one training loop. Every objective (language modelling here; SFT, reward, DPO, RL later) plugs into it.

One optimizer step is one accumulation window of ``grad_accum`` micro-batches. The target tokens of the whole
window (over every data-parallel rank) are counted before any backward pass, and each micro-batch's summed loss is
divided by that count: the step's gradient is the gradient of the window's mean per-token loss, however tokens
fall into micro-batches and ranks. Then: gradient clipping, AdamW (no decay on norms, biases, embeddings),
warmup + cosine learning rate, periodic validation (loss and bits per byte) with the best model exported to
``OUT/``, and checkpoints holding everything a bit-exact ``--resume`` needs.

Parallelism, activation checkpointing and mixed precision are applied to the model from outside
(``distributed.py``, ``checkpoint_wrapper``, autocast); the model code knows nothing of them.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cairn.config import ModelConfig
from cairn.data.loader import PackedBatches, eval_batches
from cairn.errors import CairnError
from cairn.train import checkpoint
from cairn.train.metrics import MetricsLog, plot_losses
from cairn.train.objectives import IGNORE, Batch, Objective, token_cross_entropy
from cairn.train.optim import build_optimizer, lr_at, set_lr

# Flags a resumed run must share with the run it continues (anything else changes the trajectory).
_RESUME_FIXED = ("seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1",
                 "beta2", "grad_clip", "seed", "dtype", "compile", "parallel")


class DataSource(Protocol):
    """Training batches with a position a checkpoint can hold (``PackedBatches`` for token streams). Bound to
    this process's data-parallel rank by whoever builds it; ``next_global_window`` only for pipelines."""

    def next_window(self) -> list[Batch]: ...  # this rank's grad_accum micro-batches of the next step

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def epochs_done(self) -> float: ...


class ValSource(Protocol):
    """Validation batches (this rank's share), at most about ``max_tokens`` target tokens (None: all)."""

    def batches(self, max_tokens: int | None) -> Iterable[Batch]: ...


@dataclass
class TrainConfig:
    out: str = "out/pretrain"
    steps: int = 1000
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch, summed over data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 0
    val_every: int = 100  # 0: validate only at the end
    val_tokens: int = 65536  # predicted tokens per validation (0: the whole validation split)
    ckpt_every: int = 100
    keep: int = 3  # checkpoints kept
    dtype: str = "auto"  # auto | fp32 | bf16 (autocast)
    compile: str = "off"  # auto | on | off: torch.compile each block (the CLI's default is auto)
    activation_checkpointing: bool = False
    device: str = "cpu"
    parallel: str = "none"  # none | ddp | fsdp | tp | fsdp+tp | pp
    tp: int | None = None
    pp_schedule: str = "1F1B"
    max_seconds: float | None = None  # stop (with a checkpoint) after this much training time
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # objective-specific settings, saved with the run

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps >= 1, "at least 1"), ("seq-len", self.seq_len >= 2, "at least 2"),
            ("batch-size", self.batch_size >= 1, "at least 1"), ("grad-accum", self.grad_accum >= 1, "at least 1"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            ("min-lr-ratio", 0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
            ("warmup", self.warmup >= 0, "0 or more"), ("weight-decay", self.weight_decay >= 0, "0 or more"),
            ("grad-clip", self.grad_clip >= 0, "0 (off) or more"), ("val-every", self.val_every >= 0, "0 or more"),
            ("val-tokens", self.val_tokens >= 0, "0 (all) or more"), ("ckpt-every", self.ckpt_every >= 0, "0 or more"),
            ("keep", self.keep >= 1, "at least 1"),
            ("max-minutes", self.max_seconds is None or self.max_seconds > 0, "a positive number"),
        ]
        bad = [f"--{name} must be {want}" for name, ok, want in checks if not ok]
        if bad:
            raise CairnError("; ".join(bad))

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def _best_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def cpu_bf16_speedup(n: int = 1024) -> float:
    """How much faster a bf16 matmul runs than an fp32 one on this CPU, measured (~0.1 s). CPUs with AMX or
    AVX-512 BF16 run bf16 matmuls 2-8x faster; on AVX2-only CPUs bf16 is emulated and several times slower."""
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    return _best_time(lambda: a32 @ b32) / _best_time(lambda: a16 @ b16)


# bf16 autocast also adds casts around every matmul: pick it only when its matmuls are clearly faster.
BF16_MIN_SPEEDUP = 1.3


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32, bf16, or for ``auto`` the faster of the two here: bf16 on CUDA devices that support it; on a CPU,
    bf16 when its matmuls measure at least ``BF16_MIN_SPEEDUP`` times faster than fp32 ones."""
    if dtype == "fp32":
        return torch.float32
    if dtype == "bf16":
        return torch.bfloat16
    if dtype != "auto":
        raise CairnError(f"--dtype {dtype!r}: use auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32


def resolve_compile(compile: str, device: torch.device, parallel: str) -> bool:
    """Whether to compile each transformer block with ``torch.compile`` (Inductor fuses the norms, RoPE, SwiGLU
    and their backward passes). ``auto``: when Inductor can build kernels here (a C++ compiler for CPUs) and the
    parallelism is one it is tested with."""
    if compile not in ("auto", "on", "off"):
        raise CairnError(f"--compile {compile!r}: use auto, on or off")
    if compile == "off":
        return False
    if parallel in ("tp", "fsdp+tp", "pp"):
        if compile == "on":
            raise CairnError(f"--compile on is not supported with --parallel {parallel} (only none, ddp, fsdp): "
                             "pass --compile off")
        return False
    if device.type == "cpu":
        import shutil

        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            if compile == "on":
                raise CairnError("--compile on needs a C++ compiler for Inductor's CPU kernels (g++ or clang++ "
                                 "on PATH): install one, or pass --compile off")
            return False
    return True


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every transformer block in place (module names, and so checkpoints, stay as they are)."""
    for block in model.layers:
        block.compile()


_PEAK: dict[tuple, float] = {}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1536) -> float:
    """The FLOP/s of a large square matmul measured here: the peak MFU is quoted against (not a datasheet's)."""
    key = (str(device), dtype, torch.get_num_threads())
    if key not in _PEAK:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        best = math.inf
        for _ in range(3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        _PEAK[key] = 2 * n**3 / best
    return _PEAK[key]


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (torch's wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


class Trainer:
    """Runs ``TrainConfig`` on a model, an objective and packed token data.

    ``env`` is a ``cairn.train.distributed.DistEnv`` (None: one process). The model must be built identically on
    every rank (same seed); the trainer applies activation checkpointing and the parallelism itself.
    """

    def __init__(self, tc: TrainConfig, model: torch.nn.Module, model_cfg: ModelConfig, objective: Objective,
                 train: np.ndarray | DataSource, val: np.ndarray | ValSource | None = None,
                 token_bytes: np.ndarray | None = None, tokenizer=None, env=None, log=print, exporter=None):
        self.tc, self.cfg, self.objective, self.tokenizer = tc, model_cfg, objective, tokenizer
        self.env = env
        self.out = Path(tc.out)
        self.device = env.device if env is not None else torch.device(tc.device)
        self.dp_rank = env.dp_rank if env is not None else 0
        self.dp_size = env.dp_size if env is not None else 1
        self.world = env.world_size if env is not None else 1
        self.is_main = env is None or env.is_main
        self.log = log if self.is_main else (lambda *a, **k: None)
        self.compute_dtype = resolve_dtype(self._recorded_dtype() or tc.dtype, self.device)
        if env is not None and self.world > 1:  # every rank computes in the dtype rank 0 measured best
            import torch.distributed as dist

            choice = [self.compute_dtype]
            dist.broadcast_object_list(choice, src=0)
            self.compute_dtype = choice[0]
        self.compiled = resolve_compile(tc.compile, self.device, tc.parallel)
        self.pp = tc.parallel == "pp"
        self.token_bytes = token_bytes
        self.val_tokens = val if isinstance(val, np.ndarray) else None  # packed validation tokens
        self.val_source = val if val is not None and not isinstance(val, np.ndarray) else None
        if isinstance(train, np.ndarray):
            self.data = PackedBatches(train, tc.seq_len, tc.batch_size, tc.grad_accum, tc.seed, self.dp_rank,
                                      self.dp_size)
        else:
            self.data = train
        self.exporter = exporter
        if tc.seq_len > model_cfg.max_seq_len:
            raise CairnError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
        model = model.to(self.device)
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        if self.compiled:
            compile_blocks(model)
        if tc.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.pipe = None
        if env is not None and tc.parallel != "none":
            from cairn.train import distributed

            if self.pp:
                self.pipe = distributed.Pipeline(model, env, n_microbatches=tc.grad_accum, schedule=tc.pp_schedule)
                model = self.pipe.module
            else:
                model = distributed.parallelize(model, env)
        self.model = model
        self.opt = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
        self.step = 0
        self.val_extra: dict[str, float] = {}
        self._last_step_tokens = tc.tokens_per_step()
        self.best_val: float | None = None
        self.tokens_seen = 0
        self.train_seconds = 0.0
        from cairn.accounting import account

        self.flops_per_token = account(model_cfg).train_flops_per_token(tc.seq_len, tc.activation_checkpointing)
        self.peak = matmul_peak_flops(self.device, self.compute_dtype) * self.world
        self.metrics = MetricsLog(self.out / "metrics.jsonl")

    # ------------------------------------------------------------------ helpers
    def _recorded_dtype(self) -> str | None:
        """A resumed ``auto`` run keeps the dtype its first part resolved to (another machine might pick another,
        and change the trajectory)."""
        run_file = self.out / "run.json"
        if self.tc.dtype != "auto" or not run_file.is_file() or checkpoint.latest(self.out) is None:
            return None
        return json.loads(run_file.read_text()).get("compute_dtype")

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _all_sum(self, x: float) -> float:
        if self.env is None or self.world == 1:
            return float(x)
        from cairn.train import distributed

        return distributed.all_reduce_sum(x, self.env)

    def _no_sync(self, last: bool):
        if self.env is None or self.world == 1:
            return contextlib.nullcontext()
        from cairn.train import distributed

        return distributed.no_sync(self.model, self.env, last=last)

    def _clip(self) -> float:
        if self.env is not None and self.world > 1:
            from cairn.train import distributed

            return distributed.clip_grad_norm_(self.model, self.tc.grad_clip or math.inf, self.env)
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or math.inf))

    def run_state(self) -> dict[str, Any]:
        return {"step": self.step, "data": self.data.state_dict(), "rng": torch.get_rng_state(),
                "best_val": self.best_val, "tokens": self.tokens_seen, "train_seconds": self.train_seconds}

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        """One optimizer step; returns its metrics (loss = the window's mean per-token loss over all ranks)."""
        tc = self.tc
        lr = lr_at(self.step, tc.lr, tc.warmup, tc.steps, tc.min_lr_ratio)
        set_lr(self.opt, lr)
        sums: dict[str, float] = {}
        if self.pp:
            window = self.data.next_global_window().to(self.device)
            n_global = window.n_targets()
            n_tokens = window.inputs.numel()
            with self._autocast():
                loss_sum = self.pipe.step(window.inputs, window.targets, scale=1.0 / n_global)
        else:
            micro = [b.to(self.device) for b in self.data.next_window()]
            n_global = self._all_sum(sum(self._units(b) for b in micro))
            if n_global == 0:
                raise CairnError("a training step has no target tokens: check the data and its loss mask")
            n_tokens = self._all_sum(sum(b.inputs.numel() for b in micro))
            loss_local = torch.zeros((), dtype=torch.float64)
            for i, b in enumerate(micro):
                with self._no_sync(last=i == len(micro) - 1), self._autocast():
                    out = self.objective.loss(self.model, b)
                (out.loss_sum * (self.dp_size / n_global)).backward()
                loss_local += out.loss_sum.detach().double().cpu()
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            loss_sum = self._all_sum(float(loss_local))
            sums = {k: self._all_sum(v) / n_global for k, v in sorted(sums.items())}
        grad_norm = self._clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(n_tokens)
        self._last_step_tokens = int(n_tokens)
        return {"loss": loss_sum / n_global, "lr": lr, "grad_norm": grad_norm, **sums}

    def _units(self, batch: Batch) -> int:
        """What a window's loss is averaged over: target tokens, unless the objective counts otherwise (pairs)."""
        units = getattr(self.objective, "units", None)
        return int(units(batch)) if units is not None else batch.n_targets()

    # --------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, whole: bool = False) -> tuple[float, float]:
        """Mean loss (nats per predicted token) and bits per byte of the text those tokens stand for, over the
        first ``--val-tokens`` of the validation split (``whole``: all of it, as at the last step)."""
        if self.val_source is not None:
            return self._validate_source(whole)
        tc = self.tc
        self.model.eval()
        nats = n = nbytes = 0.0
        if (len(self.val_tokens) - 1) // tc.seq_len == 0:
            raise CairnError(
                f"the validation split has {len(self.val_tokens)} tokens, too few for one sequence of --seq-len "
                f"{tc.seq_len}: use more data, a larger --val-fraction or a shorter --seq-len"
            )
        cap = None if whole else tc.val_tokens or None
        batches = eval_batches(self.val_tokens, tc.seq_len, tc.batch_size // self.dp_size or 1, cap,
                               self.dp_rank, self.dp_size)
        for b in batches:
            b = b.to(self.device)
            with self._autocast():
                if self.pp:
                    s = self.pipe.eval_loss_sum(b.inputs, b.targets)
                else:
                    s = float(token_cross_entropy(self.model(b.inputs), b.targets))
            nats += s
            t = b.targets[b.targets != IGNORE]
            n += t.numel()
            nbytes += float(self.token_bytes[t.cpu().numpy()].sum()) if self.token_bytes is not None else 0
        self.model.train()
        nats, n, nbytes = self._all_sum(nats), self._all_sum(n), self._all_sum(nbytes)
        loss = nats / n
        bpb = nats / math.log(2) / nbytes if nbytes else float("nan")
        return loss, bpb

    @torch.no_grad()
    def _validate_source(self, whole: bool) -> tuple[float, float]:
        """Validation through the objective on a ``ValSource`` (conversations, pairs, ...): its mean loss per
        unit, bits per byte of the target tokens when token byte lengths are known, and the objective's metrics
        per unit in ``self.val_extra``."""
        self.model.eval()
        nats = n = nbytes = 0.0
        sums: dict[str, float] = {}
        for b in self.val_source.batches(None if whole else self.tc.val_tokens or None):
            b = b.to(self.device)
            with self._autocast():
                out = self.objective.loss(self.model, b)
            nats += float(out.metrics.get("ce", out.loss_sum))
            n += out.n_tokens
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if self.token_bytes is not None:
                t = b.targets[b.targets != IGNORE].cpu().numpy()
                nbytes += float(self.token_bytes[t].sum())
        self.model.train()
        nats, n, nbytes = self._all_sum(nats), self._all_sum(n), self._all_sum(nbytes)
        if n == 0:
            raise CairnError("the validation data has nothing to score: give more validation examples")
        self.val_extra = {f"val_{k}": self._all_sum(v) / n for k, v in sorted(sums.items()) if k != "ce"}
        return nats / n, (nats / math.log(2) / nbytes if nbytes else float("nan"))

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        state = self.run_state()
        if self.env is not None and self.world > 1:
            from cairn.train import distributed

            distributed.save_state(checkpoint.step_dir(self.out, self.step), self.model, self.opt, state,
                                   pipe=self.pipe)
            if self.is_main:
                checkpoint.prune(self.out, self.tc.keep)
        else:
            checkpoint.save(self.out, self.step, self.model, self.cfg, self.tokenizer, self.opt, state, self.tc.keep)

    def export(self, extra: dict) -> None:
        """Write the current model to ``OUT/`` as a cairn checkpoint (what generate / chat / serve load), or hand
        it to the ``exporter`` given (e.g. an adapter's own format)."""
        from cairn.weights.native import save_state_checkpoint, unique_state_dict

        if self.exporter is not None:
            if self.world > 1:
                raise CairnError("this objective's export runs in one process only: train it without torchrun")
            self.exporter(self.model, self.out, extra)
            return

        if self.env is not None and self.world > 1:
            from cairn.train import distributed

            tensors = distributed.full_state_dict(self.model, self.env, pipe=self.pipe)
            if self.is_main:
                save_state_checkpoint(self.out, tensors, self.cfg, self.tokenizer, extra)
        else:
            save_state_checkpoint(self.out, unique_state_dict(self.model), self.cfg, self.tokenizer, extra)

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in ``OUT``; False when there is none."""
        checkpoint.clean_partial(self.out) if self.is_main else None
        path = checkpoint.latest(self.out)
        if path is None:
            return False
        if self.env is not None and self.world > 1:
            from cairn.train import distributed

            state = distributed.load_state(path, self.model, self.opt, pipe=self.pipe)
        else:
            state = checkpoint.load(path, self.model, self.opt)
        self.step, self.best_val = int(state["step"]), state["best_val"]
        self.tokens_seen, self.train_seconds = int(state["tokens"]), float(state["train_seconds"])
        self.data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"])
        if self.is_main:
            self.metrics.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")
        return True

    def _check_run_file(self, resumed: bool) -> None:
        run_file = self.out / "run.json"
        now = {"train": asdict(self.tc), "model": self.cfg.to_dict(), "world_size": self.world,
               "compute_dtype": "bf16" if self.compute_dtype == torch.bfloat16 else "fp32"}
        if resumed and run_file.is_file():
            before = json.loads(run_file.read_text())
            diff = [k for k in _RESUME_FIXED if before["train"].get(k) != now["train"].get(k)]
            if before.get("model") != now["model"]:
                diff.append("the model config")
            if before.get("compute_dtype", now["compute_dtype"]) != now["compute_dtype"]:
                diff.append(f"compute dtype ({before['compute_dtype']} before)")
            if before.get("world_size") != self.world:
                diff.append(f"world size ({before.get('world_size')} before)")
            if diff:
                raise CairnError(
                    f"{self.out}: --resume with settings that differ from the run's ({', '.join(diff)}): "
                    "resume with the original flags, or start a new run in another --out"
                )
        if self.is_main:
            from cairn.weights.native import atomic_write_text

            atomic_write_text(run_file, json.dumps(now, indent=2, default=str))

    # --------------------------------------------------------------------- run
    def run(self, resume: bool = False) -> dict[str, Any]:
        tc = self.tc
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume and checkpoint.latest(self.out) is not None:
            raise CairnError(
                f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or pick another --out"
            )
        resumed = self.resume() if resume else False
        if resume and not resumed:
            self.log(f"no checkpoint in {self.out}: starting from step 0")
        if not resumed and self.is_main:
            self.metrics.truncate_after(0)
        self._check_run_file(resumed)
        params = f"{self.n_params / 1e6:.2f}M parameters, "
        self.log(f"training {params}{tc.tokens_per_step():,} tokens/step, {tc.steps} steps, "
                 f"{str(self.compute_dtype).removeprefix('torch.')}{' compiled' if self.compiled else ''}, "
                 f"{self.world} process(es) "
                 f"[{tc.parallel}], matmul peak {self.peak / 1e9:.0f} GFLOP/s")
        bar = None
        if tc.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, unit="step", dynamic_ncols=True)
        self.model.train()
        last = {}
        started = time.perf_counter()
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                rec = self.train_step()
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                tok_s = self._last_step_tokens / dt
                rec = {"step": self.step, **rec, "tokens": self.tokens_seen, "tok_per_s": tok_s,
                       "mfu": tok_s * self.flops_per_token / self.peak, "epoch": self.data.epochs_done}
                if not math.isfinite(rec["loss"]):
                    raise CairnError(f"the loss became {rec['loss']} at step {self.step}: lower --lr or "
                                     "raise --warmup, and resume from the last checkpoint")
                validate = (tc.val_every and self.step % tc.val_every == 0) or self.step == tc.steps
                stop_early = tc.max_seconds is not None and time.perf_counter() - started >= tc.max_seconds
                has_val = self.val_tokens is not None or self.val_source is not None
                if has_val and (validate or stop_early):
                    rec["val_loss"], rec["val_bpb"] = self.validate()
                    rec.update(self.val_extra)
                    if (self.step == tc.steps and self.val_tokens is not None and tc.val_tokens
                            and tc.val_tokens < len(self.val_tokens) - 1):
                        # the final figure over the whole held-out split (best-model selection keeps to the
                        # --val-tokens subset every validation uses, so that losses compare)
                        rec["val_loss_all"], rec["val_bpb_all"] = self.validate(whole=True)
                    if self.best_val is None or rec["val_loss"] < self.best_val:
                        self.best_val = rec["val_loss"]
                        self.export({"step": self.step, "val_loss": rec["val_loss"], "val_bpb": rec["val_bpb"]})
                        rec["best"] = True
                if self.is_main:
                    self.metrics.write(rec)
                last = rec
                if bar is not None:
                    bar.update(1)
                    post = f"loss {rec['loss']:.3f} lr {rec['lr']:.1e} {tok_s:,.0f} tok/s MFU {rec['mfu']:.1%}"
                    if "val_bpb" in rec and math.isfinite(rec["val_bpb"]):
                        post += f" val {rec['val_bpb']:.3f} bpb"
                    elif "val_loss" in rec:
                        post += f" val loss {rec['val_loss']:.3f}"
                    bar.set_postfix_str(post)
                if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or self.step == tc.steps or stop_early:
                    self.save_checkpoint()
                if self.is_main and (validate or self.step == tc.steps):
                    plot_losses(self.metrics.path, self.out / "loss.png", title=str(self.out.name))
                if stop_early:
                    self.log(f"stopped after {tc.max_seconds:.0f} s of training at step {self.step}")
                    break
        finally:
            if bar is not None:
                bar.close()
            self.metrics.close()
        if self.val_tokens is None and self.val_source is None:
            self.export({"step": self.step, "loss": last.get("loss")})
        if self.is_main:
            plot_losses(self.metrics.path, self.out / "loss.png", title=str(self.out.name))
        return {"step": self.step, "best_val_loss": self.best_val, **last}

