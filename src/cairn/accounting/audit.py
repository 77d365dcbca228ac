"""`cairn audit CLAIMS.yaml`: check an article's numbers about a model, claim by claim.

A claims file states the model (dimensions, layer groups with a kind and a count) and the article's claims:
``count`` claims (a layer, a group of layers, the total), ``check`` claims (arithmetic and comparisons, which
may name other claims by id) and ``effect`` claims (what changing the config or the context does to a quantity).
Counts are computed by ``cairn.accounting`` from the stated dimensions under the stated layer kind, and under the
plausible variants (MHA/GQA/MQA, SwiGLU/GELU, with/without biases, RMSNorm/LayerNorm), reporting the closest.
The format is documented in docs/accounting.md; examples are in examples/claims/.
"""

from __future__ import annotations

import ast
import itertools
import operator
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from cairn.accounting.costs import account
from cairn.config import ModelConfig
from cairn.errors import CairnError

APPROX = Fraction(5, 100)  # default tolerance of "≈" / "~" figures
LAYER_KINDS = ("decoder", "encoder", "decoder_cross", "cross_attention", "attention", "mlp")
QUANTITIES = ("total_params", "active_params", "forward_matmul_flops_per_token", "attention_flops_per_token",
              "kv_bytes_per_token", "kv_bytes", "weight_bytes")
MODEL_FIELDS = {"d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size", "mlp", "attention", "biases",
                "norm", "tie_embeddings", "max_seq_len"}


# ---------------------------------------------------------------- YAML with line numbers
class _Loader(yaml.SafeLoader):
    pass


def _mapping_with_line(loader: _Loader, node: yaml.MappingNode) -> dict[str, Any]:
    d = loader.construct_mapping(node, deep=True)
    d["__line__"] = node.start_mark.line + 1
    return d


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


class _Where:
    """Turns problems in one claims file into CairnErrors that name the file and line."""

    def __init__(self, path: str):
        self.path = path

    def error(self, line: int | None, msg: str) -> CairnError:
        return CairnError(f"{self.path}:{line or '?'}: {msg}")


# ------------------------------------------------------------------------------ numbers
_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "bn": 10**9, "t": 10**12}
_NUM = re.compile(r"^\s*([0-9][0-9,_ ]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\s*(k|m|bn|b|t)?\s*$", re.IGNORECASE)


def parse_number(text: Any) -> Fraction:
    """``3,145,728``, ``151.09M``, ``175B``, ``1.5e9``, ``0.75`` → an exact Fraction."""
    if isinstance(text, bool):
        raise ValueError(f"not a number: {text!r}")
    if isinstance(text, Fraction):
        return text
    if isinstance(text, int | float):
        return Fraction(str(text))
    m = _NUM.match(str(text))
    if not m:
        raise ValueError(f"not a number: {text!r}")
    digits = m.group(1).replace(",", "").replace("_", "").replace(" ", "")
    return Fraction(digits) * _SUFFIX.get((m.group(2) or "").lower(), 1)


@dataclass
class Target:
    """What a claim states: an exact figure, an approximate one (≈, ~) or a range (lo-hi)."""

    lo: Fraction
    hi: Fraction
    text: str
    exact: bool

    def holds(self, x: Fraction) -> bool:
        return self.lo <= x <= self.hi

    @property
    def value(self) -> Fraction:
        return (self.lo + self.hi) / 2


_RANGE = re.compile(r"^(.+?)\s*(?:–|\.\.|-)\s*(.+)$")


