"""Training a small byte-level BPE for a nano GLM-4.7: the GLM-4 pre-tokenizer split, merges learned from
the corpus with Hugging Face `tokenizers`, and all 36 official added tokens with their exact strings and
special flags (ids differ from the official ones: they follow the BPE tokens, in the official order).

The result is a `glm47.chat.Tokenizer`; save it with `tokenizer.hf_tokenizer.save(path)` as tokenizer.json.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from glm47.chat.tokenizer import ADDED_TOKENS, Tokenizer
from glm47.chat.vocab import GLM4_SPLIT_PATTERN

# Added-token strings, longest first, so that text is cut at them before BPE training sees it.
_ADDED_RE = re.compile("|".join(re.escape(text) for _, text, _ in sorted(ADDED_TOKENS, key=lambda r: -len(r[1]))))


def plain_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The text between added-token strings: rendered prompts carry "<|user|>", "<think>" …, which must
    not become merges (they are single added tokens already)."""
    for text in texts:
        yield from (piece for piece in _ADDED_RE.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` ids in all (BPE tokens + the 36 added tokens), trained on
    `texts` (rendered conversations; added-token strings in them are skipped). Deterministic for the same
    texts. Fewer ids when the texts run out of pairs to merge."""
    n_bpe = vocab_size - len(ADDED_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size={vocab_size} leaves {n_bpe} BPE ids; byte-level BPE needs at least 256")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(plain_pieces(texts), trainer)
    for _, text, special in ADDED_TOKENS:  # one at a time keeps the official order in the ids
        hf.add_tokens([AddedToken(text, special=special, normalized=False)])
    return Tokenizer(hf)
