"""StopChecker: the engine core's half of stopping, on token ids alone.

A sequence stops on (in this order) EOS (unless ignore_eos), one of its
stop_token_ids, max_tokens, or max_model_len. EOS and stop ids only count once
min_tokens tokens were generated. Stop strings need the text, so the output
processor checks them (output_processor.py) and tells the engine which
sequences they ended.
"""

from __future__ import annotations

from loraplex.core.sequence import Sequence


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int) -> None:
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def stop_ids_for(self, seq: Sequence) -> set[int]:
        """Token ids that would end `seq` (what min_tokens must mask)."""
        params = seq.sampling_params
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def max_num_tokens(self, num_prompt_tokens: int, params) -> int:
        """The length at which a sequence finishes with "length" (prompt + max_tokens, capped)."""
        if params.max_tokens is None:
            return self.max_model_len
        return min(self.max_model_len, num_prompt_tokens + params.max_tokens)

    def append_token(self, seq: Sequence, token_id: int) -> None:
        """Append token_id to seq; set seq.finish_reason / stop_reason when it ends here."""
        params = seq.sampling_params
        seq.token_ids.append(token_id)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif may_stop and token_id in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id
        elif seq.num_tokens >= seq.max_num_tokens:
            seq.finish_reason, seq.stop_reason = "length", None
