"""Builds GLM-4's Hugging Face `tokenizer.json` from the vocabulary bundled in the `splintr-rs` package.

Used when a checkpoint ships no tokenizer.json. The result is cached under the user cache dir (keyed by the
splintr version) so the 2-3 s build happens once; an unwritable cache only costs the rebuild. This file knows
nothing about chat or special-token policy: the caller passes the added-token table.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

# Pre-tokenizer split of the GLM-4 BPE (GLM-4's own tokenizer code). tiktoken-style: digits in runs of 1-3,
# letters glued to one leading non-letter, whitespace runs kept apart from the word after them.
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_BPE_TOKENS = 151_329  # splintr's glm4 ids >= this are added tokens (and splintr's own "agent" tokens)
BUILD_FORMAT = 1  # bump when the generated JSON changes, so stale caches are ignored


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE files use to spell tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # control bytes, space, etc. move to unused code points from 256 up
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_merges(tokens: Sequence[bytes]) -> list[tuple[int, int]]:
    """Merges that make HF's BPE behave like tiktoken's rank-ordered BPE over `tokens` (index = rank).

    tiktoken merges any adjacent pair whose concatenation is a token, lowest rank first. So every split of a
    token into two tokens is a merge, ordered by the rank of the result. Keeping only the one split that BPE
    takes on the token alone is not enough: in context a token can be reached through another split (measured:
    142 of 25,000 random strings then differ from splintr; with all splits, none do).
    """
    rank = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for tok in tokens:
        splits = []
        for cut in range(1, len(tok)):
            left, right = rank.get(tok[:cut]), rank.get(tok[cut:])
            if left is not None and right is not None:
                splits.append((left, right))
        merges.extend(sorted(splits))  # ties inside one result: lower-ranked pieces first, as transformers does
    return merges


def build_tokenizer_json(token_bytes: Sequence[bytes], added_tokens: Sequence[tuple[int, str, bool]]) -> str:
    """A complete HF tokenizer.json: byte-level BPE over `token_bytes` (id = rank) plus `added_tokens`,
    given as (id, content, special) rows."""
    if len(set(token_bytes)) != len(token_bytes):
        raise ValueError("BPE vocabulary has duplicate tokens; ranks would be ambiguous")
    to_char = bytes_to_unicode()
    spelled = ["".join(to_char[b] for b in tok) for tok in token_bytes]
    added = [
        {"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, text, special in added_tokens
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GLM4_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # tiktoken looks a whole pre-token up before merging; some tokens are only reachable that way.
            "ignore_merges": True,
            "vocab": {s: i for i, s in enumerate(spelled)},
            "merges": [[spelled[a], spelled[b]] for a, b in bpe_merges(token_bytes)],
        },
    }
    return json.dumps(spec, ensure_ascii=False)


def splintr_glm4_token_bytes() -> list[bytes]:
    """The 151,329 BPE tokens of splintr's bundled `glm4` vocabulary, by id. Its ids from 151,329 up (the
    official added tokens, then splintr's own "agent" tokens) are deliberately left out."""
    import splintr  # only needed for this build, not when a checkpoint has its own tokenizer.json

    bundled = splintr.Tokenizer.from_pretrained("glm4")
    return [bundled.decode_token_bytes(i) for i in range(N_BPE_TOKENS)]


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/glm47`, else `~/.cache/glm47`."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "glm47"


def default_cache_file() -> Path:
    return cache_dir() / f"glm4-tokenizer-splintr{version('splintr-rs')}-f{BUILD_FORMAT}.json"


def read_or_build(cache_file: Path, build: Callable[[], str]) -> str:
    """The text in `cache_file`, or `build()` saved there. Saving is best effort: a read-only or missing
    cache location just means building in memory each time."""
    if cache_file.is_file():
        return cache_file.read_text(encoding="utf-8")
    text = build()
    _save(cache_file, text)
    return text


def _save(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return  # can't write here (read-only home, path under a file, ...): stay in memory
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
