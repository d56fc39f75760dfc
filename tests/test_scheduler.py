"""The scheduler's bookkeeping with a controllable clock, and its waiting with gevent."""

import random
import time

import gevent
import pytest

from bioproxy.errors import ClientGone, QueueFull, QueueTimeout
from bioproxy.scheduler import (
    FULL,
    GONE,
    GRANTED,
    PATIENCE,
    QUEUED,
    TIMEOUT,
    USER,
    WARMUP,
    Scheduler,
    Ticket,
)
from bioproxy.slot_table import SlotTable, partial_digest


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Slots(SlotTable):
    """A slot table as a read of llama-server's slots would leave it."""

    def __init__(self, count, held=None):
        super().__init__()
        self.count = count
        self.held = {slot: (prefix, "digest", 0) for slot, prefix in (held or {}).items()}


def make(count=2, held=None, max_queue=4, max_wait=10.0):
    return Scheduler(Slots(count, held), max_queue, max_wait, clock=Clock())


def user(template=None, slot=None):
    return Ticket(USER, template, slot)


def test_a_free_slot_is_granted_at_once():
    scheduler = make(count=1)

    ticket = scheduler.submit(user())

    assert (ticket.outcome, ticket.slot) == (GRANTED, 0)
    assert ticket.event.is_set()


def test_waiting_users_are_served_first_come_first_served_and_before_warmups():
    scheduler = make(count=1)
    running = scheduler.submit(user())
    warmup = scheduler.submit(Ticket(WARMUP, "@a"))
    first, second = scheduler.submit(user()), scheduler.submit(user())
    assert [t.outcome for t in (warmup, first, second)] == [QUEUED] * 3

    scheduler.release(running)
    assert (first.outcome, second.outcome, warmup.outcome) == (GRANTED, QUEUED, QUEUED)
    scheduler.release(first)
    assert (second.outcome, warmup.outcome) == (GRANTED, QUEUED)
    scheduler.release(second)
    assert warmup.outcome == GRANTED


def test_a_templated_request_goes_to_the_slot_holding_its_template():
    scheduler = make(count=3, held={0: "@a", 2: "@b"})

    assert scheduler.submit(user("@b")).slot == 2
    assert scheduler.submit(user("@a")).slot == 0


def test_without_its_template_a_request_evicts_an_empty_slot_first_then_the_coldest():
    scheduler = make(count=3, held={0: "@a", 1: "@b"})
    clock = scheduler.clock
    for slot_template in ("@b", "@a"):  # @a used last: @b is the colder one
        scheduler.release(scheduler.submit(user(slot_template)))
        clock.now += 1

    assert scheduler.submit(user("@c")).slot == 2  # the empty one
    scheduler.slots.held[2] = ("@c", "digest", 0)
    assert scheduler.submit(user("@d")).slot == 1  # @b's, least recently used


def test_a_slot_of_a_version_before_an_edit_goes_to_templates_before_an_empty_one():
    versions = {"@a": "v2", "@b": "digest"}
    scheduler = make(count=3, held={1: "@b"})
    scheduler.slots.versions = versions.get
    scheduler.slots.held[0] = ("@a", "v1", 0)  # @a edited since
    scheduler.release(scheduler.submit(user(slot=2)))  # the empty one, used last

    # A plain request's last prompt is there, the chat template's start at least: kept to.
    assert scheduler.submit(user()).slot == 2
    assert scheduler.submit(user()).slot == 0  # then the old version's, not @b's
    scheduler.release(scheduler.busy[2])
    scheduler.release(scheduler.busy[0])

    assert scheduler.submit(Ticket(WARMUP, "@a")).slot == 0  # a template: the old version's


