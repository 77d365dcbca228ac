"""A torchrun worker for tests/train/test_distributed.py: runs the cases of a job file through
``cairn.train.distributed`` the way the training loop does and writes what each rank saw to ``<out>/<case>/``.

``python -m torch.distributed.run --nproc-per-node 2 tests/train/dist_worker.py JOB OUT``. The job file
(``torch.save``-d by the test) holds a list of cases; a case is a dict with ``name``, ``kind`` ("grads" or
"train"), ``parallel`` (ddp, fsdp, tp, fsdp+tp, pp), ``cfg`` (ModelConfig fields), ``seed``, ``batches`` (a list of
(inputs, targets) global batches), ``grad_accum``, ``max_norm`` and, for pipelines, ``schedule``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from cairn.config import ModelConfig
from cairn.model import build_model
from cairn.train import distributed as D


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if D._is_dtensor(t) else t).detach().cpu().clone()


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: full(p.grad) for n, p in D.unwrap(model).named_parameters() if p.grad is not None}


def torch_own_norm(model) -> float | str:
    """What torch.nn.utils.get_total_norm (clip_grad_norm_'s norm) says on this rank's grads: for the report."""
    try:
        norm = torch.nn.utils.get_total_norm([p.grad for p in D.unwrap(model).parameters() if p.grad is not None])
        return float(full(norm))
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        return f"{type(e).__name__}: {e}"[:300]


def window(model, env, inputs, targets, grad_accum) -> float:
    """One accumulation window on this dp rank's rows; returns the global summed loss."""
    x, y = D.shard_rows(inputs, env), D.shard_rows(targets, env)
    n_global = D.all_reduce_sum(int((y != -100).sum()), env)
    total = 0.0
    for i, (xb, yb) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum), strict=True)):
        with D.no_sync(model, env, last=i == grad_accum - 1):
            logits = model(xb.to(env.device))
            loss_sum = F.cross_entropy(
                logits.flatten(0, 1).float(), yb.to(env.device).flatten(), reduction="sum", ignore_index=-100
            )
            (loss_sum * env.dp_size / n_global).backward()
        total += float(loss_sum.detach())
    return D.all_reduce_sum(total, env)


def run_grads(case: dict, env, out: str) -> None:
    cfg = ModelConfig(**case["cfg"])
    model = build_model(cfg).init_weights(seed=case["seed"])
    inputs, targets = case["batches"][0]
    if env.parallel == "pp":
        pipe = D.Pipeline(model, env, n_microbatches=case["grad_accum"], schedule=case["schedule"])
        n_global = int((targets != -100).sum())
        loss = pipe.step(inputs, targets, scale=1.0 / n_global)
        wrapped = pipe
    else:
        wrapped = D.parallelize(model, env)
        loss = window(wrapped, env, inputs, targets, case["grad_accum"])
    pre = grads_of(wrapped)
    torch_norm = torch_own_norm(wrapped) if env.parallel != "pp" else None
    norm = D.clip_grad_norm_(wrapped, case["max_norm"], env)
    post = grads_of(wrapped)
    full_sd = D.full_state_dict(wrapped)
    save(out, case, env, loss=loss, norm=norm, torch_norm=torch_norm, pre=pre, post=post, full_sd=full_sd)


def run_train(case: dict, env, out: str) -> None:
    """``steps`` optimizer steps; ``save_at``: save after that step; ``load``: resume from a checkpoint first."""
    cfg = ModelConfig(**case["cfg"])
    model = build_model(cfg).init_weights(seed=case["seed"])
    if env.parallel == "pp":
        model = D.Pipeline(model, env, n_microbatches=case["grad_accum"], schedule="1F1B")
    else:
        model = D.parallelize(model, env)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    start, losses, extra = 0, {}, None
    if case.get("load"):
        extra = D.load_state(case["load"], model, opt)
        start = extra["step"]
    for step in range(start, case["steps"]):
        inputs, targets = case["batches"][step]
        if env.parallel == "pp":
            losses[step] = model.step(inputs, targets, scale=1.0 / int((targets != -100).sum()))
        else:
            losses[step] = window(model, env, inputs, targets, case["grad_accum"])
        # a pipeline's stage module (not the Pipeline) here: its tied copy must still be counted once
        D.clip_grad_norm_(model.module if env.parallel == "pp" else model, case["max_norm"], env)
        opt.step()
        opt.zero_grad()
        if case.get("save_at") == step + 1:
            D.save_state(case["ckpt"], model, opt, extra={"step": step + 1})
    save(out, case, env, losses=losses, extra=extra, params=D.full_state_dict(model))


def save(out: str, case: dict, env, **result) -> None:
    d = os.path.join(out, case["name"])
    os.makedirs(d, exist_ok=True)
    torch.save(result, os.path.join(d, f"rank{env.rank}.pt"))


def main() -> None:
    torch.set_num_threads(1)
    job, out = sys.argv[1], sys.argv[2]
    cases = torch.load(job, weights_only=False)
    env = None
    for case in cases:
        env = D.setup(case["parallel"], device="cpu", tp=case.get("tp"), timeout_s=60)
        (run_grads if case["kind"] == "grads" else run_train)(case, env, out)
    D.teardown(env)


if __name__ == "__main__":
    main()
