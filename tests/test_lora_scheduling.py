"""The scheduler's LoRA admission: pinned adapters hold slots, and a refused adapter is not starved."""

from __future__ import annotations

from loraplex.core.scheduler import MaxLorasAdmission
from loraplex.core.sequence import Sequence
from loraplex.lora_request import LoRARequest


def seq(seq_id: int, lora_id: int | None) -> Sequence:
    s = Sequence(seq_id=seq_id, token_ids=[1, 2, 3], num_prompt_tokens=3, arrival_index=seq_id)
    s.lora_request = None if lora_id is None else LoRARequest(f"a{lora_id}", lora_id, f"/adapters/a{lora_id}")
    return s


def test_pinned_adapters_count_against_max_loras():
    pinned = {9}
    policy = MaxLorasAdmission(2, pinned=lambda: set(pinned))
    policy.begin_step([seq(0, 1)])
    assert policy.can_admit(seq(1, 9))           # pinned: it has its slot already
    assert policy.can_admit(seq(2, 1))           # running: shares its slot
    assert policy.can_admit(seq(3, None))        # base model needs no slot
    assert not policy.can_admit(seq(4, 2))       # slots: adapter 1 + pinned 9
    assert not policy.can_admit(seq(5, 1))       # refused one goes first: no overtaking
    assert policy.can_admit(seq(6, None))
    pinned.clear()                               # unpinned (removed): its slot is free again
    policy.begin_step([seq(0, 1)])
    assert policy.can_admit(seq(4, 2))


def test_without_pins_the_cap_is_max_loras():
    policy = MaxLorasAdmission(2)
    policy.begin_step([])
    assert policy.can_admit(seq(0, 1)) and policy.can_admit(seq(1, 2))
    assert not policy.can_admit(seq(2, 3))


def test_slot_holders_drain_their_waiting_requests_then_the_refused_adapter_gets_a_slot():
    policy = MaxLorasAdmission(2)
    waiting = [seq(0, 1), seq(1, 2), seq(2, 3), seq(3, 1), seq(4, 2)]
    policy.begin_step([], waiting)
    assert [policy.can_admit(s) for s in waiting] == [True, True, False, True, True]
    # Later arrivals for the slot holders wait behind the refused adapter 3.
    late = [seq(5, 1), seq(6, 2)]
    policy.begin_step(waiting[:2] + waiting[3:], [waiting[2]] + late)
    assert [policy.can_admit(s) for s in [waiting[2]] + late] == [False, False, False]
    assert policy.can_admit(seq(7, None))
    # Adapter 2's requests finished: its slot goes to adapter 3, not to the late one of
    # adapter 2; with no one refused before it, the late one of adapter 1 joins again.
    policy.begin_step([waiting[0], waiting[3]], [waiting[2]] + late)
    assert [policy.can_admit(s) for s in [waiting[2]] + late] == [True, True, False]
