"""cairn.train.distributed against one process: DDP, FSDP2, TP, FSDP2+TP and pipeline parallel (2 or 4 gloo
processes under torchrun, tests/train/dist_worker.py) must give the gradients, the clipped gradients, the total
norm and the loss of a plain model trained on the whole global batch in this process — computed here without
cairn.train — for one accumulation window of 2 (pipelines: 4) micro-batches whose ranks hold unequal numbers of
target tokens (ignore_index -100). A DCP checkpoint saved by FSDP after step k resumes exactly in a fresh run;
interrupted saves are never loaded; bad set-ups are CairnErrors.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.train import distributed as D

WORKER = Path(__file__).with_name("dist_worker.py")
DENSE = dict(vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
TIED = DENSE | {"tie_embeddings": True}
MOE = DENSE | {"n_experts": 4, "experts_per_token": 2, "moe_d_ff": 32}
MAX_NORM = 0.5  # below every case's norm (~1), so clipping scales the gradients


def global_batch(seed: int, rows: int = 8, t: int = 16, vocab: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r ignores ~10·r % of its targets; row 7 ignores all of them: dp rank 1 (odd rows) sees far fewer
    tokens than rank 0, and its micro-batches differ too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (rows, t), generator=g)
    y = torch.randint(0, vocab, (rows, t), generator=g)
    for r in range(rows):
        y[r][torch.rand(t, generator=g) < 0.1 * r] = -100
    y[rows - 1] = -100
    return x, y


def grads_case(name: str, parallel: str, cfg: dict, grad_accum: int = 2, schedule: str = "1F1B") -> dict:
    return dict(name=name, kind="grads", parallel=parallel, cfg=cfg, seed=7, batches=[global_batch(1)],
                grad_accum=grad_accum, max_norm=MAX_NORM, schedule=schedule)


def train_case(name: str, ckpt: Path, parallel: str = "fsdp", **kw) -> dict:
    return dict(name=name, kind="train", parallel=parallel, cfg=TIED, seed=3, grad_accum=2, max_norm=MAX_NORM,
                batches=[global_batch(100 + s) for s in range(3)], steps=3, ckpt=str(ckpt), **kw)


def launch(cases: list[dict], workdir: Path, nproc: int = 2) -> Path:
    """Run the cases under torchrun; returns the directory holding ``<case>/rank<r>.pt``."""
    workdir.mkdir(parents=True, exist_ok=True)
    job, out = workdir / "job.pt", workdir / "out"
    torch.save(cases, job)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), str(WORKER), str(job), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if p.returncode != 0:
        pytest.fail(f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return out


def results(out: Path, name: str) -> list[dict]:
    files = sorted((out / name).glob("rank*.pt"), key=lambda f: int(f.stem[4:]))
    return [torch.load(f, weights_only=False) for f in files]


def reference(case: dict) -> dict:
    """One process, the plain model, the whole global batch: Σ CE / tokens, backward, torch's clipping."""
    model = build_model(ModelConfig(**case["cfg"])).init_weights(seed=case["seed"])
    x, y = case["batches"][0]
    loss_sum = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
    (loss_sum / (y != -100).sum()).backward()
    pre = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), case["max_norm"])
    post = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = {n: t.clone() for n, t in model.state_dict().items()}
    return dict(loss=loss_sum.item(), norm=norm.item(), pre=pre, post=post, weights=weights)


def assert_tensors_close(got: dict, want: dict, what: str, rel: float = 1e-5) -> None:
    assert set(got) == set(want), f"{what}: names differ: {sorted(set(got) ^ set(want))}"
    for n, w in want.items():
        g = got[n]
        assert g.shape == w.shape, f"{what} {n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = float((g - w).abs().max())
        assert err <= rel * float(w.abs().max()) + 1e-9, f"{what} {n}: max error {err:.3g}, max {w.abs().max():.3g}"


