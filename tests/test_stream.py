"""Streaming text: never split a UTF-8 character, never show or lose a stop string across token boundaries."""

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cairn.engine.sampling import make_generator, sample, sample_row
from cairn.engine.stream import StopMatcher, TextStream
from cairn.engine.types import SamplingParams


def chunks_of(data, cuts):
    cuts = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab€😀 \n", max_size=40), st.lists(st.text(alphabet="ab€😀", min_size=1, max_size=4),
       max_size=3), st.lists(st.integers(0, 200), max_size=10))
@example(text="aaba", stops=["b", "aba"], cuts=[]).via("regression: one chunk and token by token must agree")
@example(text="aaba", stops=["b", "aba"], cuts=[3])
def test_stop_matcher_cuts_at_first_completed_stop(text, stops, cuts):
    m = StopMatcher(stops)
    out, matched = "", None
    for piece in chunks_of(text, cuts):
        emitted, matched = m.push(piece)
        out += emitted
        if matched:
            break
    if matched is None:
        out += m.flush()
    # the stop that completes first (then: starts first) ends the text, as it would token by token
    hits = sorted((text.find(s) + len(s), text.find(s), s) for s in stops if s in text)
    if hits:
        end, start, _ = hits[0]
        assert out == text[:start] and matched in {s for e, i, s in hits if (e, i) == (end, start)}
    else:
        assert out == text and matched is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.lists(st.integers(0, 400), max_size=12))
def test_text_stream_never_splits_utf8(text, cuts):
    data = text.encode()
    pieces = chunks_of(data, cuts)
    table = pieces  # token i stands for pieces[i]
    s = TextStream(table)
    shown = []
    for i in range(len(pieces)):
        out, _ = s.push(i)
        assert "\ufffd" not in out
        shown.append(out)
    shown.append(s.finish())
    assert "".join(shown) == text


def test_stop_straddling_tokens_in_text_stream():
    table = [b"Hel", b"lo, wo", b"rld", b"!"]
    s = TextStream(table, stops=["o, w"])
    out1, m1 = s.push(0)
    out2, m2 = s.push(1)
    assert (out1, m1) == ("Hel", None) and (out2, m2) == ("l", "o, w")


def test_sampling_seed_is_reproducible_and_top_k_restricts():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=3, seed=11)
    a = [sample_row(logits, p, g)[0] for g in [make_generator(p)] for _ in range(20)]
    b = [sample_row(logits, p, g)[0] for g in [make_generator(p)] for _ in range(20)]
    assert a == b
    assert set(a) <= set(torch.topk(logits, 3).indices.tolist())


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    g = make_generator(p)
    seen = {sample_row(logits, p, g)[0] for _ in range(300)}
    assert seen == {0, 1}


def test_greedy_rows_batched():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    ps = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=True)]
    out = sample(logits, ps, [None, None])
    assert [t for t, _ in out] == [1, 0]
    assert abs(out[1][1] - torch.log_softmax(logits[1], -1)[0].item()) < 1e-6


def test_vanishing_temperature_is_greedy_not_nan():
    logits = torch.tensor([0.0, 5.0, 1.0, -3.0])
    for t in (1e-300, 1e-9, 0.0):
        p = SamplingParams(temperature=t, seed=0)
        assert sample_row(logits, p, make_generator(p))[0] == 1


def test_finish_drops_a_character_cut_in_half():
    """A cut by max_tokens after the first bytes of a character: the text ends at the last whole character."""
    table = [b"ok ", "🌟".encode()[:2], "🌟".encode()[2:]]
    s = TextStream(table)
    assert s.push(0) == ("ok ", None) and s.push(1) == ("", None)
    assert s.finish() == "" and s.text == "ok "
    s = TextStream(table, stops=["ok!"])  # held stop-prefix text is still released
    assert s.push(0)[0] == "ok " and s.push(1)[0] == "" and s.push(2)[0] == "🌟" and s.finish() == ""


def test_no_replacement_character_at_any_max_tokens_cut(default_engine):
    """The default model, greedy, on an emoji and a CJK prompt, cut by every max_tokens from 1 to 40: never a
    U+FFFD, and each text is the longest whole-character prefix of the cut's bytes."""
    from cairn.engine import Request

    tok = default_engine.tokenizer
    token_bytes = tok.token_bytes
    cut_inside = 0
    for prompt in ("Reply with ten star emojis and nothing else: 🌟🌟🌟", "用中文介绍一下北京的历史。"):
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        outs = default_engine.generate_many([Request(ids, SamplingParams(max_tokens=n, temperature=0))
                                             for n in range(1, 41)])
        for n, out in enumerate(outs, 1):
            assert "\ufffd" not in out.text, (prompt, n, out.text)
            assert out.text == outs[-1].text[: len(out.text)]
            if out.finish.reason == "max_tokens":
                raw = b"".join(token_bytes[t] for t in out.token_ids)
                whole = raw.decode("utf-8", errors="ignore")
                cut_inside += whole != raw.decode("utf-8", errors="replace")
                assert out.text == whole
    assert cut_inside > 0, "no cut fell inside a character: the test shows nothing"