def parse_target(raw: Any, tolerance: Fraction = APPROX) -> Target:
    """``3,145,728`` (exact), ``≈ 200M`` / ``~200M`` (within ``tolerance``), ``25-35B`` or ``[25B, 35B]`` (a range)."""
    if isinstance(raw, list) and len(raw) == 2:
        return Target(parse_number(raw[0]), parse_number(raw[1]), f"{raw[0]}–{raw[1]}", False)
    text = str(raw).strip()
    body = text.lstrip("≈~ ")
    m = _RANGE.match(body)
    if m and _NUM.match(m.group(1)) and _NUM.match(m.group(2)):
        lo_m, hi_m = _NUM.match(m.group(1)), _NUM.match(m.group(2))
        lo_text = m.group(1) if lo_m.group(2) else m.group(1) + (hi_m.group(2) or "")  # "25-35B": both in B
        return Target(parse_number(lo_text), parse_number(m.group(2)), text, False)
    v = parse_number(body)
    if body != text:
        return Target(v * (1 - tolerance), v * (1 + tolerance), text, False)
    return Target(v, v, text, True)


def fmt(x: Fraction | int | float) -> str:
    x = Fraction(x)
    if x.denominator == 1:
        return f"{x.numerator:,}"
    return f"{float(x):,.4g}"


# ------------------------------------------------------------------------ expressions
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow}
_RELATIONS = ("<=", ">=", "≈", "==", "=", "<", ">")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def _eval(node: ast.AST, names: dict[str, Fraction]) -> Fraction:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left, names), _eval(node.right, names)
        if isinstance(node.op, ast.Pow):
            if right.denominator != 1:
                raise ValueError("only whole powers are supported")
            return left ** int(right)
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, names)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r} (names are ids of earlier count claims: {sorted(names)})")
        return names[node.id]
    raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")


def split_relation(expr: str) -> tuple[str, str, str]:
    text = _THOUSANDS.sub("", expr).replace("×", "*").replace("·", "*").replace("÷", "/").replace("^", "**")
    for rel in _RELATIONS:
        if rel in text:
            left, right = text.split(rel, 1)
            return left.strip(), "=" if rel == "==" else rel, right.strip()
    raise ValueError(f"no relation (=, ≈, <, >, <=, >=) in {expr!r}")


def evaluate(expr: str, names: dict[str, Fraction]) -> Fraction:
    tree = ast.parse(expr.strip(), mode="eval")
    return _eval(tree.body, names)


# ------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class Variant:
    mlp: str
    attention: str  # "mha", "gqa" or "mqa"
    biases: bool
    norm: str
    d_ff: int

    def describe(self, n_kv: int | None) -> str:
        attn = self.attention.upper() + (f"({n_kv} KV heads)" if self.attention == "gqa" else "")
        return (f"{'SwiGLU' if self.mlp == 'swiglu' else 'GELU'} d_ff={self.d_ff:,}, {attn}, "
                f"{'with' if self.biases else 'no'} biases, {'RMSNorm' if self.norm == 'rmsnorm' else 'LayerNorm'}")