DP_CASES = [
    grads_case(f"{mode}-{kind}", mode, cfg)
    for mode in ("ddp", "fsdp")
    for kind, cfg in (("dense", DENSE), ("tied", TIED), ("moe", MOE))
] + [grads_case(f"tp-{kind}", "tp", cfg) for kind, cfg in (("dense", DENSE), ("tied", TIED))]
PP_CASES = [
    grads_case(f"pp-{schedule}-{kind}", "pp", cfg, grad_accum=4, schedule=schedule)
    for schedule in ("1F1B", "gpipe")
    for kind, cfg in (("dense", DENSE), ("tied", TIED))
]
FSDP_TP_CASES = [grads_case(f"fsdp+tp-{kind}", "fsdp+tp", cfg) for kind, cfg in (("dense", DENSE), ("tied", TIED))]


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> tuple[Path, Path]:
    """One 2-process launch for every gradient case, plus the uninterrupted FSDP training run that saves a
    checkpoint after step 2 of 3."""
    work = tmp_path_factory.mktemp("dist2")
    ckpt = work / "ckpt"
    train = [train_case(f"train-full-{p}", ckpt / p, p, save_at=2) for p in ("fsdp", "pp")]
    out = launch([*DP_CASES, *PP_CASES, *train], work)
    return out, ckpt


@pytest.mark.parametrize("case", DP_CASES, ids=lambda c: c["name"])
def test_data_and_tensor_parallel_match_one_process(two_procs, case):
    out, _ = two_procs
    ref = reference(case)
    ranks = results(out, case["name"])
    assert len(ranks) == 2
    for r, res in enumerate(ranks):  # every rank ends with the full model's gradients, loss and norm
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-5)
        assert_tensors_close(res["pre"], ref["pre"], f"rank {r} grad")
        assert_tensors_close(res["post"], ref["post"], f"rank {r} clipped grad")
    # full_state_dict: plain tensors under the plain model's names on rank 0 (nothing elsewhere)
    assert_tensors_close(ranks[0]["full_sd"], ref["weights"], "full_state_dict", rel=0)
    assert ranks[1]["full_sd"] == {}


@pytest.mark.parametrize("case", PP_CASES, ids=lambda c: c["name"])
def test_pipeline_matches_one_process(two_procs, case):
    out, _ = two_procs
    ref = reference(case)
    ranks = results(out, case["name"])
    assert len(ranks) == 2
    merged_pre, merged_post = {}, {}
    for r, res in enumerate(ranks):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # broadcast from the last stage
        assert res["norm"] == pytest.approx(ref["norm"], rel=1e-5)  # summed over stages, the tied copy once
        for n in res["pre"]:  # a tied embedding is on both stages: each copy must hold the whole gradient
            assert_tensors_close({n: res["pre"][n]}, {n: ref["pre"][n]}, f"stage {r} grad")
        merged_pre |= res["pre"]
        merged_post |= res["post"]
    if case["cfg"].get("tie_embeddings"):
        assert "embed.weight" in ranks[0]["pre"] and "embed.weight" in ranks[1]["pre"]
    assert_tensors_close(merged_pre, ref["pre"], "grad")
    assert_tensors_close(merged_post, ref["post"], "clipped grad")
    assert_tensors_close(ranks[0]["full_sd"], ref["weights"], "full_state_dict", rel=0)


def test_fsdp_plus_tp_on_a_2d_mesh_matches_one_process(tmp_path):
    out = launch(FSDP_TP_CASES, tmp_path, nproc=4)
    for case in FSDP_TP_CASES:
        ref = reference(case)
        ranks = results(out, case["name"])
        assert len(ranks) == 4
        for r, res in enumerate(ranks):
            assert res["loss"] == pytest.approx(ref["loss"], rel=1e-6)
            assert res["norm"] == pytest.approx(ref["norm"], rel=1e-5)
            assert_tensors_close(res["pre"], ref["pre"], f"{case['name']} rank {r} grad")
            assert_tensors_close(res["post"], ref["post"], f"{case['name']} rank {r} clipped grad")
        assert_tensors_close(ranks[0]["full_sd"], ref["weights"], "full_state_dict", rel=0)


