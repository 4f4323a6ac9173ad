"""The scheduler's LoRA admission: pinned adapters hold slots, and a refused adapter is not starved."""

from __future__ import annotations

from loraplex.core.scheduler import MaxLorasAdmission
from loraplex.core.sequence import Sequence
from loraplex.lora_request import LoRARequest


def seq(seq_id: int, lora_id: int | None) -> Sequence:
    s = Sequence(seq_id=seq_id, token_ids=[1, 2, 3], num_prompt_tokens=3)
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
