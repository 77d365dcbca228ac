"""Parallel training applied from outside the model (torchtitan's way): DDP, FSDP2, tensor and pipeline parallel,
FSDP2 + TP on a 2-D mesh, gradient clipping that is right for each of them, and distributed checkpoints.

``cairn.model`` knows nothing of parallelism; this module wraps or rewrites a built model:

- ``setup`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), starts the process group (gloo for
  ``device="cpu"``, NCCL for ``"cuda"``; a short timeout so a failed rank ends the job instead of hanging it) and
  builds the ``DeviceMesh``. Without torchrun it returns a one-process ``DistEnv`` (parallel ``"none"``).
- ``parallelize`` applies DDP, ``fully_shard`` (each ``Block``, then the root), DTensor tensor parallelism
  (q, k, v, gate, up column-wise; o, down row-wise; each ``Attention``'s head counts made local, as torchtitan
  does; embeddings, norms and head stay replicated) or both on a ("dp", "tp") mesh.
- ``Pipeline`` splits the layers evenly into stages (stage 0 holds the embedding, the last stage the final norm
  and head) and runs ``torch.distributed.pipelining``'s GPipe or 1F1B schedule. Tied embeddings are handled
  Megatron's way: the last stage holds a copy of the embedding matrix (equal at the start), and the two copies'
  gradients are summed between the first and last stage after each step, so they stay equal.
- Every data-parallel mode averages gradients over the dp ranks, so a loop that backpropagates
  ``loss_sum * dp_size / n_global`` (``n_global`` = the window's target tokens over all dp ranks, from
  ``all_reduce_sum``) gets exactly the gradient of ``Σ loss / n_global`` — the same as one process on the
  whole batch (tests/train/test_distributed.py checks this for every mode).
- ``save_state`` / ``load_state`` use ``torch.distributed.checkpoint`` with full-model names, written into a
  temporary directory that is renamed into place only once complete (a ``complete`` marker); ``full_state_dict``
  gathers a plain state dict on rank 0 for export.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError
from cairn.model.layers import ForwardContext
from cairn.model.moe import MoE

PARALLEL_MODES = ("none", "ddp", "fsdp", "tp", "pp", "fsdp+tp")
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    """Where this process stands: its ranks, the parallelism, the device and the mesh."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "none"
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    mesh: object | None = None  # a torch.distributed.device_mesh.DeviceMesh, None without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pp_rank(self) -> int:
        return self.rank if self.parallel == "pp" else 0

    def group(self, dim: str):
        """The process group of one mesh dimension ("dp", "tp" or "pp"); None when that dimension is trivial."""
        if self.mesh is None or dim not in (self.mesh.mesh_dim_names or ()):
            return None
        return self.mesh[dim].get_group()


# --------------------------------------------------------------------------------------------- set-up


def setup(parallel: str = "none", device: str = "cpu", tp: int | None = None, timeout_s: float = 60) -> DistEnv:
    """Start this process's part of a (possibly one-process) run; see the module docstring.

    ``tp``: the tensor-parallel size of ``fsdp+tp`` (default 2); ``tp`` mode uses every process. Calling
    ``setup`` again in a process whose group is already up reuses the group (with a new mesh).
    """
    if parallel not in PARALLEL_MODES:
        raise CairnError(f"unknown --parallel {parallel!r}: choose one of {', '.join(PARALLEL_MODES)}")
    dev = _device(device)
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not launched:
        if parallel != "none":
            raise CairnError(
                f"--parallel {parallel} needs several processes, and this one was not started by torchrun "
                f"(no {', '.join(v for v in _TORCHRUN_VARS if v not in os.environ)} in the environment): launch "
                f"it as `torchrun --nproc-per-node N -m cairn train ... --parallel {parallel}`"
            )
        return DistEnv(device=dev)
    rank, world, local_rank = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if parallel == "none":
        if world > 1:
            raise CairnError(
                f"torchrun started {world} processes but --parallel is none: each would train alone on the same "
                "data; pass --parallel ddp (or fsdp, tp, pp, fsdp+tp), or run without torchrun"
            )
        return DistEnv(device=dev)
    shape, names = _mesh_shape(parallel, world, tp)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, shape, mesh_dim_names=names)
    env = DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=dev, parallel=parallel, mesh=mesh)
    if "dp" in names:
        env.dp_rank, env.dp_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
    if "tp" in names:
        env.tp_size = mesh["tp"].size()
    if "pp" in names:
        env.pp_size = mesh["pp"].size()
    return env


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CairnError(f"unknown --device {device!r}: use cpu or cuda") from e
    if dev.type not in ("cpu", "cuda"):
        raise CairnError(f"--device {device} is not supported for training: use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CairnError(
            "--device cuda, but this PyTorch sees no CUDA GPU (a CPU-only build, or no driver/GPU visible): "
            "use --device cpu"
        )
    return dev


