"""GLM-4.7 tokenizer: the official added-token table, encode/decode over a Hugging Face `tokenizers` BPE, and a
streaming detokenizer that never splits a UTF-8 character.

Text is encoded as plain text unless the caller asks for added tokens (`allow_special=True`), so markers typed
by a user or returned by a tool never become control tokens. Chat formatting lives in template.py; building
the vocabulary from splintr lives in vocab.py.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from glm47.chat.vocab import build_tokenizer_json, bytes_to_unicode, default_cache_file, read_or_build
from glm47.chat.vocab import splintr_glm4_token_bytes

# The 36 added tokens of tokenizer_config.json: (id, content, special). "special" is HF's flag: only those
# tokens are dropped by decode(skip_special_tokens=True); <think>, <tool_call> … stay visible.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151329, "<|endoftext|>", True),
    (151330, "[MASK]", True),
    (151331, "[gMASK]", True),
    (151332, "[sMASK]", True),
    (151333, "<sop>", True),
    (151334, "<eop>", True),
    (151335, "<|system|>", True),
    (151336, "<|user|>", True),
    (151337, "<|assistant|>", True),
    (151338, "<|observation|>", True),
    (151339, "<|begin_of_image|>", True),
    (151340, "<|end_of_image|>", True),
    (151341, "<|begin_of_video|>", True),
    (151342, "<|end_of_video|>", True),
    (151343, "<|begin_of_audio|>", True),
    (151344, "<|end_of_audio|>", True),
    (151345, "<|begin_of_transcription|>", True),
    (151346, "<|end_of_transcription|>", True),
    (151347, "<|code_prefix|>", True),
    (151348, "<|code_middle|>", True),
    (151349, "<|code_suffix|>", True),
    (151350, "<think>", False),
    (151351, "</think>", False),
    (151352, "<tool_call>", False),
    (151353, "</tool_call>", False),
    (151354, "<tool_response>", False),
    (151355, "</tool_response>", False),
    (151356, "<arg_key>", False),
    (151357, "</arg_key>", False),
    (151358, "<arg_value>", False),
    (151359, "</arg_value>", False),
    (151360, "/nothink", True),
    (151361, "<|begin_of_box|>", False),
    (151362, "<|end_of_box|>", False),
    (151363, "<|image|>", False),
    (151364, "<|video|>", False),
)

ENDOFTEXT = 151329
GMASK = 151331
SOP = 151333
SYSTEM = 151335
USER = 151336
ASSISTANT = 151337
OBSERVATION = 151338
THINK = 151350
THINK_END = 151351
TOOL_CALL = 151352
TOOL_CALL_END = 151353
TOOL_RESPONSE = 151354
TOOL_RESPONSE_END = 151355
ARG_KEY = 151356
ARG_KEY_END = 151357
ARG_VALUE = 151358
ARG_VALUE_END = 151359
NOTHINK = 151360
# Generation ends on these (generation_config.json): end of text, or the model handing the turn to the user
# or to a tool.
EOS_TOKEN_IDS = (ENDOFTEXT, USER, OBSERVATION)
# Texts from this many characters on are encoded by encode_batch_fast, which releases the GIL.
LONG_TEXT = 1 << 14


class Tokenizer:
    """A GLM-4.7 tokenizer. Immutable; build with `from_dir` or `default`."""

    def __init__(self, hf: tokenizers.Tokenizer):
        self._hf = hf
        # Same BPE model (shared, not copied) and pre-tokenizer, but no added tokens: this one spells
        # "<|user|>" or "<think>" out as the characters they are made of.
        self._plain = tokenizers.Tokenizer(hf.model)
        self._plain.normalizer = hf.normalizer
        self._plain.pre_tokenizer = hf.pre_tokenizer
        added = hf.get_added_tokens_decoder()
        self._added_bytes = {i: t.content.encode() for i, t in added.items()}
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        self._char_to_byte = {c: b for b, c in bytes_to_unicode().items()}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """The checkpoint's own `tokenizer.json` when it has one, else the bundled GLM-4 vocabulary."""
        file = Path(path) / "tokenizer.json"
        if file.is_file():
            return cls(tokenizers.Tokenizer.from_file(str(file)))
        return cls.default()

    @classmethod
    def default(cls) -> Tokenizer:
        """The GLM-4.7 tokenizer rebuilt from splintr's bundled vocabulary (cached on disk and per process)."""
        return _default_tokenizer()

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The underlying Hugging Face tokenizer (with added tokens), e.g. to save it as tokenizer.json."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """BPE tokens + added tokens (151,365 for GLM-4.7; the model's embedding has padding rows beyond)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops."""
        return self._special_ids

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self._require_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))

    @property
    def think_id(self) -> int:
        return self._require_id("<think>")

    @property
    def think_end_id(self) -> int:
        return self._require_id("</think>")

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Added-token strings ("<|user|>", "<think>", …) stay plain text unless
        `allow_special`, which turns each of them into its single id. A long text is encoded with the GIL
        released (`encode` holds it: 12 MB of text would stop every other thread for ~12 s)."""
        encoder = self._hf if allow_special else self._plain
        if len(text) < LONG_TEXT:
            return encoder.encode(text, add_special_tokens=False).ids
        batch = getattr(encoder, "encode_batch_fast", encoder.encode_batch)  # _fast (no offsets): tokenizers >= 0.20
        return batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text of n characters has at least n / this many tokens,
        which bounds a prompt's length before it is encoded."""
        return max(len(self.token_bytes(i)) for i in range(self.vocab_size))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD. Ids outside the vocabulary (the
        model's padding rows) decode to nothing, as in Hugging Face."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token as spelled in tokenizer.json (byte-level characters, e.g. "Ġthe" for " the")."""
        return self._hf.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (b"" for an unknown id). One token may hold part of a character."""
        if token_id in self._added_bytes:
            return self._added_bytes[token_id]
        spelled = self._hf.id_to_token(token_id)
        if spelled is None:
            return b""
        if not all(c in self._char_to_byte for c in spelled):
            return spelled.encode()  # not byte-level spelling; HF's ByteLevel decoder falls back the same way
        return bytes(self._char_to_byte[c] for c in spelled)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _require_id(self, token: str) -> int:
        token_id = self._hf.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token!r} token; is this a GLM-4.7 tokenizer.json?")
        return token_id


class StreamDecoder:
    """Turns token ids into text as they arrive, for streaming output.

    The pieces joined equal `tokenizer.decode` of all ids fed. Bytes of an unfinished UTF-8 character (an
    emoji arriving as four byte tokens) are held back until the character completes; bytes that can never
    complete one become U+FFFD at the same place a full decode puts it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """The text completed by these ids (often "", while a character is still incomplete)."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        data = b"".join(self._tokenizer.token_bytes(i) for i in ids if i not in self._skip)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD: call once when the sequence ends."""
        return self._utf8.decode(b"", final=True)


@functools.cache
def _default_tokenizer() -> Tokenizer:
    # Cached per process: loading the 8 MB tokenizer.json takes ~1-2 s and the Tokenizer is immutable.
    def build() -> str:
        return build_tokenizer_json(splintr_glm4_token_bytes(), ADDED_TOKENS)

    return Tokenizer(tokenizers.Tokenizer.from_str(read_or_build(default_cache_file(), build)))
