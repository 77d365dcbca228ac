"""HF → cairn names for the mixture-of-experts tensors of Mixtral and Qwen2-MoE.

Handles both layouts: the per-expert tensors of the checkpoints on the Hub (Mixtral
``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen2-MoE ``mlp.experts.{e}.gate_proj/up_proj/down_proj``) and the
fused 3-D tensors of ``transformers`` >= 5 in memory (``mlp.experts.gate_up_proj`` [E, 2F, D],
``mlp.experts.down_proj`` [E, D, F]). cairn stores ``layers.{i}.mlp.experts.{gate,up}`` [E, F, D],
``layers.{i}.mlp.experts.down`` [E, D, F], ``layers.{i}.mlp.router.weight``, ``layers.{i}.mlp.shared.*`` and
``layers.{i}.mlp.shared_gate.weight``. The dense tensors are left to the caller.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cairn.errors import CairnError

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(.+)$")
_PER_EXPERT = re.compile(r"^experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PER_EXPERT_NAME = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_SIMPLE = {
    "gate.weight": "router.weight",
    "shared_expert_gate.weight": "shared_gate.weight",
    "shared_expert.gate_proj.weight": "shared.gate.weight",
    "shared_expert.up_proj.weight": "shared.up.weight",
    "shared_expert.down_proj.weight": "shared.down.weight",
}


def moe_state_dict_from_hf(hf: Mapping[str, torch.Tensor], n_experts: int) -> dict[str, torch.Tensor]:
    """The cairn tensors for every MoE tensor in ``hf`` (other keys are ignored)."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in hf.items():
        m = _LAYER.match(key)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        prefix = f"layers.{layer}.mlp."
        if rest in _SIMPLE:
            out[prefix + _SIMPLE[rest]] = t
        elif rest == "experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            out[prefix + "experts.gate"], out[prefix + "experts.up"] = gate.contiguous(), up.contiguous()
        elif rest == "experts.down_proj":
            out[prefix + "experts.down"] = t
        elif e := _PER_EXPERT.match(rest):
            per_expert.setdefault((layer, _PER_EXPERT_NAME[e.group(2)]), {})[int(e.group(1))] = t
    for (layer, name), tensors in per_expert.items():
        missing = sorted(set(range(n_experts)) - set(tensors))
        if missing:
            raise CairnError(f"layer {layer}: the checkpoint lacks the {name} weights of expert(s) {missing}")
        out[f"layers.{layer}.mlp.experts.{name}"] = torch.stack([tensors[i] for i in range(n_experts)])
    return out