def test_checkpoint_resumes_exactly_in_a_fresh_run(two_procs, tmp_path):
    """FSDP and pipeline (tied embeddings: the copy on the last stage is saved under the same name)."""
    out, ckpt = two_procs
    for p in ("fsdp", "pp"):
        assert (ckpt / p / "complete").is_file()
    assert not [d for d in ckpt.iterdir() if ".tmp-" in d.name], "temporary directories are renamed into place"
    # a fresh launch, models initialised differently, loaded from the checkpoints of step 2, run step 3
    resumed = launch([train_case(f"train-resumed-{p}", ckpt / p, p, load=str(ckpt / p)) | {"seed": 99}
                      for p in ("fsdp", "pp")], tmp_path)
    for p in ("fsdp", "pp"):
        full, again = results(out, f"train-full-{p}"), results(resumed, f"train-resumed-{p}")
        assert len(full) == len(again) == 2
        for a, b in zip(full, again, strict=True):
            assert b["extra"] == {"step": 2}
            assert list(b["losses"]) == [2]
            assert b["losses"][2] == a["losses"][2], p  # exactly
        assert set(again[0]["params"]) == set(full[0]["params"])
        for n, t in full[0]["params"].items():
            assert torch.equal(again[0]["params"][n], t), f"{p} {n}"
    # three optimizer steps with a pipeline follow the same path as with FSDP (to rounding)
    fsdp, pp = results(out, "train-full-fsdp")[0], results(out, "train-full-pp")[0]
    assert list(pp["losses"]) == [0, 1, 2]
    for s in range(3):
        assert pp["losses"][s] == pytest.approx(fsdp["losses"][s], rel=1e-5)
    assert_tensors_close(pp["params"], fsdp["params"], "params after 3 steps", rel=1e-4)


# ------------------------------------------------------------------------------------------- one process


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies before its marker leaves the previous checkpoint untouched and is not loadable."""
    cfg = ModelConfig(**TIED)
    model = build_model(cfg).init_weights(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = global_batch(5)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    opt.step()
    opt.zero_grad()
    path = tmp_path / "ckpt"
    D.save_state(path, model, opt, extra={"step": 1})
    saved = {n: t.clone() for n, t in model.state_dict().items()}

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    def killed():
        raise KeyboardInterrupt("the save is killed after writing its shards")

    monkeypatch.setattr(D, "_barrier", killed)
    with pytest.raises(KeyboardInterrupt):
        D.save_state(path, model, opt, extra={"step": 2})
    monkeypatch.undo()
    (half,) = tmp_path.glob("ckpt.tmp-*")  # the interrupted save's shards, with no marker
    assert not (half / "complete").exists()
    with pytest.raises(CairnError, match="not a complete"):
        D.load_state(half, model, opt)
    with pytest.raises(CairnError, match="not a complete"):
        D.load_state(tmp_path / "missing", model, opt)

    fresh = build_model(cfg).init_weights(seed=2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert D.load_state(path, fresh, fresh_opt) == {"step": 1}
    for n, t in fresh.state_dict().items():
        assert torch.equal(t, saved[n]), n
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def _torchrun_env(monkeypatch, world: int) -> None:
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)


def test_setup_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    env = D.setup()
    assert (env.parallel, env.world_size, env.dp_size, env.is_main, env.mesh) == ("none", 1, 1, True, None)
    for parallel in ("ddp", "fsdp", "tp", "pp", "fsdp+tp"):
        with pytest.raises(CairnError, match="torchrun"):
            D.setup(parallel)
    with pytest.raises(CairnError, match="unknown --parallel"):
        D.setup("zero3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_an_error():
    with pytest.raises(CairnError, match="CUDA"):
        D.setup(device="cuda")


def test_bad_launches(monkeypatch):
    _torchrun_env(monkeypatch, 2)
    with pytest.raises(CairnError, match="parallel is none"):
        D.setup("none")
    with pytest.raises(CairnError, match="fsdp\\+tp"):
        D.setup("fsdp+tp")  # 2 processes cannot make 2 data-parallel groups of tp 2
    with pytest.raises(CairnError, match="tp uses every process"):
        D.setup("tp", tp=4)


@pytest.mark.parametrize(
    ("field", "change"),
    [("n_heads", dict(n_heads=3, n_kv_heads=3, d_model=48)), ("n_kv_heads", dict(n_kv_heads=1)),
     ("d_ff", dict(d_ff=63))],
)
def test_tp_refuses_indivisible_models(field, change):
    cfg = ModelConfig(**DENSE | change)
    env = D.DistEnv(world_size=2, parallel="tp", tp_size=2)
    with pytest.raises(CairnError, match=f"model's {field} "):
        D.check_config(cfg, env)
    with pytest.raises(CairnError, match=f"model's {field} "):
        D.parallelize(build_model(cfg), env)


def test_tp_refuses_moe_and_pp_refuses_shallow_models():
    with pytest.raises(CairnError, match="fsdp or ddp"):
        D.check_config(ModelConfig(**MOE), D.DistEnv(world_size=2, parallel="tp", tp_size=2))
    with pytest.raises(CairnError, match="layers"):
        D.check_config(ModelConfig(**DENSE | {"n_layers": 2}), D.DistEnv(world_size=4, parallel="pp", pp_size=4))