def test_a_templated_request_waits_briefly_for_its_busy_slot_rather_than_evict_another():
    # Issue 11.5: sent as soon as the previous answer ended, before its slot was given
    # back, a request was restored into the other slot and evicted that one's template.
    scheduler = make(count=2, held={0: "@a", 1: "@b"})
    previous = scheduler.submit(user("@a"))  # slot 0, its answer ending

    waiting = scheduler.submit(user("@a"))
    assert waiting.outcome == QUEUED  # slot 1 is free, but holds @b
    assert scheduler.invariants() == []
    # The slot it would fall back on is kept from those behind it.
    plain = scheduler.submit(user())
    assert plain.outcome == QUEUED
    assert scheduler.invariants() == []
    scheduler.release(previous)
    assert (waiting.outcome, waiting.slot) == (GRANTED, 0)
    assert (plain.outcome, plain.slot) == (GRANTED, 1)


def test_past_its_patience_a_templated_request_takes_another_template_s_slot():
    scheduler = make(count=2, held={0: "@a", 1: "@b"})
    scheduler.submit(user("@a"))  # slot 0, busy with a long answer
    waiting = scheduler.submit(user("@a"))

    scheduler.clock.now += PATIENCE
    scheduler.dispatch()

    assert (waiting.outcome, waiting.slot) == (GRANTED, 1)


def cold(template="@a", digest="v2", share=5.0):
    """A templated request that would evaluate its template (no slot or file holds it)."""
    return Ticket(USER, template, digest=digest, share=share)


def test_a_request_that_would_evaluate_its_template_waits_for_the_slot_evaluating_it():
    scheduler = make(count=2)
    first = scheduler.submit(cold())  # slot 0: evaluates @a's new version

    second = scheduler.submit(cold())

    assert second.outcome == QUEUED  # slot 1 is free, but evaluating @a again beside it
    assert scheduler.invariants() == []
    plain = scheduler.submit(user())  # ... and it keeps no slot from anyone
    assert (plain.outcome, plain.slot) == (GRANTED, 1)
    scheduler.slots.held[0] = ("@a", "v2", 0)  # first's answer left it there (Lease)
    scheduler.release(first)
    assert (second.outcome, second.slot) == (GRANTED, 0)


def test_a_warmup_of_the_version_under_way_is_waited_for_too():
    scheduler = make(count=2)
    warmup = scheduler.submit(Ticket(WARMUP, "@a"))
    warmup.digest = "v2"  # as Warmups.warm sets it once granted

    assert scheduler.submit(cold()).outcome == QUEUED


@pytest.mark.parametrize(
    "busy",
    [
        Ticket(USER, "@a", digest="v1"),  # another version of it
        Ticket(USER, "@b", digest="v2"),  # another template
        Ticket(USER),  # a plain request, even in a slot that held @a
    ],
    ids=["other version", "other template", "plain"],
)
def test_a_request_takes_a_free_slot_at_once_when_no_busy_slot_will_hold_its_version(busy):
    scheduler = make(count=2)
    scheduler.submit(busy)  # slot 0

    assert scheduler.submit(cold()).slot == 1  # empty: _shares alone decides


def test_a_request_of_a_version_before_an_edit_waits_for_its_like_no_more():
    versions = {"@a": "v2"}
    scheduler = make(count=2)
    scheduler.slots.versions = versions.get
    scheduler.submit(cold())  # evaluating v2 in slot 0
    waiting = scheduler.submit(cold())
    assert waiting.outcome == QUEUED

    versions["@a"] = "v3"  # edited: slot 0 will be left holding nothing of use
    scheduler.dispatch()  # as Backend.reload_templates does

    assert (waiting.outcome, waiting.slot) == (GRANTED, 1)
    assert scheduler.invariants() == []


def test_a_request_whose_version_a_free_slot_holds_takes_it_without_waiting():
    scheduler = make(count=3)
    assert scheduler.submit(cold()).slot == 0
    scheduler.slots.held[2] = ("@a", "v2", 0)  # another request of it just left it there

    assert scheduler.submit(cold()).slot == 2


def test_a_request_that_would_restore_or_evaluate_a_variant_does_not_wait():
    scheduler = make(count=2)
    scheduler.submit(cold())

    assert scheduler.submit(cold(share=0.0)).outcome == GRANTED


