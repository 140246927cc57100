"""The BPE trained for the nano model: byte-level round trips, GLM-4.7's 36 added tokens with their exact
strings and flags, and the glm47.chat.Tokenizer API on top of it."""

import pytest

from glm47.chat import render_ids
from glm47.chat.tokenizer import ADDED_TOKENS, Tokenizer
from glm47.training.corpus import generate_examples, training_text
from glm47.training.train_tokenizer import plain_pieces, train_tokenizer


@pytest.fixture(scope="module")
def examples():
    return generate_examples(60, seed=1)


@pytest.fixture(scope="module")
def tok(examples):
    return train_tokenizer(training_text(examples), 600)


@pytest.mark.parametrize("text", [
    "What is 12 * 34?", "Zürich: 3°C, snowy", "日本語のテキスト", "emoji 🎉🚀 done", "  leading and   runs\n\n\ttabs",
    "1234567890 3.14159 -42", "'s 're 'LL", "", "line\r\nbreaks\r\n",
])
def test_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_every_added_token_is_one_id_with_the_official_flag(tok):
    hf_added = tok.hf_tokenizer.get_added_tokens_decoder()
    assert len(hf_added) == len(ADDED_TOKENS) == 36
    for _, text, special in ADDED_TOKENS:
        ids = tok.encode(text, allow_special=True)
        assert len(ids) == 1, (text, ids)
        assert hf_added[ids[0]].content == text and hf_added[ids[0]].special == special, (text, hf_added[ids[0]])
        assert (ids[0] in tok.special_ids) == special
        assert len(tok.encode(text)) > 1, f"{text} typed as text must not become the control token"


def test_added_tokens_follow_the_bpe_ids_in_official_order(tok):
    ids = [tok.token_to_id(text) for _, text, _ in ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 36)) and ids[-1] == tok.vocab_size - 1, ids


def test_chat_tokenizer_api_works(tok, examples):
    assert tok.eos_token_ids == tuple(tok.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))
    assert tok.decode([tok.think_id, tok.think_end_id]) == "<think></think>"
    ex = examples[0]
    ids = render_ids(tok, ex.messages, ex.tools, enable_thinking=ex.enable_thinking, add_generation_prompt=False)
    assert tok.decode(ids).startswith("[gMASK]<sop>")


def test_corpus_text_compresses_well(tok, examples):
    """The trained merges are used: rendered conversations take far fewer tokens than bytes."""
    text = next(training_text(examples[:1]))
    ids = render_ids(tok, examples[0].messages, examples[0].tools, add_generation_prompt=False)
    assert len(ids) < len(text.encode()) / 3, (len(ids), len(text))


def test_training_is_deterministic_and_saves_as_tokenizer_json(tmp_path, examples, tok):
    again = train_tokenizer(training_text(examples), 600)
    assert again.hf_tokenizer.to_str() == tok.hf_tokenizer.to_str()
    tok.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode("What is 12 * 34?") == tok.encode("What is 12 * 34?")
    assert loaded.vocab_size == tok.vocab_size <= 600


def test_added_token_strings_are_not_learned_as_merges():
    assert list(plain_pieces(["a<|user|>b<think>c</think>"])) == ["a", "b", "c"]


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(["hello"], 100)
