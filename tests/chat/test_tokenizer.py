"""The GLM-4.7 tokenizer: official ids, agreement with splintr's GLM-4 BPE, special-token safety, the splintr
-> tokenizer.json build and its cache, and streaming detokenization."""

import json
import random
from pathlib import Path

import pytest

from glm47.chat import tokenizer as tk
from glm47.chat import vocab
from glm47.chat.tokenizer import ADDED_TOKENS, EOS_TOKEN_IDS, Tokenizer

KNOWN_TEXT = "[gMASK]this is a test where da goose is cooked<|system|>no<|user|>yes<|assistant|>maybe"
KNOWN_IDS = [151331, 574, 374, 264, 1273, 1380, 2994, 61701, 374, 28998, 151335, 2152, 151336, 9689, 151337, 36569]


@pytest.fixture(scope="module")
def splintr_glm4():
    import splintr

    return splintr.Tokenizer.from_pretrained("glm4")


def varied_corpus(n: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing code, prose, CJK, emoji, digits, contractions, whitespace runs and random
    code points, in random combinations."""
    rng = random.Random(seed)
    fragments = [
        "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
        "Hello, world!", "I'M sure you'll see they've", "it's", "DON'T", "naïve café", "e\u0301", "Ａｂｃ",
        "删除了所有的文件。", "你好，世界！", "日本語のテキスト", "한국어 문장", "Привет, мир", "مرحبا بالعالم",
        "🎉", "👩\u200d👩\u200d👧", "🇫🇷", "👍🏽", "🫠🦀", "1234567", "3.14159", "0x1F", "١٢٣", "½²",
        " ", "  ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u200b", " \n ",
        '{"key": [1, 2, {"a": null}]}', "<|user|>", "<think>", "</think>", "[gMASK]", "/nothink", "<tool_call>",
    ]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.7:
                parts.append(rng.choice(fragments))
            elif r < 0.85:  # random code points, surrogates excluded
                cp = rng.randrange(0x110000 - 0x800)
                parts.append(chr(cp + 0x800 if cp >= 0xD800 else cp))
            else:
                parts.append(" " * rng.randint(1, 20) + rng.choice(["x", "\n", ""]))
        texts.append("".join(parts))
    return texts


def official_added_tokens(reference: Path) -> list[list]:
    config = json.loads((reference / "tokenizer_config.json").read_text())
    return [[int(i), t["content"], t["special"]] for i, t in config["added_tokens_decoder"].items()]


def test_added_token_table_is_the_official_one(golden):
    official = golden("added_tokens.json", official_added_tokens)
    assert [list(t) for t in ADDED_TOKENS] == official
    assert len(ADDED_TOKENS) == 36 and ADDED_TOKENS[0][0] == 151329 and ADDED_TOKENS[-1][0] == 151364


def test_default_tokenizer_has_the_bpe_tokens_and_exactly_the_official_added_tokens(tok):
    assert tok.vocab_size == 151_329 + 36
    for token_id, content, _ in ADDED_TOKENS:
        assert tok.token_to_id(content) == token_id
        assert tok.id_to_token(token_id) == content
    # splintr's own "agent" tokens (ids 151365+) are not GLM-4.7 tokens
    assert tok.token_to_id("<|function|>") is None
    assert max(tok.encode("<|function|><|result|>", allow_special=True)) < 151329


def test_named_ids_match_the_table(tok):
    assert (tk.GMASK, tk.SOP, tk.SYSTEM, tk.USER, tk.ASSISTANT, tk.OBSERVATION) == (
        151331, 151333, 151335, 151336, 151337, 151338)
    assert (tk.THINK, tk.THINK_END, tk.TOOL_CALL, tk.ARG_VALUE_END, tk.NOTHINK) == (
        151350, 151351, 151352, 151359, 151360)
    assert EOS_TOKEN_IDS == tok.eos_token_ids == (151329, 151336, 151338)
    assert (tok.think_id, tok.think_end_id) == (151350, 151351)


def test_known_vector_with_added_tokens_parsed(tok):
    assert tok.encode(KNOWN_TEXT, allow_special=True) == KNOWN_IDS
    assert tok.decode(KNOWN_IDS) == KNOWN_TEXT


def test_added_token_text_is_ordinary_text_unless_allowed(tok):
    assert tok.encode("<|user|>") == [27, 91, 872, 91, 29]
    for token_id, content, _ in ADDED_TOKENS:
        plain = tok.encode(content)
        assert max(plain) < 151329, content
        assert tok.decode(plain) == content
        assert tok.encode(content, allow_special=True) == [token_id]


def test_agrees_with_splintr_encode_ordinary_on_a_varied_corpus(tok, splintr_glm4):
    corpus = varied_corpus(3000)
    mismatches = [t for t in corpus if tok.encode(t) != splintr_glm4.encode_ordinary(t)]
    assert mismatches == []
    assert sum(len(tok.encode(t)) for t in corpus) > 30_000  # the corpus is not trivially small


def test_agrees_with_splintr_on_strings_made_of_vocabulary_pieces(tok, splintr_glm4):
    # Joined token bytes hit merges that plain prose rarely does (e.g. a token reached through a split other
    # than the one BPE takes on the token alone).
    rng = random.Random(1)
    pieces = [splintr_glm4.decode_token_bytes(i) for i in range(151_329)]
    corpus = [b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 10))).decode("utf-8", "ignore")
              for _ in range(3000)]
    assert [t for t in corpus if tok.encode(t) != splintr_glm4.encode_ordinary(t)] == []


def test_decode_inverts_encode(tok):
    for text in varied_corpus(300, seed=2):
        assert tok.decode(tok.encode(text)) == text


def test_decode_can_skip_special_tokens_but_keeps_reasoning_markers(tok):
    ids = [tk.GMASK, tk.SOP, tk.USER, *tok.encode("hi"), tk.ASSISTANT, tk.THINK, *tok.encode("ok"), tk.THINK_END]
    assert tok.decode(ids) == "[gMASK]<sop><|user|>hi<|assistant|><think>ok</think>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi<think>ok</think>"


def test_token_bytes_gives_raw_bytes_of_partial_characters(tok):
    assert [tok.token_bytes(i) for i in tok.encode("🦀")] == [b"\xf0\x9f", b"\xa6", b"\x80"]
    assert tok.token_bytes(tk.USER) == b"<|user|>"
    assert tok.token_bytes(151_500) == b""  # a padding row of the embedding, not a token


def stream(tok, ids, **kw) -> list[str]:
    decoder = tok.stream_decoder(**kw)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_holds_back_an_emoji_until_its_last_byte(tok):
    ids = tok.encode("a🦀b")
    assert stream(tok, ids) == ["a", "", "", "🦀", "b", ""]


def test_stream_decoder_output_joins_to_the_full_decode_without_replacement_chars(tok):
    texts = ["日本語のテキストと中文", "👩\u200d👩\u200d👧 family 🇫🇷🇯🇵 👍🏽", "e\u0301 n\u0303 a\u0308\u0301",
             "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🫠🦀", *varied_corpus(200, seed=3)]
    for text in texts:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in p for p in pieces), text


def test_stream_decoder_matches_full_decode_on_arbitrary_ids(tok):
    # Random ids include lone continuation bytes and cut characters: both paths must put U+FFFD in the
    # same places.
    rng = random.Random(4)
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert "".join(stream(tok, ids, skip_special_tokens=True)) == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_accepts_a_list_of_ids(tok):
    decoder = tok.stream_decoder()
    ids = tok.encode("你好🦀")
    assert decoder.feed(ids[:-1]) == "你好"
    assert decoder.feed(ids[-1:]) + decoder.flush() == "🦀"


def test_flush_turns_an_unfinished_character_into_a_replacement_char(tok):
    decoder = tok.stream_decoder()
    assert decoder.feed(tok.encode("🦀")[:2]) == ""
    assert decoder.flush() == "\ufffd"


def test_bpe_merges_include_every_split_into_two_tokens():
    tokens = [b"a", b"b", b"c", b"ab", b"bc", b"abc"]
    assert vocab.bpe_merges(tokens) == [(0, 1), (1, 2), (0, 4), (3, 2)]


def tiny_tokenizer_json() -> str:
    """256 single bytes, then "ab" and "abc", and two added tokens."""
    table = vocab.bytes_to_unicode()
    byte_order = sorted(range(256), key=lambda b: ord(table[b]))
    tokens = [bytes([b]) for b in byte_order] + [b"ab", b"abc"]
    return vocab.build_tokenizer_json(tokens, [(258, "<|user|>", True), (259, "<think>", False)])


def test_from_dir_loads_the_checkpoints_own_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json())
    small = Tokenizer.from_dir(tmp_path)
    assert small.vocab_size == 260
    assert small.encode("abc ab") == [257, small.token_to_id("Ġ"), 256]  # "Ġ" spells the byte " "
    assert small.encode("<|user|>abc", allow_special=True) == [258, 257]
    assert small.decode(small.encode("x<think>abc", allow_special=True), skip_special_tokens=True) == "x<think>abc"


def test_from_dir_falls_back_to_the_bundled_vocabulary(tmp_path, tok):
    assert Tokenizer.from_dir(tmp_path) is tok  # no tokenizer.json there


def test_cache_file_lives_under_xdg_cache_home_and_names_the_splintr_version(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = vocab.default_cache_file()
    assert path.parent == tmp_path / "glm47"
    assert vocab.version("splintr-rs") in path.name


def test_read_or_build_builds_once_then_reads_the_cache(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return "built"

    file = tmp_path / "sub" / "tok.json"
    assert vocab.read_or_build(file, build) == "built"
    assert vocab.read_or_build(file, build) == "built"
    assert len(calls) == 1 and file.read_text() == "built"
    assert [p.name for p in file.parent.iterdir()] == ["tok.json"]  # no temporary file left behind


def test_read_or_build_works_when_the_cache_dir_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # A path under a regular file can't be created, even by root (chmod would not stop root).
    assert vocab.read_or_build(blocker / "glm47" / "tok.json", lambda: "in memory") == "in memory"