def test_past_its_share_a_request_evaluates_its_template_in_a_free_slot():
    scheduler = make(count=2)
    scheduler.submit(cold())  # slot 0, evaluating for long
    waiting = scheduler.submit(cold(share=3.0))

    scheduler.clock.now += 2.9
    scheduler.dispatch()
    assert waiting.outcome == QUEUED
    scheduler.clock.now += 0.1
    scheduler.dispatch()

    assert (waiting.outcome, waiting.slot) == (GRANTED, 1)


def test_acquire_evaluates_in_a_free_slot_once_its_share_is_over():
    scheduler = Scheduler(Slots(2), max_queue=4, max_wait=30)
    scheduler.submit(cold())  # slot 0, never released here
    started = time.monotonic()

    slot = gevent.spawn(scheduler.acquire, cold(share=0.3)).get(timeout=5)

    assert slot == 1
    assert time.monotonic() - started >= 0.3


def test_acquire_takes_the_slot_evaluating_its_version_when_that_request_ends():
    scheduler = Scheduler(Slots(2), max_queue=4, max_wait=30)
    first = scheduler.submit(cold())
    waiter = gevent.spawn(scheduler.acquire, cold(share=20.0))
    gevent.sleep(0.05)
    assert not waiter.dead

    scheduler.slots.held[0] = ("@a", "v2", 0)
    scheduler.release(first)

    assert waiter.get(timeout=1) == 0


def test_an_empty_free_slot_is_taken_at_once_while_the_template_s_slot_is_busy():
    scheduler = make(count=3, held={0: "@a", 1: "@b"})
    scheduler.submit(user("@a"))

    assert scheduler.submit(user("@a")).slot == 2  # evicts nothing: no reason to wait


def test_past_a_full_queue_a_templated_request_takes_a_free_slot_without_waiting():
    # Neither refused while a slot is free, nor waiting beyond max_queue.
    scheduler = make(count=2, held={0: "@a", 1: "@b"}, max_queue=0)
    scheduler.submit(user("@a"))

    later = scheduler.submit(user("@a"))

    assert (later.outcome, later.slot) == (GRANTED, 1)
    assert scheduler.invariants() == []


def test_a_request_that_names_a_slot_has_no_patience():
    scheduler = make(count=2, held={0: "@a", 1: "@b"})
    scheduler.submit(user("@a"))

    assert scheduler.submit(user("@a", slot=1)).slot == 1


def test_a_slot_an_unpinned_request_ran_in_is_not_foreign_after_its_release():
    # The read of /slots began while the unpinned request (granted 0, run in 1) was busy.
    scheduler = make(count=2)
    unpinned = scheduler.submit(user("@a"))
    unpinned.pinned = False
    before = scheduler.releases
    scheduler.slots.processing = {1}
    scheduler.release(unpinned)

    scheduler.update_foreign(before)

    assert scheduler.foreign == set()


def test_a_plain_request_leaves_hot_templates_alone_when_it_can():
    scheduler = make(count=2, held={0: "@a", 1: "@b"})
    clock = scheduler.clock
    scheduler.release(scheduler.submit(user("@b")))
    clock.now += 1
    scheduler.release(scheduler.submit(user("@a")))

    assert scheduler.submit(user()).slot == 1  # @b is colder than @a

    scheduler = make(count=3, held={0: "@a", 1: "@b"})
    assert scheduler.submit(user()).slot == 2  # an empty slot before any template


def test_a_request_that_names_a_slot_waits_for_that_one_without_holding_others_up():
    scheduler = make(count=2)
    running = scheduler.submit(user(slot=0))
    pinned = scheduler.submit(user(slot=0))
    other = scheduler.submit(user())

    assert (pinned.outcome, other.outcome, other.slot) == (QUEUED, GRANTED, 1)
    scheduler.release(running)
    assert (pinned.outcome, pinned.slot) == (GRANTED, 0)


def test_a_full_queue_refuses_users_but_not_warmups():
    scheduler = make(count=1, max_queue=2)
    scheduler.submit(user())
    waiting = [scheduler.submit(user()) for _ in range(2)]

    refused = scheduler.submit(user())
    warmup = scheduler.submit(Ticket(WARMUP, "@a"))

    assert [t.outcome for t in waiting] == [QUEUED, QUEUED]
    assert refused.outcome == FULL and refused.event.is_set()
    assert warmup.outcome == QUEUED
    assert len(scheduler.queue) == 3


