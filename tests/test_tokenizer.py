"""Our tokenizers against transformers' own, loaded from the same files.

The reference is `AutoTokenizer.from_pretrained(dir, gguf_file=...)`, built once per session by
the shared `real_models` fixture (about 15 s for Gemma's 262k vocabulary).
"""

import dataclasses
import functools
import json
import pathlib
import random
import re

import gguf
import jinja2
import pytest
from sentencepiece import sentencepiece_model_pb2

from opd_jax import tokenizer

MODELS = ("smollm2-135m-instruct", "gemma3-270m")

HAND_WRITTEN = [
    "",
    "Hello world",
    "Hello, world!",
    " Hello",
    "Hello ",
    "  two leading spaces",
    "two trailing spaces  ",
    "   ",
    " ",
    "a b  c   d    e",
    "tab\tseparated\tvalues",
    "\tleading tab",
    "line one\nline two",
    "para one\n\npara two\n\n\n",
    "\r\nwindows\r\nnewlines\r\n",
    "mixed \t\n \t whitespace",
    "0",
    "42",
    "3.14159",
    "1,234,567.89",
    "-17 +23 1e-9 0x1F 0b1010",
    "12345678901234567890",
    "in 2024 we had 365 days",
    "café résumé naïve façade",
    "Ünïcödé Ça ß Øre Æsir",
    "中文分词测试",
    "日本語のテキストです。",
    "한국어 문장입니다",
    "Привет, мир!",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Γειά σου Κόσμε",
    "emoji 😀🚀👍🏽 and 👨‍👩‍👧 family",
    "🙂",
    "mixed: abc中文😀123 déjà",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    'print("Hello, {name}!".format(name="you"))',
    "<html><body><b>bold</b></body></html>",
    "SELECT * FROM users WHERE id = 1;",
    "x = {'a': [1, 2, 3], \"b\": None}",
    "https://example.com/path?query=1&b=2#frag",
    "user@example.com",
    "I'm you're we've they'll it's he'd",
    "I'LL SHOUT IT'S",
    "CamelCaseIdentifier snake_case_identifier",
    "...!!!???",
    "— – - ‐ … « » “ ” ‘ ’",
    "\u00a0non-breaking\u00a0space",
    "ideographic\u3000space",
    "zero\u200bwidth",
    "<|im_start|>user\nhi<|im_end|>",
    "<bos>text<eos>",
    "<start_of_turn>model\nhello<end_of_turn>",
    "<unk> literal",
    "[multimodal]",
    "a" * 50,
    "ab" * 40,
    "The quick brown fox jumps over the lazy dog. " * 3,
]

