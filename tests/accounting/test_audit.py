"""`cairn audit`: the shipped seed claims, each claim kind, and malformed files named by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn.accounting.audit import audit_file, parse_number, parse_target
from cairn.errors import CairnError

CLAIMS = Path(__file__).parent.parent.parent / "examples" / "claims"


def _by_text(result, fragment: str):
    hits = [v for v in result.verdicts if fragment in v.says]
    assert len(hits) == 1, fragment
    return hits[0]


def test_numbers_and_targets() -> None:
    assert parse_number("3,145,728") == 3145728
    assert parse_number("175B") == 175 * 10**9
    assert parse_number("1.5e9") == 1_500_000_000
    t = parse_target("25B-35B")
    assert t.lo == 25 * 10**9 and t.hi == 35 * 10**9 and not t.exact
    t = parse_target("25-35B")
    assert t.lo == 25 * 10**9
    t = parse_target("≈200M")
    assert t.holds(201_326_592) and not t.holds(250_000_000)


def test_seed000_findings() -> None:
    r = audit_file(str(CLAIMS / "seed000.yaml"))
    bad_product = _by_text(r, "48 encoder layers * 3,145,728")
    assert not bad_product.holds and "150,994,944" in bad_product.corrected
    assert _by_text(r, "4 cross attention layers * 262,144").holds
    assert _by_text(r, "12 decoder layers * 786,432").holds
    # a layer of width 65,536 has billions of weights, not 48 x d_model
    layer = _by_text(r, "each encoder layer contains")
    assert not layer.holds and "48 × d_model" in layer.reason
    assert layer.corrected == f"{12 * 65536**2 + 2 * 65536:,}"  # 4d² attention + 8d² GELU MLP + 2 RMSNorms
    assert _by_text(r, "the three products add up").holds  # the sum of the (wrong) products is right
    gpt3 = _by_text(r, "over 1000 times more")
    assert not gpt3.holds and "true of the article's figures" in gpt3.reason
    consistency = _by_text(r, "consistency: 48 x encoder_layer")
    assert not consistency.holds and consistency.corrected == "150,994,944"
    assert r.failed


def test_seed001_findings() -> None:
    r = audit_file(str(CLAIMS / "seed001.yaml"))
    assert _by_text(r, "Transformer layers: 30-50 billion").holds
    assert not _by_text(r, "Embedding layers: 10-20 billion").holds
    assert not _by_text(r, "(high end)").holds  # 50 + 20 + 5 = 75, not 70
    assert not _by_text(r, "GPT-3 (175B params)").holds


def test_seed003_findings() -> None:
    r = audit_file(str(CLAIMS / "seed003.yaml"))
    block = _by_text(r, "one pre-norm block")
    assert block.holds
    total = _by_text(r, "total ≈ 25-35 B")
    assert not total.holds and total.corrected == "13,086,625,792"
    assert not _by_text(r, "Weight Sharing 2×").holds  # FLOPs per token do not change
    assert _by_text(r, "KV memory stays constant").holds
    assert not _by_text(r, "separated (untied), saving").holds
    ratio = _by_text(r, "leaves 0.75 P")
    assert not ratio.holds and "0.6308" in ratio.reason


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "claims.yaml"
    p.write_text(text)
    return str(p)


GOOD = """\
model: {d_model: 64, n_heads: 4, mlp: swiglu, d_ff: 256, vocab_size: 1000}
layers:
  blocks: {kind: decoder, count: 2}
claims:
  - id: block
    count: layer blocks
    value: 65,664
  - check: "2 * block = 131,328"
"""


def test_holding_claims(tmp_path: Path) -> None:
    r = audit_file(_write(tmp_path, GOOD))
    assert not r.failed and len(r.verdicts) == 2


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("model: {d_model: 64}\nlayers:\n  a: 1\n b: 2\n", ":4: malformed YAML"),
        (GOOD.replace("d_model: 64", "d_model: 0"), ":1: model.d_model must be a positive integer"),
        (GOOD.replace("count: 2}", "count: -2}"), ":3: layer group 'blocks' needs kind"),
        (GOOD.replace("    count: layer blocks\n", "    count: layer blocs\n"), ":5: unknown count 'layer blocs'"),
        (GOOD.replace('"2 * block', '"2 * blok'), ":8: unknown name 'blok'"),
        (GOOD.replace("    value: 65,664\n", ""), ":5: a count claim needs 'value:'"),
        (GOOD.replace("model:", "modle:"), ":1: missing 'model:'"),
    ],
)
def test_malformed_files_name_the_line(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(CairnError, match=where.replace("(", r"\(")):
        audit_file(_write(tmp_path, text))


def test_seed004_findings() -> None:
    r = audit_file(str(CLAIMS / "seed004.yaml"))
    llama = _by_text(r, "7-billion-parameter")
    assert not llama.holds and llama.corrected == "8,030,261,248"
    attn = _by_text(r, "3d² per head")
    assert not attn.holds and attn.corrected == f"{2 * 4096**2 + 2 * 4096 * 1024:,}"  # q, o: d²; k, v: d x 8·128
    assert _by_text(r, "group-128").holds  # 32 / 4.16 bits: 7.7-fold is "≈ 8"
    assert not _by_text(r, "group size 32").holds  # 6.9-fold
    gemma = _by_text(r, "Gemma 2B")
    assert not gemma.holds and gemma.corrected == "2,506,172,416"  # Gemma 2B's published count