def test_a_queue_of_length_zero_serves_only_free_slots():
    scheduler = make(count=1, max_queue=0)

    assert scheduler.submit(user()).outcome == GRANTED
    assert scheduler.submit(user()).outcome == FULL


def test_users_that_waited_longer_than_max_wait_are_refused():
    scheduler = make(count=1, max_wait=10)
    scheduler.submit(user())
    early = scheduler.submit(user())
    scheduler.clock.now += 6
    late = scheduler.submit(user())
    warmup = scheduler.submit(Ticket(WARMUP, "@a"))

    scheduler.clock.now += 4
    scheduler.expire()

    assert (early.outcome, late.outcome, warmup.outcome) == (TIMEOUT, QUEUED, QUEUED)
    assert early.event.is_set() and early not in scheduler.queue


def test_a_client_that_leaves_gives_its_place_to_the_next():
    scheduler = make(count=1)
    running = scheduler.submit(user())
    gone, next_one = scheduler.submit(user()), scheduler.submit(user())

    scheduler.leave(gone)
    scheduler.release(running)

    assert (gone.outcome, next_one.outcome) == (GONE, GRANTED)


def test_a_slot_count_that_grows_serves_the_queue():
    scheduler = make(count=1)
    scheduler.submit(user())
    waiting = scheduler.submit(user())

    scheduler.slots.count = 2
    scheduler.dispatch()

    assert (waiting.outcome, waiting.slot) == (GRANTED, 1)


def test_slots_busy_with_work_bioproxy_did_not_give_out_are_left_alone_until_idle():
    scheduler = make(count=2)
    mine = scheduler.submit(user())  # slot 0
    scheduler.slots.processing = {0, 1}  # slot 1: e.g. the old worker of a reload

    scheduler.update_foreign()
    waiting = scheduler.submit(user())
    scheduler.release(mine)

    assert scheduler.foreign == {1}
    assert (waiting.outcome, waiting.slot) == (GRANTED, 0)
    other = scheduler.submit(user())
    assert other.outcome == QUEUED
    scheduler.slots.processing = set()
    scheduler.update_foreign()
    assert (other.outcome, other.slot) == (GRANTED, 1)


def test_an_unpinned_request_running_in_another_slot_is_not_taken_for_foreign_work():
    # Sent without id_slot (nothing to restore its template from), llama-server ran the
    # request granted slot 0 in slot 1: only processing beyond bioproxy's count is foreign.
    scheduler = make(count=3)
    unpinned = scheduler.submit(user("@code"))
    unpinned.pinned = False
    scheduler.slots.processing = {1}

    scheduler.update_foreign()

    assert scheduler.foreign == set()
    scheduler.slots.processing = {1, 2}  # and one more task of someone else's
    scheduler.update_foreign()
    assert len(scheduler.foreign) == 1
    scheduler.release(unpinned)
    scheduler.update_foreign()  # all pinned again: slot by slot
    assert scheduler.foreign == {1, 2}


def test_releasing_twice_frees_the_slot_once():
    scheduler = make(count=1)
    first = scheduler.submit(user())
    scheduler.release(first)
    second = scheduler.submit(user())

    scheduler.release(first)

    assert scheduler.busy == {0: second}


def test_retry_after_grows_with_the_queue_and_the_time_slots_are_held():
    scheduler = make(count=1, max_queue=10)
    clock = scheduler.clock
    running = scheduler.submit(user())
    clock.now += 4
    scheduler.release(running)  # slots are held some 4 s
    scheduler.submit(user())

    assert scheduler.retry_after() == 4
    for _ in range(3):
        scheduler.submit(user())
    assert scheduler.retry_after() == 16


# Waiting, with gevent and the real clock.


def test_acquire_waits_until_a_slot_is_released():
    scheduler = Scheduler(Slots(1), max_queue=4, max_wait=5)
    running = Ticket()
    scheduler.acquire(running)
    waiter = gevent.spawn(scheduler.acquire, Ticket())
    gevent.sleep(0.01)
    assert not waiter.ready()

    scheduler.release(running)

    assert waiter.get(timeout=1) == 0


