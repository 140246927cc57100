"""Chat I/O for GLM-4.7: the tokenizer (text <-> ids, streaming detokenization) and the prompt format
(messages -> prompt text or ids + assistant mask). Pure Python on `tokenizers` and `jinja2`; no torch."""

from glm47.chat.messages import normalize_messages, normalize_tools
from glm47.chat.template import PromptTooLong, Segment, render_ids, render_prompt, render_segments, render_with_jinja
from glm47.chat.tokenizer import ADDED_TOKENS, EOS_TOKEN_IDS, StreamDecoder, Tokenizer

__all__ = [
    "ADDED_TOKENS", "EOS_TOKEN_IDS", "PromptTooLong", "Segment", "StreamDecoder", "Tokenizer", "normalize_messages",
    "normalize_tools", "render_ids", "render_prompt", "render_segments", "render_with_jinja",
]
