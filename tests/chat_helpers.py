"""Shared setup for the chat tests: one real Qwen3.5 tokenizer per test process.

Plain cached functions rather than fixtures, so that test modules of other
engineers' conftest.py never collide with these names.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path

from llm_flashmoe.chat import load_tokenizer, vocab


@lru_cache(maxsize=1)
def model_dir() -> Path:
    """A directory with tokenizer.json, tokenizer_config.json and our chat template."""
    directory = Path(tempfile.mkdtemp(prefix="flashmoe-chat-"))
    atexit.register(shutil.rmtree, directory, True)
    vocab.write_tokenizer_files(directory)
    return directory


@lru_cache(maxsize=1)
def tokenizer():
    return load_tokenizer(model_dir())


@lru_cache(maxsize=1)
def tiktoken_encoding():
    """The reference: tiktoken over the same rank file, regex and special tokens."""
    import tiktoken

    ranks = vocab.read_tiktoken_ranks(vocab.vocabulary_file())
    return tiktoken.Encoding(
        "qwen3_5",
        pat_str=vocab.QWEN3_5_PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=vocab.SPECIAL_TOKEN_IDS,
    )


def tiktoken_ids(text: str) -> list[int]:
    # tiktoken does not normalise; our tokenizer.json applies NFC first.
    return tiktoken_encoding().encode(unicodedata.normalize("NFC", text), allowed_special="all")