def test_acquire_raises_503s_for_a_full_queue_and_a_long_wait():
    scheduler = Scheduler(Slots(1), max_queue=1, max_wait=0.05)
    scheduler.acquire(Ticket())
    waiter = gevent.spawn(scheduler.acquire, Ticket())
    gevent.sleep(0)

    with pytest.raises(QueueFull) as full:
        scheduler.acquire(Ticket())
    with pytest.raises(QueueTimeout) as late:
        waiter.get(timeout=1)

    assert full.value.status == late.value.status == 503
    assert full.value.retry_after >= 1
    assert scheduler.queue == []


def test_acquire_takes_another_slot_once_its_patience_is_over():
    scheduler = Scheduler(Slots(2, {0: "@a", 1: "@b"}), max_queue=4, max_wait=30)
    scheduler.submit(user("@a"))  # slot 0, never released here
    started = time.monotonic()

    slot = gevent.spawn(scheduler.acquire, user("@a")).get(timeout=5)

    assert slot == 1
    assert time.monotonic() - started >= PATIENCE


def test_acquire_leaves_the_queue_at_once_when_the_client_goes():
    scheduler = Scheduler(Slots(1), max_queue=4, max_wait=30)
    scheduler.acquire(Ticket())
    waiter = gevent.spawn(scheduler.acquire, Ticket())
    gevent.sleep(0)

    # What the request's ClientWatch does when its client leaves.
    waiter.kill(ClientGone("the client left"), block=False)

    with pytest.raises(ClientGone):
        waiter.get(timeout=1)
    assert scheduler.queue == []


def test_a_drained_slot_waits_until_llama_server_shows_it_idle():
    slots = Slots(2)
    scheduler = Scheduler(slots, max_queue=4, max_wait=30)
    left, other = Ticket(), Ticket()
    scheduler.submit(left)
    scheduler.submit(other)
    scheduler.release(left, drain=True)  # its client left before the answer
    waiting = scheduler.submit(Ticket())
    assert waiting.outcome == QUEUED

    slots.processing = {left.slot}  # the next refresh: llama-server still at work there
    scheduler.update_foreign()
    assert waiting.outcome == QUEUED

    slots.processing = set()
    scheduler.update_foreign()
    assert waiting.outcome == GRANTED and waiting.slot == left.slot


def test_a_waiter_killed_in_the_queue_leaves_it():
    scheduler = Scheduler(Slots(1), max_queue=4, max_wait=30)
    running = Ticket()
    scheduler.acquire(running)
    ticket = Ticket()
    waiter = gevent.spawn(scheduler.acquire, ticket)
    gevent.sleep(0)

    waiter.kill()
    scheduler.release(running)

    assert ticket.outcome == GONE and scheduler.busy == {}


@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_random_traffic_never_shares_a_slot_and_serves_in_order(count):
    rng = random.Random(count)
    templates_ = ["@a", "@b", "@c", None]
    scheduler = make(count=count, max_queue=20, max_wait=5)
    granted, served = [], []
    for _ in range(2000):
        scheduler.clock.now += rng.random()
        roll = rng.random()
        if roll < 0.45:
            kind = WARMUP if rng.random() < 0.1 else USER
            scheduler.submit(Ticket(kind, rng.choice(templates_)))
        elif roll < 0.85 and granted:
            scheduler.release(granted.pop(rng.randrange(len(granted))))
        elif roll < 0.9 and scheduler.queue:
            scheduler.leave(rng.choice(scheduler.queue))
        elif roll < 0.93:  # a read of the slots: some busy for work bioproxy did not give out
            scheduler.slots.processing = {s for s in range(count) if rng.random() < 0.2}
            scheduler.update_foreign()
        scheduler.expire()  # as the waiters' own timers do
        assert scheduler.invariants() == []
        now_granted = [t for t in scheduler.busy.values() if t not in granted]
        granted += now_granted
        served += now_granted

        slots = [t.slot for t in granted]
        assert len(slots) == len(set(slots)) and all(0 <= s < count for s in slots)
        assert set(scheduler.busy.values()) == set(granted)
        if scheduler.queue:  # nobody waits while a slot is free
            assert len(scheduler.busy) + len(scheduler.foreign) >= count
        waiting_users = [t for t in scheduler.queue if t.priority == USER]
        assert len(waiting_users) <= 20
        assert all(scheduler.clock.now - t.arrived < 5 for t in waiting_users)
    users = [t for t in served if t.priority == USER]
    assert [t.order for t in users] == sorted(t.order for t in users)  # first come, first served


