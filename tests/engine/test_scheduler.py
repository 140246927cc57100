"""Scheduler policy, one test per branch: token budget and chunked prefill, decodes first, seats, FCFS,
preemption from the tail (and of the sequence itself), no admission after a preemption, prefix hits."""

import pytest

from glm47.engine.block_manager import BlockManager
from glm47.engine.sampling import SamplingParams
from glm47.engine.scheduler import Scheduler
from glm47.engine.sequence import Sequence, SequenceStatus

BS = 4


def make(num_blocks=64, max_num_seqs=8, budget=16, caching=True):
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs, budget)


def seq(rid, n_prompt, max_tokens=100, start=0):
    return Sequence(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens), max_tokens,
                    frozenset())


def step(sched, token=1):
    """schedule + a fake forward pass: every sequence whose last token was computed samples `token`."""
    batch = sched.schedule()
    plan = {s.request_id: n for s, n in zip(batch.seqs, batch.num_tokens)}
    sampled = [(s, [token]) for s, n in zip(batch.seqs, batch.num_tokens) if s.num_computed_tokens + n == len(s)]
    sched.update(batch, sampled)
    return plan


def test_long_prompt_is_prefilled_in_budget_sized_chunks_then_decodes():
    sched = make(budget=8)
    a = seq("a", 20)
    sched.add(a)
    assert [step(sched) for _ in range(4)] == [{"a": 8}, {"a": 8}, {"a": 4}, {"a": 1}]
    assert a.num_output_tokens == 2  # sampled after the last chunk and after the decode


def test_decodes_go_before_a_running_prefill_and_the_prefill_gets_the_rest_of_the_budget():
    sched = make(budget=8)
    a, b = seq("a", 3), seq("b", 30)
    sched.add(a)
    step(sched)  # a's prompt
    sched.add(b)
    assert step(sched) == {"a": 1, "b": 7}
    assert step(sched) == {"a": 1, "b": 7}


def test_waiting_sequences_share_the_budget_in_arrival_order():
    sched = make(budget=10)
    for rid in "abc":
        sched.add(seq(rid, 6, start=ord(rid) * 10))
    assert step(sched) == {"a": 6, "b": 4}  # c does not fit this step
    assert step(sched) == {"a": 1, "b": 2, "c": 6}  # decodes, then b's rest, then c


def test_no_more_than_max_num_seqs_run_at_once():
    sched = make(max_num_seqs=2, budget=32)
    for rid in "abc":
        sched.add(seq(rid, 3, start=ord(rid) * 10))
    assert set(step(sched)) == {"a", "b"}
    assert set(step(sched)) == {"a", "b"} and len(sched.waiting) == 1


def test_first_come_first_served_a_waiting_sequence_that_does_not_fit_blocks_later_ones():
    sched = make(num_blocks=4, budget=64)
    big, small = seq("big", 20), seq("small", 2, start=500)  # big needs 5 blocks of 4
    sched.add(seq("x", 1, start=900))
    step(sched)  # x holds one block: 3 free
    sched.add(big)
    sched.add(small)
    assert step(sched) == {"x": 1}, "small must not overtake big"


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted_and_requeued_first():
    sched = make(num_blocks=3, budget=16)
    a, b, c = seq("a", 4), seq("b", 3, start=100), seq("c", 3, start=200)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched) == {"a": 4, "b": 3, "c": 3}  # 3 blocks, all used; a sampled into its 5th slot
    late = seq("late", 1, start=300)
    sched.add(late)
    plan = step(sched)  # a needs a second block: c (the tail) goes, b stays
    assert plan == {"a": 1, "b": 1}, plan
    assert c.status is SequenceStatus.WAITING and c.block_table == [] and c.num_computed_tokens == 0
    assert list(sched.waiting) == [c, late], "preempted sequence resumes before newer arrivals"
    assert sched.num_preemptions == 1


def test_a_sequence_that_finds_no_victim_preempts_itself():
    sched = make(num_blocks=2, budget=16)
    a = seq("a", 8)  # both blocks
    sched.add(a)
    step(sched)  # prefill; a has 9 tokens now and needs a third block
    assert step(sched) == {}
    assert a.status is SequenceStatus.WAITING and sched.block_manager.num_free_blocks == 2


def test_prefix_hits_are_not_recomputed():
    sched = make(budget=64)
    a = seq("a", 13)
    sched.add(a)
    step(sched)
    b = Sequence("b", list(range(12)) + [99, 98], SamplingParams(), 16, frozenset())
    sched.add(b)
    assert step(sched) == {"a": 1, "b": 2}  # 12 of b's 14 prompt tokens were cached
    assert b.num_cached_tokens == 12 and sched.prefix_hit_tokens == 12


def test_finish_and_abort_free_blocks_wherever_the_sequence_is():
    sched = make(budget=8)
    a, b = seq("a", 20), seq("b", 5, start=100)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: first chunk; b waits
    sched.finish(a, "abort")
    sched.finish(b, "abort")
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64
    assert a.finish_reason == b.finish_reason == "abort"


def test_sequences_finish_at_max_tokens_and_at_a_stop_token():
    sched = make()
    a = Sequence("a", [5, 6], SamplingParams(max_tokens=2), 2, frozenset())
    b = Sequence("b", [7, 8], SamplingParams(max_tokens=9), 9, frozenset({1}))
    sched.add(a)
    sched.add(b)
    step(sched, token=3)
    step(sched, token=1)
    assert (a.finish_reason, a.output_token_ids) == ("length", [3, 1])
    assert (b.finish_reason, b.output_token_ids) == ("stop", [3, 1])
    assert not sched.has_unfinished() and sched.block_manager.num_free_blocks == 64


def test_budget_below_max_num_seqs_is_refused():
    with pytest.raises(ValueError, match="max_num_batched_tokens=4"):
        make(max_num_seqs=8, budget=4)


def test_a_decodes_drafts_are_computed_all_together_or_not_at_all():
    """The scheduler sees num_tokens_to_compute: a decode's last token plus its drafts when the budget has room
    for all of them, else the token alone; a preempted sequence's drafts do not count while it recomputes."""
    sched = make(max_num_seqs=2, budget=6)
    a, b = seq("a", 3), seq("b", 3, start=10)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prompts
    a.draft_token_ids, b.draft_token_ids = [7, 8, 9], [7, 8]
    assert (a.num_tokens_to_compute, b.num_tokens_to_compute) == (4, 3)
    assert sched.schedule().num_tokens == [4, 1]  # a's 4 fit; b's 3 do not fit the 2 left: its token alone
    sched.block_manager.free(a)  # as a preemption leaves it
    assert a.num_uncomputed_tokens == len(a) and a.num_tokens_to_compute == len(a)
