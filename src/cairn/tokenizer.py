"""Tokenizers (HF ``tokenizers``) and chat templates (jinja2, the HF convention).

A ``Tokenizer`` is built from an HF ``tokenizer.json`` (+ ``tokenizer_config.json`` for the chat template) or
from GGUF metadata (byte-level BPE: vocabulary, merges, pre-tokenizer). It also knows the raw bytes of every
token, which is what lets streamed text be cut only at UTF-8 character boundaries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from cairn.errors import CairnError

# Pre-tokenizer regexes of the GGUF "tokenizer.ggml.pre" names cairn knows (as llama.cpp defines them).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        regex = _LLAMA3_RE
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        regex = _QWEN2_RE
    elif pre in ("default", "gpt-2", "gpt2", "olmo", "jais"):
        regex = _GPT2_RE
    else:
        raise CairnError(
            f"unsupported GGUF pre-tokenizer {pre!r}: cairn knows smollm, llama-bpe, qwen2 and gpt-2; "
            "use the model's HF directory (with tokenizer.json) instead"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object, or a ``CairnError`` naming it."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CairnError(f"{path}: not valid JSON ({e}): restore the file from the model's source") from None
    if not isinstance(doc, dict):
        raise CairnError(f"{path}: must hold a JSON object, not {type(doc).__name__}")
    return doc


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        extra_eos: list[str] | None = None,
    ):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.add_bos = add_bos and self.bos_id is not None
        eos = {i for i in [self.eos_id] + [tok.token_to_id(t) for t in (extra_eos or [])] if i is not None}
        self.eos_ids: set[int] = eos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._template = None
        self.token_bytes = self._token_bytes()

    # ------------------------------------------------------------------ encode
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        try:
            if len(text) < 4096:
                ids = self.tok.encode(text, add_special_tokens=False).ids
            else:  # the batch call releases the GIL while it works (encode holds it: 11 s for 16 MB of text)
                ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        except TypeError:  # tokenizers takes only text that is valid Unicode: no lone UTF-16 surrogates
            at = next((i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF), None)
            if at is None:
                raise
            raise CairnError(f"the text has a lone surrogate code point (U+{ord(text[at]):04X} at character {at}): "
                             "send valid Unicode (in JSON, a \\uD8xx escape must be followed by a \\uDCxx one)"
                             ) from None
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def _token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (special tokens: b"", they are never printed)."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        table = [b""] * (max(vocab.values()) + 1 if vocab else 0)
        byte_level = "ByteLevel" in repr(self.tok.decoder)  # the decoder's repr names its parts
        added = self.tok.get_added_tokens_decoder()
        if byte_level:
            inv = {c: b for b, c in _bytes_to_unicode().items()}
            for piece, i in vocab.items():
                if i in added:
                    table[i] = b"" if added[i].special else piece.encode()
                else:
                    try:
                        table[i] = bytes([inv[c] for c in piece])
                    except KeyError:  # not in the byte alphabet: take the text as it is
                        table[i] = piece.encode()
        else:  # SentencePiece-style: "▁" is a space, "<0xNN>" a raw byte
            for piece, i in vocab.items():
                if i in added and added[i].special:
                    continue
                if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                    table[i] = bytes([int(piece[3:5], 16)])
                else:
                    table[i] = piece.replace("▁", " ").encode()
        return table

    # ------------------------------------------------------------------- chat
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render messages with the model's own jinja2 chat template (as HF ``apply_chat_template`` does)."""
        if not self.chat_template:
            raise CairnError("this model has no chat template: generate without --chat, or use a chat model")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg: str) -> None:
                raise CairnError(f"chat template: {msg}")

            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise CairnError(f"the model's chat template does not parse: {e}") from None
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except CairnError:
            raise
        except Exception as e:  # the template is the model's data: its failures are the file's, not cairn's
            raise CairnError(f"the model's chat template failed on these messages ({type(e).__name__}: {e}): fix "
                             "the template (tokenizer_config.json or chat_template.jinja) or generate without "
                             "chat") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        ids = self.encode(text, add_bos=False)
        if self.add_bos and self.bos_token and not text.startswith(self.bos_token):
            ids = [self.bos_id] + ids
        return ids

    # ---------------------------------------------------------------- loaders
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise CairnError(f"{path}: no tokenizer.json (an HF model directory must contain one)")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise CairnError(f"{tj}: not a valid tokenizer.json ({e})") from None
        tc = path / "tokenizer_config.json"
        cfg = _json_object(tc) if tc.is_file() else {}
        template = cfg.get("chat_template")
        ct = path / "chat_template.jinja"
        if ct.is_file():
            try:
                template = ct.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CairnError(f"{ct}: not UTF-8 text ({e})") from None
        if isinstance(template, list):  # named templates: take the default one
            named = [t for t in template if isinstance(t, dict) and isinstance(t.get("template"), str)]
            if not named:
                raise CairnError(f"{tc}: chat_template is a list without {{'name': ..., 'template': '...'}} entries")
            template = next((t["template"] for t in named if t.get("name") == "default"), named[0]["template"])
        if template is not None and not isinstance(template, str):
            raise CairnError(f"{tc}: chat_template must be a string (a jinja template), not {type(template).__name__}")

        def tok_str(key: str) -> str | None:
            v = cfg.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if v is not None and not isinstance(v, str):
                raise CairnError(f"{tc}: {key} must be a token's text (or {{'content': text}}), not {v!r}")
            return v

        gen_eos: list[str] = []
        gc = path / "generation_config.json"
        if gc.is_file():
            eos = _json_object(gc).get("eos_token_id")
            for i in eos if isinstance(eos, list) else [eos] if eos is not None else []:
                if not isinstance(i, int) or isinstance(i, bool):
                    raise CairnError(f"{gc}: eos_token_id must be a token id or a list of them, not {eos!r}")
                t = tok.id_to_token(i) if 0 <= i < 2**32 else None
                if t:
                    gen_eos.append(t)
        add_bos = cfg.get("add_bos_token", False)
        if not isinstance(add_bos, bool) and add_bos is not None:
            raise CairnError(f"{tc}: add_bos_token must be true or false, not {add_bos!r}")
        return cls(
            tok,
            chat_template=template,
            bos_token=tok_str("bos_token"),
            eos_token=tok_str("eos_token"),
            add_bos=bool(add_bos),
            extra_eos=gen_eos,
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], source: str = "model.gguf") -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CairnError(
                f"{source}: GGUF tokenizer model {kind!r} is not supported (cairn reads byte-level BPE, 'gpt2'); "
                "use the model's HF directory with tokenizer.json instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _byte_level_pre(meta.get("tokenizer.ggml.pre", "default"))
        tok.decoder = decoders.ByteLevel()
        # Control (3) and user-defined (4) tokens are matched whole in text, as llama.cpp does.
        added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False) for i in range(len(tokens))
                 if types[i] in (3, 4)]
        tok.add_special_tokens([a for a in added if a.special])
        tok.add_tokens([a for a in added if not a.special])

        def name(key: str) -> str | None:
            i = meta.get(key)
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        eot = [t for t in (name("tokenizer.ggml.eot_token_id"),) if t]
        return cls(
            tok,
            chat_template=meta.get("tokenizer.chat_template"),
            bos_token=name("tokenizer.ggml.bos_token_id"),
            eos_token=name("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            extra_eos=eot,
        )

    def save_hf(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) into ``path``."""
        from cairn.weights.native import atomic_write_text

        path = Path(path)
        atomic_write_text(path / "tokenizer.json", self.tok.to_str())
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            "model_max_length": 1 << 30,
        }
        atomic_write_text(path / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False))