CHARACTERS = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \n\t  \r.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`")
    + list("éèàüöñçßøåÉ中文日本語한국어مرحبانमस्तेпривет")
    + ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "\u00a0", "\u3000", "\n\n", "  ", "<b>", "<unk>", "<bos>"]
)


def _random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(CHARACTERS, k=rng.randint(1, 30))) for _ in range(count)]


def _whitespace_runs() -> list[str]:
    """Long runs: Gemma's vocabulary has pieces for up to 31 spaces, tabs and newlines."""
    lengths = (1, 2, 3, 7, 16, 31, 32, 33, 40, 64)
    return [f"a{ch * n}b" for ch in (" ", "\t", "\n") for n in lengths]


TEXTS = HAND_WRITTEN + _random_strings(200) + _whitespace_runs()

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  And 3+3?  "},
    ],
    [
        {"role": "user", "content": "Translate: <b>café</b> 中文 😀"},
        {"role": "assistant", "content": "Done.\n\nAnything else?"},
    ],
]

# Gemma 3's chat template as its tokenizer_config.json ships it; the GGUF carries none.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{ message['content'] | trim }}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


@functools.cache
def _ours(path: pathlib.Path) -> tokenizer.Tokenizer:
    return tokenizer.from_gguf(path)


@pytest.fixture(scope="module", params=MODELS)
def pair(request, real_models) -> tuple[tokenizer.Tokenizer, object]:
    """(ours, transformers') for one packaged checkpoint."""
    name = request.param
    return _ours(real_models.path(name)), real_models.reference_tokenizer(name)


def _mismatches(ours: tokenizer.Tokenizer, ref, texts: list[str]) -> list[tuple]:
    pairs = ((t, ours.encode(t), ref.encode(t, add_special_tokens=False)) for t in texts)
    return [(t, a, b) for t, a, b in pairs if a != b]


# --------------------------------------------------------------------------- ids


def test_corpus_covers_the_cases():
    assert len(TEXTS) >= 200
    assert any(" " * 40 in t for t in TEXTS) and any("\t" in t for t in TEXTS)
    assert any("😀" in t for t in TEXTS) and any("中" in t for t in TEXTS)


def test_ids_match_reference(pair):
    ours, ref = pair
    assert _mismatches(ours, ref, TEXTS) == []


def test_ids_with_bos_match_reference(pair):
    """The reference adds BOS where the checkpoint asks for it; `add_bos_token` says so too."""
    ours, ref = pair
    assert ours.add_bos_token == (ref.encode("")[:1] == [ref.bos_token_id])
    wrong = [t for t in TEXTS if ours.encode(t, add_bos=ours.add_bos_token) != ref.encode(t)]
    assert wrong == []


def test_special_ids_match_reference(pair):
    ours, ref = pair
    got = (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size)
    assert got == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert set(ref.all_special_ids) <= ours.special_ids


def test_add_bos_prepends_bos(pair):
    ours, _ = pair
    assert ours.encode("Hi", add_bos=True) == [ours.bos_id, *ours.encode("Hi")]


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches_reference(pair, skip_special_tokens):
    ours, ref = pair
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>", "<bos><start_of_turn>user\nhi"]
    wrong = []
    for text in texts:
        ids = ref.encode(text)
        expected = ref.decode(ids, skip_special_tokens=skip_special_tokens)
        if ours.decode(ids, skip_special_tokens=skip_special_tokens) != expected:
            wrong.append(text)
    assert wrong == []


def test_decode_round_trip(pair):
    ours, _ = pair
    wrong = [t for t in TEXTS if ours.decode(ours.encode(t), skip_special_tokens=False) != t]
    assert wrong == []


def test_decode_skips_special_tokens(pair):
    ours, _ = pair
    ids = [ours.bos_id, *ours.encode("plain text"), ours.eos_id]
    assert ours.decode(ids) == "plain text"
    assert ours.decode(ids, skip_special_tokens=False) == (
        f"{ours.bos_token}plain text{ours.eos_token}"
    )


# --------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "unicode"])
def test_smollm_chat_template_matches_reference(real_models, conversation, add_generation_prompt):
    name = "smollm2-135m-instruct"
    ours = _ours(real_models.path(name))
    ref = real_models.reference_tokenizer(name)
    kwargs = {"add_generation_prompt": add_generation_prompt}
    expected = ref.apply_chat_template(conversation, tokenize=False, **kwargs)
    assert ours.apply_chat_template(conversation, **kwargs) == expected
    assert ours.encode_chat(conversation, **kwargs) == ref.encode(
        expected, add_special_tokens=False
    )


def test_gemma_has_no_chat_template_like_reference(real_models):
    name = "gemma3-270m"
    ours = _ours(real_models.path(name))
    ref = real_models.reference_tokenizer(name)
    with pytest.raises(ValueError, match="chat_template"):
        ref.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "unicode"])
def test_supplied_gemma_chat_template_matches_reference(
    real_models, conversation, add_generation_prompt
):
    """A template using bos_token, trim and raise_exception renders as transformers does."""
    name = "gemma3-270m"
    ours = _ours(real_models.path(name))
    ours = dataclasses.replace(ours, chat_template=GEMMA3_CHAT_TEMPLATE)
    ref = real_models.reference_tokenizer(name)
    kwargs = {"add_generation_prompt": add_generation_prompt}
    expected = ref.apply_chat_template(
        conversation, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False, **kwargs
    )
    assert expected.startswith("<bos><start_of_turn>user\n")
    assert ours.apply_chat_template(conversation, **kwargs) == expected
    ids = ours.encode_chat(conversation, **kwargs)
    assert ids == ref.encode(expected, add_special_tokens=False)
    assert ids[:2] == [ours.bos_id, ours.encode("<start_of_turn>")[0]]


# Leans on what transformers' environment sets: blocks trimmed and stripped, `tojson` that
# keeps non-ASCII and "<" as they are, and the `break` loop control.
LAYOUT_TEMPLATE = """{% for message in messages %}
    {% if loop.index > 3 %}
        {% break %}
    {% endif %}
    {% if message['role'] == 'system' %}
<<SYS>>{{ message['content'] }}<</SYS>>
    {% else %}
{{ message['role'] }}: {{ message['content'] | tojson }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
assistant:
{% endif %}
{{ eos_token }}"""


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "unicode"])
def test_template_environment_matches_reference(real_models, conversation):
    name = "smollm2-135m-instruct"
    ours = dataclasses.replace(_ours(real_models.path(name)), chat_template=LAYOUT_TEMPLATE)
    ref = real_models.reference_tokenizer(name)
    expected = ref.apply_chat_template(
        conversation, chat_template=LAYOUT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert expected.endswith("assistant:\n<|im_end|>")
    assert ours.apply_chat_template(conversation, add_generation_prompt=True) == expected


def test_template_raise_exception_surfaces(real_models):
    ours = _ours(real_models.path("gemma3-270m"))
    ours = dataclasses.replace(ours, chat_template=GEMMA3_CHAT_TEMPLATE)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "first"}])


# --------------------------------------------------------------------------- other sources


def test_hf_dir_with_tokenizer_json_matches_reference(pair, tmp_path):
    """The reference saved as tokenizer.json + tokenizer_config.json loads back identically."""
    ours_gguf, ref = pair
    ref.save_pretrained(tmp_path)
    ours = tokenizer.from_hf_dir(tmp_path)
    assert isinstance(ours.backend, tokenizer.HFTokenizersBackend)
    assert _mismatches(ours, ref, TEXTS) == []
    same = ("bos_id", "eos_id", "pad_id", "add_bos_token", "chat_template", "vocab_size")
    assert {k: getattr(ours, k) for k in same} == {k: getattr(ours_gguf, k) for k in same}


def test_hf_dir_with_sentencepiece_model_matches_reference(real_models, tmp_path):
    """Gemma's rebuilt vocabulary, written as tokenizer.model with its control pieces."""
    name = "gemma3-270m"
    ours_gguf = _ours(real_models.path(name))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(ours_gguf.backend.processor.serialized_model_proto())
    for i in ours_gguf.special_ids - {ours_gguf.backend.processor.unk_id()}:
        proto.pieces[i].type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    ours = tokenizer.from_hf_dir(tmp_path)
    assert isinstance(ours.backend, tokenizer.SentencePieceBackend)
    assert _mismatches(ours, real_models.reference_tokenizer(name), TEXTS) == []
    assert ours.special_ids == ours_gguf.special_ids
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos_token) == (2, 1, 0, True)


def test_load_dispatches_on_preset_file_and_directory(real_models, tmp_path):
    name = "smollm2-135m-instruct"
    path = real_models.path(name)
    real_models.reference_tokenizer(name).save_pretrained(tmp_path)
    text = "Dispatch 123 ✓"
    expected = tokenizer.from_gguf(path).encode(text)
    assert [tokenizer.load(s).encode(text) for s in (name, path, str(path), tmp_path)] == [
        expected
    ] * 4


def _write_gguf(path: pathlib.Path, fields: dict) -> pathlib.Path:
    """A GGUF file with these metadata fields and no tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_fields(pre: str, tokens, types, merges) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_byte_level_pre_tokenizer_splits_match_reference(real_models, tmp_path, pre):
    """Llama 3 and Qwen2 files split text their own way; here on a cut of SmolLM's vocabulary."""
    import transformers

    ours_smollm = _ours(real_models.path("smollm2-135m-instruct"))
    tokens = [ours_smollm.backend.token(i) for i in range(3000)]
    types = [3 if i in ours_smollm.special_ids else 1 for i in range(3000)]
    kept = set(tokens)
    bpe = json.loads(ours_smollm.backend.tokenizer.to_str())["model"]
    merges = [" ".join(m) for m in bpe["merges"] if "".join(m) in kept]
    path = _write_gguf(tmp_path / f"{pre}.gguf", _byte_level_fields(pre, tokens, types, merges))
    gpt2_fields = _byte_level_fields("gpt2", tokens, types, merges)
    gpt2 = tokenizer.from_gguf(_write_gguf(tmp_path / "gpt2.gguf", gpt2_fields))
    ours = tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert _mismatches(ours, ref, TEXTS) == []
    assert ours.encode(".\n\nfoo") != gpt2.encode(".\n\nfoo")


# --------------------------------------------------------------------------- writing


@pytest.fixture(scope="module", params=MODELS)
def saved(request, real_models, tmp_path_factory) -> tuple[tokenizer.Tokenizer, pathlib.Path]:
    """(ours, the directory `save_hf` wrote); Gemma's GGUF has no template, so it gets the
    one its tokenizer_config.json ships, which must survive the round trip too."""
    ours = _ours(real_models.path(request.param))
    if ours.chat_template is None:
        ours = dataclasses.replace(ours, chat_template=GEMMA3_CHAT_TEMPLATE)
    return ours, ours.save_hf(tmp_path_factory.mktemp(request.param))


def test_saved_tokenizer_gives_our_ids_in_transformers(saved):
    import transformers

    ours, directory = saved
    ref = transformers.AutoTokenizer.from_pretrained(directory)
    add_bos = ours.add_bos_token
    assert [t for t in TEXTS if ref(t).input_ids != ours.encode(t, add_bos=add_bos)] == []
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (
        ours.bos_id,
        ours.eos_id,
        ours.pad_id,
    )
    decoded = {t: ours.encode(t) for t in TEXTS}
    assert [
        t
        for t, ids in decoded.items()
        if ref.decode(ids) != ours.decode(ids, skip_special_tokens=False)
    ] == []
    for conversation in CONVERSATIONS:
        rendered = ref.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert rendered == ours.apply_chat_template(conversation)


def test_saved_tokenizer_reloads_as_ours(saved):
    ours, directory = saved
    back = tokenizer.from_hf_dir(directory)
    same = ("bos_id", "eos_id", "pad_id", "special_ids", "add_bos_token", "chat_template")
    assert {k: getattr(back, k) for k in same} == {k: getattr(ours, k) for k in same}
    assert back.vocab_size == ours.vocab_size
    assert [t for t in TEXTS if back.encode(t) != ours.encode(t)] == []


def test_sentencepiece_with_dummy_prefix_is_not_written(real_models, tmp_path):
    """tokenizers puts the prefix before every stretch between special tokens (or skips it
    before a space); sentencepiece puts it once, so no tokenizer.json gives its ids."""
    gemma = _ours(real_models.path("gemma3-270m"))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(gemma.backend.processor.serialized_model_proto())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="dummy prefix"):
        tokenizer.from_hf_dir(tmp_path).save_hf(tmp_path / "out")
    assert not (tmp_path / "out" / "tokenizer.json").exists()


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("loader", [tokenizer.load, tokenizer.from_gguf, tokenizer.from_hf_dir])
def test_missing_path(tmp_path, loader):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(f"tokenizer not found: {missing}")):
        loader(missing)


def test_directory_without_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        tokenizer.load(tmp_path)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable GGUF file")):
        tokenizer.from_gguf(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable GGUF file")):
        tokenizer.from_gguf(path)


def test_truncated_gguf(real_models, tmp_path):
    """Cut inside the vocabulary: the metadata runs past the end of the file."""
    path = tmp_path / "truncated.gguf"
    with real_models.path("smollm2-135m-instruct").open("rb") as f:
        path.write_bytes(f.read(200_000))
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: not a readable GGUF file") + ".*past the end"
    ):
        tokenizer.from_gguf(path)


def test_gguf_without_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "weights_only.gguf", {"general.name": "no tokenizer"})
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: GGUF metadata has no field tokenizer.ggml.model")
    ):
        tokenizer.from_gguf(path)


def test_gguf_with_unsupported_tokenizer_model(tmp_path):
    fields = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[UNK]", "a"]}
    path = _write_gguf(tmp_path / "wordpiece.gguf", fields)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: unsupported tokenizer.ggml.model='bert'")
    ):
        tokenizer.from_gguf(path)


def test_gguf_without_merges(tmp_path):
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"]}
    path = _write_gguf(tmp_path / "no_merges.gguf", fields)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: GGUF metadata has no field tokenizer.ggml.merges")
    ):
        tokenizer.from_gguf(path)


def test_gguf_with_merges_outside_the_vocabulary(tmp_path):
    fields = _byte_level_fields("gpt2", ["a", "b"], [1, 1], ["a c"])
    path = _write_gguf(tmp_path / "bad_merges.gguf", fields)
    with pytest.raises(ValueError, match=re.escape(f"{path}: tokenizer.ggml.merges do not fit")):
        tokenizer.from_gguf(path)


def test_gguf_with_token_types_of_the_wrong_length(tmp_path):
    fields = _byte_level_fields("gpt2", ["a", "b"], [1], [])
    path = _write_gguf(tmp_path / "short_types.gguf", fields)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: tokenizer.ggml.token_type has 1 entries")
    ):
        tokenizer.from_gguf(path)


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        tokenizer.from_hf_dir(tmp_path)


def test_corrupt_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(ValueError, match="tokenizer.model: not a readable sentencepiece model"):
        tokenizer.from_hf_dir(tmp_path)


def test_encode_with_bos_needs_a_bos(tmp_path):
    config = {"eos_token": "b"}
    vocab = {"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 1, 1)
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("a", add_bos=True)