@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_random_traffic_with_templates_held_keeps_the_invariants_with_patience(count):
    # As the request path does: a templated request's slot holds its template once
    # released, so later ones of it prefer that slot and wait briefly while it is busy.
    rng = random.Random(100 + count)
    templates_ = ["@a", "@b", "@c", "@a v1", None]
    scheduler = make(count=count, max_queue=20, max_wait=5)
    granted, plain, patient_waits = [], [], 0
    for _ in range(3000):
        scheduler.clock.now += rng.random() * 0.15  # often within PATIENCE of the last
        roll = rng.random()
        if roll < 0.45:
            template = rng.choice(templates_)
            if rng.random() < 0.1:
                ticket = Ticket(WARMUP, template, digest="digest")
            elif template is not None and rng.random() < 0.3:  # it would evaluate it
                ticket = Ticket(USER, template, digest="digest", share=rng.uniform(0.1, 1))
            else:
                ticket = Ticket(USER, template)
            scheduler.submit(ticket)
        elif roll < 0.85 and granted:
            ticket = granted.pop(rng.randrange(len(granted)))
            if ticket.template is not None:
                scheduler.slots.held[ticket.slot] = (ticket.template, "digest", 0)
            else:
                scheduler.slots.held.pop(ticket.slot, None)
            scheduler.release(ticket)
        elif roll < 0.9 and scheduler.queue:
            scheduler.leave(rng.choice(scheduler.queue))
        elif roll < 0.93:
            scheduler.slots.processing = {s for s in range(count) if rng.random() < 0.2}
            scheduler.update_foreign()
        scheduler.expire()
        scheduler.dispatch()  # as a patient waiter's own timer does when its patience ends
        assert scheduler.invariants() == []
        now_granted = [t for t in scheduler.busy.values() if t not in granted]
        granted += now_granted
        plain += [t for t in now_granted if t.priority == USER and t.template is None]
        slots = [t.slot for t in granted]
        assert len(slots) == len(set(slots))
        free = count - len(scheduler.busy) - len(scheduler.foreign)
        if scheduler.queue and free > 0:  # a slot is free while tickets wait: patience only
            assert any(scheduler._patience_left(t) for t in scheduler.queue)
            patient_waits += 1
        if free > 0:  # no user waits beyond its patience (warmups may, behind users)
            now, queue = scheduler.clock.now, scheduler.queue
            users = [t for t in queue if t.priority == USER and t.wanted is None]
            assert all(now - t.arrived < max(PATIENCE, t.share) for t in users)
    assert patient_waits > 0  # the patience was exercised
    assert [t.order for t in plain] == sorted(t.order for t in plain)


def test_a_slot_released_during_a_refresh_is_not_taken_for_foreign_work():
    scheduler = make(count=2)
    mine = scheduler.submit(user())  # slot 0
    before = scheduler.releases  # a refresh begins: GET /slots shows slot 0 processing
    scheduler.slots.processing = {0}
    scheduler.release(mine)  # ... and the request ends before the answer is read

    scheduler.update_foreign(before)

    assert scheduler.foreign == set()
    scheduler.update_foreign()  # a later refresh that still sees it busy: foreign
    assert scheduler.foreign == {0}


def test_with_no_queue_a_request_for_a_busy_named_slot_is_refused():
    scheduler = make(count=2, max_queue=0)
    scheduler.submit(user(slot=0))

    assert scheduler.submit(user(slot=0)).outcome == FULL
    assert scheduler.submit(user(slot=1)).outcome == GRANTED