@dataclass
class ClaimModel:
    fields: dict[str, Any]
    groups: dict[str, tuple[str, int]]  # name -> (layer kind, count)

    @property
    def d(self) -> int:
        return self.fields["d_model"]

    def stated(self) -> Variant:
        f = self.fields
        mlp = f.get("mlp", "gelu")
        n_kv = f.get("n_kv_heads", f["n_heads"])
        attention = f.get("attention", "mha" if n_kv == f["n_heads"] else "mqa" if n_kv == 1 else "gqa")
        return Variant(mlp, attention, bool(f.get("biases", False)), f.get("norm", "rmsnorm"),
                       int(f.get("d_ff", 4 * self.d)))

    def variants(self) -> list[Variant]:
        f = self.fields
        attns = ["mha", "mqa"] + (["gqa"] if f.get("n_kv_heads", f["n_heads"]) not in (f["n_heads"], 1) else [])
        out = []
        for mlp, attn, bias, norm in itertools.product(("swiglu", "gelu"), attns, (False, True),
                                                       ("rmsnorm", "layernorm")):
            d_ffs = [int(f["d_ff"])] if "d_ff" in f else [4 * self.d] + ([8 * self.d // 3] if mlp == "swiglu" else [])
            out += [Variant(mlp, attn, bias, norm, d_ff) for d_ff in d_ffs]
        return out

    def config(self, v: Variant, n_layers: int = 1, stack: str = "decoder", **extra: Any) -> ModelConfig:
        f = self.fields
        n_kv = {"mha": f["n_heads"], "mqa": 1, "gqa": f.get("n_kv_heads", f["n_heads"])}[v.attention]
        return ModelConfig(
            vocab_size=int(f.get("vocab_size", 1)), d_model=self.d, n_layers=n_layers, n_heads=f["n_heads"],
            n_kv_heads=n_kv, head_dim=f.get("head_dim"), d_ff=v.d_ff, mlp=v.mlp, norm=v.norm,
            attn_bias=v.biases, attn_out_bias=v.biases, mlp_bias=v.biases,
            tie_embeddings=bool(f.get("tie_embeddings", True)), max_seq_len=int(f.get("max_seq_len", 2048)),
            stack=stack, n_encoder_layers=1 if stack == "encoder-decoder" else 0, pos_embedding="none",
            name="claims", **extra,
        )

    def parts(self, v: Variant) -> tuple[int, int, int]:
        """(attention projections, MLP, one norm) of one layer under variant ``v``."""
        comps = account(self.config(v)).components()
        attn = sum(n for k, n in comps.items() if k.startswith("attn."))
        mlp = sum(n for k, n in comps.items() if k.startswith("mlp"))
        return attn, mlp, comps["norms"] // 2

    def layer_params(self, kind: str, v: Variant) -> int:
        if kind == "decoder_cross":
            acc = account(self.config(v, stack="encoder-decoder"))
            return acc.layers[-1].params
        attn, mlp, norm = self.parts(v)
        return {"decoder": attn + mlp + 2 * norm, "encoder": attn + mlp + 2 * norm, "cross_attention": attn + norm,
                "attention": attn + norm, "mlp": mlp + norm}[kind]

    def total(self, v: Variant) -> int:
        total = sum(count * self.layer_params(kind, v) for kind, count in self.groups.values())
        if "vocab_size" in self.fields:
            emb = self.fields["vocab_size"] * self.d
            total += emb * (1 if self.fields.get("tie_embeddings", True) else 2)
            total += self.d * (2 if v.norm == "layernorm" else 1)  # final norm
        return total

    def quantity(self, ref: str, v: Variant) -> int:
        """``total``, ``embedding``, ``layer NAME`` (one layer of group NAME) or ``layers NAME`` (the group)."""
        words = ref.split()
        if words == ["total"]:
            return self.total(v)
        if words == ["embedding"]:
            if "vocab_size" not in self.fields:
                raise ValueError("'embedding' needs model.vocab_size")
            return self.fields["vocab_size"] * self.d
        if len(words) == 2 and words[0] in ("layer", "layers") and words[1] in self.groups:
            kind, count = self.groups[words[1]]
            return self.layer_params(kind, v) * (count if words[0] == "layers" else 1)
        if len(words) == 2 and words[0] in ("attention", "mlp") and words[1] in self.groups:
            attn, mlp, _ = self.parts(v)  # the projections of one layer of the group, without its norm
            return attn if words[0] == "attention" else mlp
        raise ValueError(f"unknown count {ref!r}: use total, embedding, 'layer NAME', 'layers NAME', 'attention NAME' "
                         f"or 'mlp NAME' with NAME one of {sorted(self.groups)}")

    def full_config(self, **change: Any) -> ModelConfig:
        """The whole model as one decoder-only ModelConfig (for effect claims)."""
        kinds = {k for k, _ in self.groups.values()}
        if kinds != {"decoder"} or "vocab_size" not in self.fields:
            raise ValueError("effect claims need a decoder-only model (every layer group of kind decoder) and "
                             "model.vocab_size")
        n = sum(c for _, c in self.groups.values())
        cfg = self.config(self.stated(), n_layers=n)
        return ModelConfig.from_dict({**cfg.to_dict(), **change}) if change else cfg


# ----------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    line: int
    says: str
    holds: bool
    corrected: str  # the right figure ("" when it holds)
    reason: str


@dataclass
class AuditResult:
    path: str
    source: str
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if not v.holds]

    def render(self) -> str:
        out = [f"audit of {self.path}" + (f" — {self.source}" if self.source else ""), ""]
        for v in self.verdicts:
            mark = "holds" if v.holds else "FAILS"
            out.append(f"[{mark}] line {v.line}: {v.says}")
            if v.corrected:
                out.append(f"        corrected: {v.corrected}")
            out.append(f"        {v.reason}")
        n = len(self.verdicts)
        out += ["", f"{n - len(self.failed)} of {n} claims hold, {len(self.failed)} fail"]
        return "\n".join(out)


def _linear_hint(claimed: Fraction, d: int) -> str:
    if claimed and claimed.denominator == 1 and claimed.numerator % d == 0 and claimed < Fraction(d) ** 2:
        return (f"; the claimed figure is {claimed.numerator // d:,} × d_model, linear in d_model, but one "
                f"d_model × d_model projection alone has {d * d:,} weights")
    return ""


class Auditor:
    def __init__(self, path: str, data: dict[str, Any]):
        self.where = _Where(path)
        self.path = path
        self.data = data
        self.model = self._model()
        self.stated: dict[str, Fraction] = {}  # claim id -> the article's figure
        self.actual: dict[str, Fraction] = {}  # claim id -> cairn's figure
        self.result = AuditResult(path, str(data.get("source", "")))

    def _model(self) -> ClaimModel:
        m = self.data.get("model")
        line = self.data.get("__line__")
        if not isinstance(m, dict):
            raise self.where.error(line, "missing 'model:' (the article's dimensions: d_model, n_heads, …)")
        unknown = sorted(set(m) - MODEL_FIELDS - {"__line__"})
        if unknown:
            raise self.where.error(m["__line__"], f"unknown model field(s) {unknown}: use {sorted(MODEL_FIELDS)}")
        for key in ("d_model", "n_heads"):
            if key not in m:
                raise self.where.error(m["__line__"], f"model: missing field {key!r}")
        for key in ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
            if key in m:
                try:
                    value = parse_number(m[key])
                except ValueError:
                    value = Fraction(-1)
                if value.denominator != 1 or value <= 0:
                    raise self.where.error(m["__line__"], f"model.{key} must be a positive integer, got {m[key]!r}")
                m[key] = int(value)
        groups_raw = self.data.get("layers")
        if not isinstance(groups_raw, dict) or not groups_raw:
            raise self.where.error(line, "missing 'layers:' (named layer groups, e.g. decoder: {kind: decoder, "
                                         "count: 48})")
        groups = {}
        for name, g in groups_raw.items():
            if name == "__line__":
                continue
            if not isinstance(g, dict) or g.get("kind") not in LAYER_KINDS or not isinstance(g.get("count"), int) or (
                g["count"] <= 0
            ):
                gl = g.get("__line__") if isinstance(g, dict) else groups_raw["__line__"]
                raise self.where.error(gl, f"layer group {name!r} needs kind (one of {', '.join(LAYER_KINDS)}) and a "
                                           "positive integer count")
            groups[name] = (g["kind"], g["count"])
        model = ClaimModel({k: v for k, v in m.items() if k != "__line__"}, groups)
        try:
            model.config(model.stated())
        except CairnError as e:
            raise self.where.error(m["__line__"], str(e)) from None
        return model

    def run(self) -> AuditResult:
        claims = self.data.get("claims")
        if not isinstance(claims, list) or not claims:
            raise self.where.error(self.data.get("__line__"), "missing 'claims:' (a list of claims)")
        for c in claims:
            if not isinstance(c, dict):
                raise self.where.error(None, f"each claim is a mapping with 'says:' and one of count/check/effect, "
                                             f"got {c!r}")
            line = c["__line__"]
            kinds = [k for k in ("count", "check", "effect") if k in c]
            if len(kinds) != 1:
                raise self.where.error(line, "a claim needs exactly one of 'count:', 'check:' or 'effect:'")
            try:
                verdict = getattr(self, f"_{kinds[0]}")(c)
            except (ValueError, ZeroDivisionError, TypeError, KeyError) as e:
                raise self.where.error(line, str(e)) from None
            except CairnError as e:
                raise self.where.error(line, str(e)) from None
            self.result.verdicts.append(verdict)
        self._consistency()
        return self.result

    # ----------------------------------------------------------------- count claims
    def _count(self, c: dict[str, Any]) -> Verdict:
        if "value" not in c:
            raise ValueError("a count claim needs 'value:' (the article's figure)")
        target = parse_target(c["value"], parse_number(c.get("tolerance", APPROX)))
        ref = str(c["count"])
        model = self._given(c.get("given"))
        stated = model.stated()
        n_kv = model.fields.get("n_kv_heads")
        actual = model.quantity(ref, stated)
        if "id" in c:
            self.stated[str(c["id"])] = target.value
            self.actual[str(c["id"])] = Fraction(actual)
        says = str(c.get("says", f"{ref} = {target.text}"))
        kind_text = self._kind_text(ref)
        if target.holds(Fraction(actual)):
            return Verdict(c["__line__"], says, True, "", f"{ref}{kind_text} under {stated.describe(n_kv)}: "
                                                           f"{fmt(actual)}")
        ranked = sorted(model.variants(), key=lambda v: abs(model.quantity(ref, v) - target.value))
        best = ranked[0]
        best_n = model.quantity(ref, best)
        matched = " (matches)" if target.holds(Fraction(best_n)) else ""
        ratio = target.value / actual if actual else Fraction(0)
        closest = "" if best_n == actual else (
            f"; closest variant: {best.describe(n_kv)} = {fmt(best_n)}{matched}")
        reason = (f"{ref}{kind_text} under {stated.describe(n_kv)} is {fmt(actual)}; the claim is "
                  f"{float(ratio):.3g}x that{closest}{_linear_hint(target.value, model.d)}")
        return Verdict(c["__line__"], says, False, fmt(actual), reason)

    def _given(self, given: Any) -> ClaimModel:
        """The claims model with some dimensions replaced (``given: {d_model: …, layers: {GROUP: count}}``)."""
        if given is None:
            return self.model
        if not isinstance(given, dict):
            raise ValueError("given: needs a mapping of model fields (and layers: {GROUP: count})")
        fields = {k: v for k, v in given.items() if k not in ("__line__", "layers")}
        unknown = sorted(set(fields) - MODEL_FIELDS)
        if unknown:
            raise ValueError(f"given: unknown model field(s) {unknown}")
        groups = dict(self.model.groups)
        for name, count in (given.get("layers") or {}).items():
            if name == "__line__":
                continue
            if name not in groups or not isinstance(count, int) or count <= 0:
                raise ValueError(f"given.layers: {name!r} must be one of {sorted(groups)} with a positive count")
            groups[name] = (groups[name][0], count)
        model = ClaimModel({**self.model.fields, **{k: int(parse_number(v)) if k in (
            "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size") else v for k, v in fields.items()}},
            groups)
        model.config(model.stated())  # validates
        return model

    def _kind_text(self, ref: str) -> str:
        words = ref.split()
        if len(words) == 2 and words[1] in self.model.groups:
            kind, count = self.model.groups[words[1]]
            return f" ({kind}{f' x {count}' if words[0] == 'layers' else ''})"
        if words == ["total"] and "vocab_size" not in self.model.fields:
            return " (the layers only: no vocab_size, so no embeddings)"
        return ""

    # ----------------------------------------------------------------- check claims
    def _check(self, c: dict[str, Any]) -> Verdict:
        expr = str(c["check"])
        says = str(c.get("says", expr))
        tol = parse_number(c.get("tolerance", APPROX))
        left, rel, right = split_relation(expr)
        holds, lv, rv = self._relation(left, rel, right, self.stated, tol)
        used = {n.id for n in ast.walk(ast.parse(f"({left}, {right})", mode="eval")) if isinstance(n, ast.Name)}
        wrong = sorted(n for n in used if self.stated.get(n) != self.actual.get(n))
        if holds and not wrong:
            return Verdict(c["__line__"], says, True, "", f"{left} = {fmt(lv)}" + (
                f", {right} = {fmt(rv)}" if rel != "=" else ""))
        if not holds:
            corrected = f"{left} = {fmt(lv)}" if rel == "=" else f"{left} = {fmt(lv)}, {right} = {fmt(rv)}"
            reason = f"{left} is {fmt(lv)}, not {rel} {fmt(rv)}"
            if rel == "=" and rv:
                reason += f" (off by {fmt(rv - lv)}, {float((rv - lv) / rv):+.3%})"
            return Verdict(c["__line__"], says, False, corrected, reason)
        # holds with the article's figures: does it still hold with the corrected ones?
        still, lv2, rv2 = self._relation(left, rel, right, {**self.stated, **self.actual}, tol)
        reason = (f"true of the article's figures ({left} = {fmt(lv)}), but with the corrected {', '.join(wrong)}: "
                  f"{left} = {fmt(lv2)}" + (f", {right} = {fmt(rv2)}" if rel != "=" else ""))
        return Verdict(c["__line__"], says, still, "" if still else f"{left} = {fmt(lv2)}", reason)

    @staticmethod
    def _relation(left: str, rel: str, right: str, names: dict[str, Fraction],
                  tol: Fraction) -> tuple[bool, Fraction, Fraction]:
        lv, rv = evaluate(left, names), evaluate(right, names)
        ok = {"=": lv == rv, "≈": abs(lv - rv) <= tol * abs(rv), "<": lv < rv, ">": lv > rv, "<=": lv <= rv,
              ">=": lv >= rv}[rel]
        return ok, lv, rv

    # ---------------------------------------------------------------- effect claims
    def _effect(self, c: dict[str, Any]) -> Verdict:
        e = c["effect"]
        if not isinstance(e, dict):
            raise ValueError("effect: needs a mapping with quantity, change and/or contexts, and expect")
        q = e.get("quantity")
        if q not in QUANTITIES:
            raise ValueError(f"effect.quantity must be one of {', '.join(QUANTITIES)}, got {q!r}")
        change = {k: v for k, v in (e.get("change") or {}).items() if k != "__line__"}
        contexts = e.get("contexts") or [e.get("context", 4096)] * 2
        if len(contexts) != 2:
            raise ValueError("effect.contexts needs two context lengths [before, after]")
        dtypes = e.get("dtypes") or [e.get("dtype", "bf16")] * 2
        if len(dtypes) != 2:
            raise ValueError("effect.dtypes needs two dtypes [before, after]")
        group = int(parse_number(e.get("group_size", 128)))
        base = self.model.full_config(**{k: v for k, v in (e.get("given") or {}).items() if k != "__line__"})
        after = ModelConfig.from_dict({**base.to_dict(), **change}) if change else base
        before_v = self._measure(base, q, int(parse_number(contexts[0])), dtypes[0], group)
        after_v = self._measure(after, q, int(parse_number(contexts[1])), dtypes[1], group)
        says = str(c.get("says", f"{q}: {e.get('expect')}"))
        diff, ratio = after_v - before_v, Fraction(after_v, before_v) if before_v else Fraction(0)
        what = (f"{q}: {fmt(before_v)} → {fmt(after_v)} (x{float(ratio):.4g}, {'+' if diff >= 0 else ''}{fmt(diff)})")
        checks = []
        expect = e.get("expect")
        if expect is not None:
            if expect not in ("increases", "decreases", "unchanged"):
                raise ValueError("effect.expect must be increases, decreases or unchanged")
            got = "increases" if diff > 0 else "decreases" if diff < 0 else "unchanged"
            checks.append((got == expect, f"it {'is ' if got == 'unchanged' else ''}{got}, not {expect}"))
        if "by" in e:
            t = parse_target(e["by"])
            checks.append((t.holds(Fraction(abs(diff))), f"the change is {fmt(abs(diff))}, claimed {t.text}"))
        if "ratio" in e:
            t = parse_target(e["ratio"])
            checks.append((t.holds(ratio), f"the ratio is {float(ratio):.4g}, claimed {t.text}"))
        if not checks:
            raise ValueError("effect: needs at least one of expect, by, ratio")
        holds = all(ok for ok, _ in checks)
        return Verdict(c["__line__"], says, holds, "" if holds else what, ("" if holds else "; ".join(
            m for ok, m in checks if not ok) + " — ") + what)

    @staticmethod
    def _measure(cfg: ModelConfig, q: str, context: int, dtype: str, group_size: int) -> int:
        acc = account(cfg)
        if q == "attention_flops_per_token":
            return acc.attention_flops_per_token(context)
        if q == "kv_bytes":
            return acc.kv_bytes(context, dtype=dtype)
        if q == "kv_bytes_per_token":
            return acc.kv_bytes_per_token(dtype)
        if q == "weight_bytes":
            return acc.weight_bytes(dtype, group_size)
        return getattr(acc, q)

    # ------------------------------------------------------------------ consistency
    def _consistency(self) -> None:
        """Claims that contradict each other: 'layers G' vs count × 'layer G', and 'total' vs its parts."""
        by_ref: dict[str, tuple[str, int]] = {}
        for c in self.data["claims"]:
            if "count" in c and "id" in c:
                by_ref[str(c["count"])] = (str(c["id"]), c["__line__"])
        for name, (_, count) in self.model.groups.items():
            one, all_ = by_ref.get(f"layer {name}"), by_ref.get(f"layers {name}")
            if one and all_:
                a, b = self.stated[one[0]], self.stated[all_[0]]
                ok = a * count == b
                self.result.verdicts.append(Verdict(
                    all_[1], f"consistency: {count} x {one[0]} = {all_[0]}", ok, "" if ok else fmt(a * count),
                    f"{count} x {fmt(a)} = {fmt(a * count)}; the article says {fmt(b)}"))
        parts = [by_ref.get(f"layers {n}") for n in self.model.groups]
        total = by_ref.get("total")
        if total and all(parts) and "vocab_size" not in self.model.fields:
            s = sum(self.stated[p[0]] for p in parts)
            t = self.stated[total[0]]
            ok = s == t
            self.result.verdicts.append(Verdict(
                total[1], f"consistency: {' + '.join(p[0] for p in parts)} = {total[0]}", ok, "" if ok else fmt(s),
                f"the article's group totals add up to {fmt(s)}; it states {fmt(t)}"))


def audit_file(path: str) -> AuditResult:
    p = Path(path)
    if not p.is_file():
        raise CairnError(f"{path}: no such claims file (see examples/claims/ for the format)")
    try:
        data = yaml.load(p.read_text(), Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        raise CairnError(f"{path}:{mark.line + 1 if mark else '?'}: malformed YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise CairnError(f"{path}: malformed YAML ({e})") from None
    if not isinstance(data, dict):
        raise CairnError(f"{path}:1: a claims file is a mapping with model:, layers: and claims:")
    return Auditor(path, data).run()