def _mesh_shape(parallel: str, world: int, tp: int | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if parallel in ("ddp", "fsdp"):
        return (world,), ("dp",)
    if parallel == "pp":
        if world < 2:
            raise CairnError("--parallel pp needs at least 2 processes (one per pipeline stage)")
        return (world,), ("pp",)
    if parallel == "tp":
        if tp is not None and tp != world:
            raise CairnError(f"--parallel tp uses every process (tp = {world}); for tp = {tp} use fsdp+tp")
        return (world,), ("tp",)
    tp = 2 if tp is None else tp  # fsdp+tp
    if tp < 2 or world % tp or world // tp < 2:
        raise CairnError(
            f"--parallel fsdp+tp with {world} processes and tp = {tp}: needs tp ≥ 2 dividing the number of "
            "processes, with at least 2 data-parallel groups (e.g. 4 processes, tp 2); with fewer processes use "
            "--parallel tp or fsdp"
        )
    return (world // tp, tp), ("dp", "tp")


def teardown(env: DistEnv | None = None) -> None:
    """Wait for every rank, then destroy the process groups (if any).

    Unreachable wrapped models (DDP, FSDP states, DTensors and meshes hold process groups, often in reference
    cycles) are collected first, while the interpreter is whole: left to interpreter shutdown, a gloo group's
    destructor aborted 1 run in ~10 ("terminate called without an active exception", SIGABRT after a
    successful run).
    """
    if env is not None:
        env.mesh = None
    if dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def log(env: DistEnv, msg: str) -> None:
    """Print on rank 0 only."""
    if env.is_main:
        print(msg, flush=True)


def check_config(cfg, env: DistEnv) -> None:
    """Raise a CairnError when ``cfg`` cannot run under ``env``'s parallelism (call before building the model)."""
    if env.parallel in ("tp", "fsdp+tp"):
        if cfg.n_experts:
            raise CairnError(
                "tensor parallel does not shard mixture-of-experts layers (their experts are 3-D tensors): "
                "train MoE models with --parallel fsdp or ddp"
            )
        for name in ("n_heads", "n_kv_heads", "d_ff"):
            value = getattr(cfg, name)
            if value % env.tp_size:
                raise CairnError(
                    f"tensor parallel size {env.tp_size} does not divide the model's {name} ({value}): "
                    f"pick a tp size that divides n_heads, n_kv_heads and d_ff"
                )
    if env.parallel == "pp":
        if cfg.n_layers < env.pp_size:
            raise CairnError(f"{env.pp_size} pipeline stages but the model has only {cfg.n_layers} layers")
        if cfg.ffn_share_group > 1:
            raise CairnError("pipeline parallel cannot split layers that share one MLP (ffn_share_group > 1)")
        if cfg.n_experts and cfg.router_aux_loss_coef:
            raise CairnError(
                "pipeline parallel does not carry the MoE load-balancing loss between stages: use --parallel "
                "fsdp or ddp for a MoE model with router_aux_loss_coef > 0"
            )


# --------------------------------------------------------------------------------------------- wrapping


def parallelize(model: nn.Module, env: DistEnv) -> nn.Module:
    """``model`` (identical on every rank) wrapped or sharded for ``env.parallel``; moved to ``env.device``."""
    if env.parallel == "pp":
        raise ValueError("pipeline parallel wraps the model in distributed.Pipeline(model, env, ...), not parallelize")
    cfg = model.cfg
    check_config(cfg, env)
    model = model.to(env.device)
    if env.parallel == "none":
        return model
    if env.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=env.group("dp"))
    if env.parallel in ("tp", "fsdp+tp"):
        _apply_tp(model, env.mesh["tp"])
    if env.parallel in ("fsdp", "fsdp+tp"):
        from torch.distributed.fsdp import fully_shard

        dp_mesh = env.mesh["dp"]
        if cfg.ffn_share_group == 1:  # a block holding an MLP another block shares cannot be its own FSDP unit
            for block in model.layers:
                fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def _apply_tp(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = tp_mesh.size()
    done: set[int] = set()
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        if isinstance(mlp, MoE):  # check_config refuses these; kept as a guard
            raise CairnError("tensor parallel does not shard MoE layers: use --parallel fsdp or ddp")
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
        parallelize_module(attn, tp_mesh, plan)
        attn.n_heads //= tp  # each rank now computes its own heads: the view in Attention.forward must see them
        attn.n_kv_heads //= tp
        if id(mlp) not in done:  # an MLP shared by several layers is sharded once
            done.add(id(mlp))
            plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
            if mlp.swiglu:
                plan["gate"] = ColwiseParallel()
            parallelize_module(mlp, tp_mesh, plan)


def unwrap(model) -> nn.Module:
    """The plain module: DDP's ``.module``, a Pipeline's stage module; FSDP2/TP modules are themselves."""
    if isinstance(model, Pipeline):
        return model.module
    return getattr(model, "module", model) if _is_ddp(model) else model


def _is_ddp(model) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


@contextlib.contextmanager
def no_sync(model, env: DistEnv, last: bool):
    """Around one micro-batch's forward and backward: gradients are reduced over dp ranks only when ``last``."""
    if env.parallel == "ddp" and not last:
        with model.no_sync():
            yield
        return
    if env.parallel in ("fsdp", "fsdp+tp"):
        model.set_requires_gradient_sync(last)
    yield


def shard_rows(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """This data-parallel rank's rows of a global batch: ``x[dp_rank::dp_size]``."""
    return x[env.dp_rank :: env.dp_size]


def all_reduce_sum(value, env: DistEnv):
    """``value`` (int, float or tensor) summed over the data-parallel ranks; returned as the same type."""
    group = env.group("dp")
    if group is None:
        return value
    t = torch.as_tensor(value, dtype=torch.float64 if isinstance(value, float) else None)
    t = t.detach().clone().to(env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if isinstance(value, torch.Tensor):
        return t.to(value.device)
    return type(value)(t.item())


# --------------------------------------------------------------------------------------------- clipping


@torch.no_grad()
def grad_norm(model, env: DistEnv) -> float:
    """The total 2-norm of all gradients, as if the model were one unsharded module on one process."""
    return float(_total_norm(*_grads(model), env))


@torch.no_grad()
def clip_grad_norm_(model, max_norm: float, env: DistEnv) -> float:
    """Scale all gradients so their total 2-norm is at most ``max_norm`` (torch's rule: coefficient
    ``max_norm / (norm + 1e-6)`` clamped at 1); returns the total norm before clipping, as a float.

    Right for every mode: DTensor gradients (FSDP2 shards, TP shards, 2-D meshes, replicated) are reduced per
    (mesh, placements) group so each element counts once; plain gradients (DDP, TP-replicated, one process) are
    identical across the ranks that hold them; pipeline stages' norms are summed, the tied-embedding copy once.
    """
    grads, counted = _grads(model)
    total = _total_norm(grads, counted, env)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device) if not _is_dtensor(g) else float(coef))
    return float(total)


def _grads(model) -> tuple[list[torch.Tensor], list[bool]]:
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    return [p.grad for p in params], [not getattr(p, "_cairn_tied_copy", False) for p in params]


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _total_norm(grads: list[torch.Tensor], counted: list[bool], env: DistEnv) -> torch.Tensor:
    groups: dict = {}
    for g, c in zip(grads, counted, strict=True):
        if c:
            key = (g.device_mesh, tuple(g.placements)) if _is_dtensor(g) else ("plain", g.device)
            groups.setdefault(key, []).append(g)
    sq = torch.zeros((), dtype=torch.float64, device=env.device)
    for gs in groups.values():
        # get_total_norm on DTensors of one mesh and placements gives a DTensor (Partial where sharded):
        # full_tensor() reduces it over exactly the ranks that hold different pieces.
        norm = torch.nn.utils.get_total_norm(gs, 2.0, foreach=True)
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        sq += norm.to(sq.device, torch.float64) ** 2
    if env.parallel == "pp":  # every stage holds different parameters: sum their squares
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=env.group("pp"))
    return sq.sqrt().float()


# --------------------------------------------------------------------------------------------- pipeline


class _Stage(nn.Module):
    """One pipeline stage of a ``Transformer``: (embed) → its layers → (norm → head).

    Submodule names are the full model's (``layers`` is a ModuleDict keyed by the original layer index), so a
    stage's state dict is a slice of the model's. The tied head on the last stage is an ``embed`` copy.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.tied = model.head is None
        self.embed = None
        if first:
            self.embed = model.embed
        elif last and self.tied:
            w = model.embed.weight
            self.embed = nn.Embedding(w.shape[0], w.shape[1], _weight=w.detach().clone(), device=w.device)
            self.embed.weight._cairn_tied_copy = True  # counted once in gradient norms (stage 0 holds it too)
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.head = model.head if last and not self.tied else None
        self.rotary = model.rotary
        self.pp_group = None  # set by Pipeline: the group full_state_dict gathers over

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed(x)
        b, t = x.shape[:2]
        positions = torch.arange(t, device=x.device).expand(b, t)
        rope = self.rotary(positions, x.dtype)
        ctx = ForwardContext(positions, from_zero=True)
        ctx.router_stats = [] if self.cfg.n_experts else None  # MoE layers need a list; the aux loss is unused
        for block in self.layers.values():
            x = block(x, rope, ctx)
        if not self.last:
            return x
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.tied else self.head(x)


class Pipeline:
    """Pipeline parallelism over ``env.pp_size`` processes, one stage each (layers split evenly).

    ``module``: this rank's stage (build the optimizer on its parameters). ``step(inputs, targets, scale)``
    runs one accumulation window of ``n_microbatches`` micro-batches through the schedule ("1F1B" or
    "gpipe"), each micro-batch's loss being ``Σ CE · scale`` (ignore_index -100), accumulates the gradients and
    returns the window's unscaled CE sum on every rank. With tied embeddings, call ``step`` once per optimizer
    step: it sums the two embedding copies' gradients at its end.
    """

    def __init__(self, model: nn.Module, env: DistEnv, n_microbatches: int, schedule: str = "1F1B"):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if env.parallel != "pp":
            raise ValueError(f"Pipeline needs an env set up with parallel='pp', not {env.parallel!r}")
        kinds = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
        if schedule.lower() not in kinds:
            raise CairnError(f"unknown pipeline schedule {schedule!r}: use 1F1B or gpipe")
        check_config(model.cfg, env)
        self.env, self.n_microbatches = env, n_microbatches
        n, stages, r = model.cfg.n_layers, env.pp_size, env.pp_rank
        sizes = [n // stages + (1 if i < n % stages else 0) for i in range(stages)]
        start = sum(sizes[:r])
        self.first, self.last = r == 0, r == stages - 1
        # only this stage's modules move to the device; the rest of the model stays where it was built
        self.module = _Stage(model, list(range(start, start + sizes[r])), self.first, self.last).to(env.device)
        self.group = self.module.pp_group = env.group("pp")
        self.tied = self.module.tied
        # The two holders of the tied matrix (ranks of the first and last stage) sum their gradients.
        self._tie_group = None
        if self.tied:
            ranks = [dist.get_global_rank(self.group, 0), dist.get_global_rank(self.group, stages - 1)]
            self._tie_group = self.group if stages == 2 else dist.new_group(ranks)
        self._sums: list[torch.Tensor] = []
        self._scale = 1.0
        self._rows = 0  # rows of a training window: the shape the stages exchange activations in
        self.stage = PipelineStage(self.module, r, stages, env.device, group=self.group)
        self.schedule = kinds[schedule.lower()](self.stage, n_microbatches, loss_fn=self._loss, scale_grads=False)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=-100)
        self._sums.append(loss.detach())
        return loss * self._scale

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> float:
        """One window: ``inputs``, ``targets`` [B, T] (the same on every rank), B divisible by n_microbatches."""
        if inputs.shape[0] % self.n_microbatches:
            raise CairnError(
                f"a pipeline window of {inputs.shape[0]} rows does not split into {self.n_microbatches} "
                "equal micro-batches: make the batch a multiple of grad_accum"
            )
        self._sums, self._scale = [], float(scale)
        self._rows = inputs.shape[0]
        dev = self.env.device
        if self.first:
            self.schedule.step(inputs.to(dev))
        elif self.last:
            self.schedule.step(target=targets.to(dev))
        else:
            self.schedule.step()
        # The first step's set-up also calls the loss function (to infer backward metadata): keep only the
        # calls of the micro-batches themselves, the last n_microbatches.
        sums = self._sums[-self.n_microbatches :]
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=dev)
        total = total.to(dev, torch.float32)
        dist.broadcast(total, src=dist.get_global_rank(self.group, self.env.pp_size - 1), group=self.group)
        self.sync_tied_grads()
        return float(total)

    @torch.no_grad()
    def eval_loss_sum(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        """Forward-only through the schedule: the summed CE of ``targets`` (ignore_index -100) on every rank.

        The stages exchange activations of the shape they first ran with, so rows go through in windows of the
        training window's size, the last one padded with fully ignored targets: any batch size works.
        """
        rows = self._rows or -(-inputs.shape[0] // self.n_microbatches) * self.n_microbatches
        total = 0.0
        for i in range(0, inputs.shape[0], rows):
            x, y = inputs[i : i + rows], targets[i : i + rows]
            pad = rows - x.shape[0]
            if pad:
                x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
                y = torch.cat([y, y.new_full((pad, y.shape[1]), -100)])
            total += self._eval_window(x, y)
        return total

    def _eval_window(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        self._sums, self._scale = [], 1.0
        dev = self.env.device
        if self.first:
            self.schedule.eval(inputs.to(dev))
        elif self.last:
            self.schedule.eval(target=targets.to(dev))
        else:
            self.schedule.eval()
        sums = self._sums[-self.n_microbatches :]
        total = torch.stack(sums).sum() if sums else torch.zeros((), device=dev)
        total = total.to(dev, torch.float32)
        dist.broadcast(total, src=dist.get_global_rank(self.group, self.env.pp_size - 1), group=self.group)
        return float(total)

    def sync_tied_grads(self) -> None:
        """Sum the tied embedding's gradient between its copies on the first and last stage."""
        if not self.tied or not (self.first or self.last):
            return
        w = self.module.embed.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        dist.all_reduce(w.grad, op=dist.ReduceOp.SUM, group=self._tie_group)


# --------------------------------------------------------------------------------------------- checkpoints

_MARKER = "complete"
_EXTRA = "extra.pt"


def save_state(path: str | Path, model, optimizer=None, extra: dict | None = None, *, pipe=None) -> Path:
    """Save model + optimizer (+ ``extra``, a picklable dict) as a DCP checkpoint directory ``path``.

    Every rank writes its shards into ``path.tmp-<id>``; after a barrier, rank 0 writes ``extra.pt`` and the
    ``complete`` marker and renames the directory to ``path`` (replacing an older one). A save killed on the way
    leaves only the temporary directory, which ``load_state`` never reads. Needs a filesystem all ranks share.
    ``model`` may be a Pipeline or its stage module (``pipe=`` is accepted and means the same).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = Path(path)
    module = unwrap(pipe if pipe is not None else model) if isinstance(pipe or model, Pipeline) else model
    msd, osd = get_state_dict(module, optimizer if optimizer is not None else [])
    state = {"model": msd} | ({"optim": osd} if optimizer is not None else {})
    tmp = path.with_name(f"{path.name}.tmp-{_shared_token()}")
    with _one_process_dcp():
        dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        torch.save(dict(extra or {}), tmp / _EXTRA)
        (tmp / _MARKER).write_text("ok\n")
        old = None
        if path.exists():
            old = path.with_name(f"{tmp.name}.old")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def load_state(path: str | Path, model, optimizer=None, *, pipe=None) -> dict:
    """Load a ``save_state`` checkpoint into ``model`` (and ``optimizer``), both already parallelized the same
    way, with the same world size; returns the saved ``extra`` dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / _MARKER).is_file():
        raise CairnError(
            f"{path} is not a complete cairn checkpoint (no {_MARKER!r} marker: missing, or a save that was "
            "interrupted); pick another checkpoint directory"
        )
    module = unwrap(pipe if pipe is not None else model) if isinstance(pipe or model, Pipeline) else model
    msd, osd = get_state_dict(module, optimizer if optimizer is not None else [])
    state = {"model": msd} | ({"optim": osd} if optimizer is not None else {})
    with _one_process_dcp():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_state_dict(
        module,
        optimizer if optimizer is not None else [],
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
    )
    return torch.load(path / _EXTRA, weights_only=False)