def test_retry_after_is_about_requests_not_warmups():
    scheduler = make(count=1, max_queue=10)
    warmup = scheduler.submit(Ticket(WARMUP, "@a"))
    scheduler.clock.now += 50
    scheduler.release(warmup)

    assert scheduler.retry_after() == 1


def test_a_cut_answer_s_slot_holds_its_template_once_idle_with_its_task_still_last():
    table = SlotTable()
    table.settle(0, "@a", "v2", (7, True, None))  # llama-server still at its next token
    assert table.holding(0) is None and 0 in table.settling

    table.observe({0: (7, True, 1700)})
    assert table.holding(0) is None
    table.observe({0: (7, False, 1703)})

    assert table.held[0] == ("@a", "v2", 7, 1703)
    assert table.settling == {}


def test_a_slot_holding_a_version_before_an_edit_holds_nothing_until_the_edit_is_undone():
    versions = {"@a": "v2", "@b": "w1"}
    table = SlotTable(versions.get)
    table.mark(0, "@a", "v2", (7, False, 1703))
    table.mark(1, "@a", partial_digest("v2", 700), (8, False, 300))
    table.mark(2, "@a 1a2b3c4d5e6f7a8b", "v2", (9, False, 1800))  # a variant of it
    table.mark(3, "@b", "w1", (10, False, 900))
    table.count = 4

    versions["@a"] = "v3"
    assert [table.holding(s) for s in range(4)] == [None, None, None, "@b"]
    assert not table.partial(1) and table.whole(3) == "@b"
    table.mark(4, "@a", "v2", (11, False, 1703))  # a request read before the edit ends
    assert table.holding(4) is None

    versions["@a"] = "v2"  # the edit undone: no other task ran in those slots
    assert [table.holding(s) for s in range(5)] == ["@a", "@a", "@a 1a2b3c4d5e6f7a8b", "@b", "@a"]
    assert table.partial(1) and table.whole(1) is None
    versions["@b"] = None  # broken

    assert table.holding(3) is None


def test_a_cut_answer_s_slot_where_another_task_ran_holds_nothing():
    table = SlotTable()
    table.settle(0, "@a", "v2", (7, True, None))

    table.observe({0: (9, False, 40)})

    assert table.holding(0) is None and table.settling == {}


def test_a_cut_answer_s_slot_in_an_unknown_state_or_a_new_server_s_holds_nothing():
    table = SlotTable()
    table.settle(0, "@a", "v2", (None, None, None))
    table.settle(1, "@a", "v2", (-1, False, None))

    assert table.settling == {} and table.held == {}


def test_a_request_waits_for_the_slot_its_version_settles_in():
    scheduler = make(count=2)
    scheduler.slots.settle(0, "@a", "v2", (7, True, None))
    scheduler.foreign.add(0)  # drained: llama-server is still at work there

    waiting = scheduler.submit(cold())
    assert waiting.outcome == QUEUED  # slot 1 is free, but would evaluate @a again
    assert scheduler.submit(cold("@b")).outcome == GRANTED  # slot 1, at once

    scheduler.slots.observe({0: (7, False, 1703)})  # any read of the slots settles it
    scheduler.dispatch()  # (a release elsewhere) before the watcher's pass sees it idle
    assert waiting.outcome == QUEUED  # held there now, still foreign: it waits on
    scheduler.slots.processing = set()
    scheduler.update_foreign()
    assert (waiting.outcome, waiting.slot) == (GRANTED, 0)


def test_a_warmup_that_would_evaluate_waits_for_a_request_of_its_version():
    scheduler = make(count=2)
    running = scheduler.submit(cold())  # slot 0: leaves @a's new version there

    warmup = scheduler.submit(Ticket(WARMUP, "@a", digest="v2", share=5.0))

    assert warmup.outcome == QUEUED
    scheduler.slots.held[0] = ("@a", "v2", 0)
    scheduler.release(running)
    assert (warmup.outcome, warmup.slot) == (GRANTED, 0)
