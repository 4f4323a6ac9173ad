"""Where a step's time went (EngineCore.last_step) and the info line of a slow step."""

from __future__ import annotations

import logging

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.step_times import SLOW_STEP_S, StepTimes, log_if_slow


def test_a_slow_step_is_logged_with_where_its_time_went(caplog):
    caplog.set_level(logging.INFO, logger="loraplex.core.step_times")
    log_if_slow(StepTimes(SLOW_STEP_S * 0.6, SLOW_STEP_S * 0.3, 64, 64, 0))       # 90% of the bound: quiet
    assert "slow engine step" not in caplog.text
    log_if_slow(StepTimes(0.223, 0.011, 1, 128, 1))
    assert ("slow engine step: 223 ms launching 1 sequences (128 tokens, 1 adapters copied into slots), "
            "11 ms finishing the step before") in caplog.text


def test_each_step_counts_the_adapters_it_copies_into_slots(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama")
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
              block_size=4, max_model_len=64, kv_cache_bytes=1 << 20)
    loras = [LoRARequest(name, i + 1, str(write_peft_adapter(tmp_path / name, rank=8, seed=i,
                                                              base_model_name_or_path=str(model_dir))))
             for i, name in enumerate(["first", "second"])]
    core = llm.llm_engine.core
    steps, real_step = [], core.step

    def step():
        outputs = real_step()
        steps.append(core.last_step)
        return outputs

    core.step = step
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 2, params, lora_request=loras, use_tqdm=False)
    assert steps[0].num_slot_writes == 2 and steps[0].num_seqs == 2 and steps[0].num_tokens == 6
    assert all(s.num_slot_writes == 0 for s in steps[1:]) and all(s.launch_s >= 0 for s in steps)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, lora_request=loras[0], use_tqdm=False)
    assert sum(s.num_slot_writes for s in steps) == 2          # still in its slot: no copy
