"""The grammar engine (llguidance) behind constrained decoding: one
`GrammarVocabulary` per tokenizer, Lark grammars compiled into matchers, and
token masks as numpy arrays.

Masks cover the tokenizer's real ids (248,077 for Qwen3.5); logits are wider
(248,320: embedding padding), and the padding ids are always masked.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import FlashMoeError

_vocabularies: dict[tuple, "GrammarVocabulary"] = {}
_lock = threading.Lock()


class GrammarVocabulary:
    """llguidance's view of one tokenizer (built once: about 2 s for 248k tokens)."""

    def __init__(self, tokenizer):
        llguidance = import_llguidance()
        self.tokenizer = tokenizer
        self.size = tokenizer.vocab_size                     # real ids, specials included
        self.eos_ids = tuple(tokenizer.eos_token_ids)
        text = tokenizer.path.read_text(encoding="utf-8")
        # llguidance reads tokenizer.json itself (the Hugging Face `tokenizers`
        # format), so its idea of each token's bytes is the tokenizer's own.
        self.ll = llguidance.LLTokenizer(text, n_vocab=self.size, eos_token=list(self.eos_ids))
        self._ids_by_bytes: dict[bytes, int] | None = None

    def id_of(self, text: str | bytes) -> int | None:
        """The single ordinary token spelling `text` exactly, if there is one."""
        if self._ids_by_bytes is None:
            special = self.tokenizer._special_ids
            self._ids_by_bytes = {
                self.tokenizer.token_bytes(i): i for i in range(self.size) if i not in special
            }
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return self._ids_by_bytes.get(raw)

    def text_of(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    def matcher(self, lark: str, what: str):
        """A fresh matcher for a Lark grammar; `what` names it in errors."""
        llguidance = import_llguidance()
        matcher = llguidance.LLMatcher(self.ll, lark, log_level=0)
        if matcher.is_error():
            raise FlashMoeError(
                f"{what} cannot be turned into a grammar: {matcher.get_error()}. "
                "Simplify the JSON schema (see llguidance's supported keywords) or turn the "
                "constraint off."
            )
        return matcher


def import_llguidance():
    try:
        import llguidance
    except ImportError as error:
        raise FlashMoeError(
            "Constrained decoding (tool calls, --schema) needs the llguidance package: "
            "`pip install llguidance` (or reinstall llm-flashmoe). Tool calls also work "
            "unconstrained with -o constrain_tools false."
        ) from error
    return llguidance


def grammar_vocabulary(tokenizer) -> GrammarVocabulary:
    """The (cached) `GrammarVocabulary` of a `ChatTokenizer`."""
    stat = tokenizer.path.stat()
    key = (str(tokenizer.path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        vocabulary = _vocabularies.get(key)
        if vocabulary is None:
            vocabulary = _vocabularies[key] = GrammarVocabulary(tokenizer)
        return vocabulary


class TokenMask:
    """A matcher's allowed-token bitmask: 32 ids per int32 word, id i at bit i % 32."""

    def __init__(self, size: int):
        self.size = size
        self.words = np.zeros((size + 31) // 32, dtype=np.int32)

    def fill(self, matcher) -> "TokenMask":
        matcher.unsafe_compute_mask_ptr(self.words.ctypes.data, self.words.nbytes)
        return self

    def allows(self, token_id: int) -> bool:
        return token_id < self.size and bool((int(self.words[token_id >> 5]) >> (token_id & 31)) & 1)

    def first_allowed(self) -> int | None:
        nonzero = np.flatnonzero(self.words)
        if not len(nonzero):
            return None
        word = int(self.words[nonzero[0]]) & 0xFFFFFFFF
        return int(nonzero[0]) * 32 + ((word & -word).bit_length() - 1)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V >= size] with every disallowed id at -inf (a new array)."""
        allowed = np.unpackbits(self.words.view(np.uint8), bitorder="little", count=self.size).view(bool)
        out = np.full_like(logits, -np.inf)
        np.copyto(out[..., : self.size], logits[..., : self.size], where=allowed)
        return out


def force(logits: np.ndarray, token_id: int) -> np.ndarray:
    """Logits that only `token_id` can win (0 rather than its logit: it may have been -inf)."""
    out = np.full_like(logits, -np.inf)
    out[..., token_id] = 0.0
    return out
