"""Text <-> token ids for a model directory, and streaming detokenization.

Encoding goes through the `tokenizers` library with the directory's
`tokenizer.json`. Decoding is done here, from each token's raw bytes: Qwen's
vocabulary is byte-level, so one token can hold half of a UTF-8 character,
and only bytes (not per-token strings) can be joined without producing `�`
or leaking the byte-level alphabet (`Ġ`, `Ċ`) into the output.
"""

from __future__ import annotations

import codecs
import pathlib

from ..errors import FlashMoeError
from .vocab import byte_to_symbol

# Generation stops at either: <|im_end|> closes a turn, <|endoftext|> a document.
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


class ChatTokenizer:
    """A loaded tokenizer: `encode`, `decode`, special-token ids."""

    def __init__(self, tokenizer, path: pathlib.Path):
        self._tokenizer = tokenizer
        self.path = path
        decoder_kind = type(tokenizer.decoder).__name__
        if decoder_kind != "ByteLevel":
            raise FlashMoeError(
                f"{path} uses a {decoder_kind} decoder; only byte-level BPE tokenizers "
                "(as Qwen3.5 ships) are supported. Use the tokenizer.json of the checkpoint."
            )
        self._special_ids = set(tokenizer.get_added_tokens_decoder())
        self._symbol_to_byte = {symbol: byte for byte, symbol in enumerate(byte_to_symbol())}
        self._bytes_by_id: dict[int, bytes] = {}
        missing = [token for token in EOS_TOKENS if tokenizer.token_to_id(token) is None]
        if missing:
            raise FlashMoeError(
                f"{path} has no {', '.join(missing)} token, so it is not a Qwen3.5 tokenizer; "
                "use the tokenizer.json of the checkpoint."
            )
        self.eos_token_ids = tuple(tokenizer.token_to_id(token) for token in EOS_TOKENS)

    @property
    def vocab_size(self) -> int:
        """Number of real tokens, special ones included (the model's embedding may be larger)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of one token given as its text, e.g. `"</think>"`; KeyError if none."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; control tokens written in the text become their single ids."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for ids past the vocabulary, i.e. padding)."""
        cached = self._bytes_by_id.get(token_id)
        if cached is not None:
            return cached
        text = self._tokenizer.id_to_token(token_id)
        if text is None:
            raw = b""
        elif token_id in self._special_ids:
            raw = text.encode("utf-8")
        else:
            raw = bytes(self._symbol_to_byte[symbol] for symbol in text)
        self._bytes_by_id[token_id] = raw
        return raw

    def decode(self, token_ids) -> str:
        """Text of a token sequence; invalid UTF-8 becomes U+FFFD, as in `tokenizers`."""
        return b"".join(self.token_bytes(token_id) for token_id in token_ids).decode("utf-8", "replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids, one at a time, into text as soon as characters are complete.

    `add` returns only whole characters: a token ending inside a multi-byte
    character keeps those bytes until the next tokens complete it. Joining
    every `add` and the final `flush` gives exactly `decode(all_ids)`.
    """

    def __init__(self, tokenizer: ChatTokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Text held back at the end of generation (an incomplete character becomes U+FFFD)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


def load_tokenizer(model_dir) -> ChatTokenizer:
    """Load `tokenizer.json` from a model directory."""
    path = pathlib.Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FlashMoeError(
            f"{path} is missing. Copy tokenizer.json from the original checkpoint into "
            f"{path.parent}, or re-run `llm flashmoe convert`."
        )
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises plain Exception for bad JSON
        raise FlashMoeError(
            f"{path} could not be read as a tokenizer ({error}). The file is corrupt or "
            "truncated: copy it again from the original checkpoint."
        ) from error
    return ChatTokenizer(tokenizer, path)