def full_state_dict(model, env: DistEnv | None = None, *, pipe=None) -> dict[str, torch.Tensor]:
    """On rank 0, the whole model's state as plain CPU tensors under the unwrapped model's names (FSDP and TP
    shards gathered, pipeline stages collected); an empty dict on other ranks. Every rank must call it.
    (``env`` is not needed; ``pipe=`` means the same as passing the Pipeline.)"""
    if pipe is not None:
        model = pipe
    if isinstance(model, (Pipeline, _Stage)):
        stage = unwrap(model)
        wrapped = "_checkpoint_wrapped_module."  # activation checkpointing's wrapper, absent from the model's names
        mine = {k.replace(wrapped, ""): v.detach().cpu() for k, v in stage.state_dict().items()}
        parts = [None] * dist.get_world_size(stage.pp_group) if _rank() == 0 else None
        dist.gather_object(mine, parts, dst=dist.get_global_rank(stage.pp_group, 0), group=stage.pp_group)
        out: dict[str, torch.Tensor] = {}
        for part in parts or []:
            for k, v in part.items():
                out.setdefault(k, v)  # the tied copy on the last stage equals stage 0's embedding
        return out
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if _rank() == 0 else {}


@contextlib.contextmanager
def _one_process_dcp():
    """DCP warns on every one-process save/load ("assuming the intent is to save in a single process"): it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier(env: DistEnv | None = None) -> None:
    """Wait for every rank (a no-op in one process)."""
    _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shared_token() -> str:
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]
