"""StopStringMatcher: streamed text is cut at the first stop string, however the text is split into pieces."""

import random

import pytest

from glm47.text.stop_strings import StopStringMatcher, find_first_stop, partial_stop_length


def run(pieces, stops, include_stop=False):
    """Feed pieces; return (what each feed emitted, flushed tail, stopped)."""
    m = StopStringMatcher(stops, include_stop)
    emitted, stopped = [], False
    for piece in pieces:
        out, stopped = m.feed(piece)
        emitted.append(out)
    return emitted, m.flush(), stopped


def reference_cut(text, stops, include_stop):
    """Brute force: scan end positions; the first one at which some stop ends wins (the longer stop on a tie)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[:end] if include_stop else text[: end - len(stop)]
    return text


def test_stop_spanning_three_pieces_is_never_partially_emitted():
    emitted, tail, stopped = run(["ab#", "#", "#cd"], ["###"])
    assert emitted == ["ab", "", ""]
    assert (tail, stopped) == ("", True)


def test_include_stop_str_emits_the_stop_itself():
    emitted, tail, stopped = run(["ab#", "#", "#cd"], ["###"], include_stop=True)
    assert "".join(emitted) == "ab###" and stopped and tail == ""


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    emitted, tail, stopped = run(["ab#", "x", "y#"], ["###"])
    assert emitted == ["ab", "#x", "y"]
    assert (tail, stopped) == ("#", False)


def test_flush_returns_held_back_text_when_generation_ends_otherwise():
    m = StopStringMatcher(["</answer>"])
    assert m.feed("42</ans") == ("42", False)
    assert m.flush() == "</ans"
    assert m.flush() == ""


def test_stop_at_the_very_start():
    assert run(["###rest"], ["###"]) == ([""], "", True)


def test_the_earliest_of_several_stops_wins_and_is_reported():
    m = StopStringMatcher(["STOP", "<end>"])
    assert m.feed("one <en") == ("one ", False)
    assert m.feed("d> two STOP") == ("", True)
    assert m.matched == "<end>" and m.stopped


def test_nothing_is_emitted_after_a_stop():
    m = StopStringMatcher("x")
    assert m.feed("axb") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_no_stops_passes_text_straight_through():
    assert run(["a", "b#"], None) == (["a", "b#"], "", False)


def test_stop_inside_another_is_found_where_it_ends_whatever_the_split():
    """'y' ends before 'xyz' does, so a stream fed one char at a time must stop at 'y'; feeding the text whole
    must agree."""
    assert run(["xyz"], ["xyz", "y"])[0] == ["x"]
    assert "".join(run(["x", "y", "z"], ["xyz", "y"])[0]) == "x"


@pytest.mark.parametrize("stops", [[""], ["ok", 3]])
def test_empty_or_non_string_stop_is_rejected(stops):
    with pytest.raises(ValueError, match="stops"):
        StopStringMatcher(stops)


def test_find_first_stop_and_partial_stop_length():
    assert find_first_stop("aXYbXY", ["XY", "b"]) == (1, "XY")
    assert find_first_stop("abc", ["ab", "abc"]) == (0, "ab")
    assert find_first_stop("abc", ["zz"]) is None
    assert partial_stop_length("hello </an", ["</answer>", "\n\n"]) == 4
    assert partial_stop_length("hello\n", ["</answer>", "\n\n"]) == 1
    assert partial_stop_length("hello", ["</answer>"]) == 0


def test_any_split_of_random_text_equals_the_reference_cut():
    rng = random.Random(0)
    for case in range(400):
        text = "".join(rng.choice("ab#") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab#") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        emitted, tail, _ = run(pieces, stops, include)
        got = "".join(emitted) + tail
        assert got == reference_cut(text, stops, include), (case, text, stops, pieces, include, got)
