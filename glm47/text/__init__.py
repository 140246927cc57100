"""The text side of generation, shared by the LLM facade and the server: TextDriver runs engine requests as
text (detokenized, stop token hidden, cut at the first stop string); TextDelta and CompletionOutput are its
outputs, per step and added up. Torch-free: the engine is passed in, and it speaks token ids only."""

from glm47.text.driver import TextDriver
from glm47.text.output import CompletionOutput, TextDelta, chat_finish_reason
from glm47.text.stop_strings import StopStringMatcher

__all__ = ["TextDriver", "TextDelta", "CompletionOutput", "chat_finish_reason", "StopStringMatcher"]
