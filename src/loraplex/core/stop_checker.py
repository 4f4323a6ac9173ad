"""StopChecker: appends a sampled token to a sequence and decides whether it finished.

A sequence stops on (in this order) EOS (unless ignore_eos), one of its
stop_token_ids, a stop string, max_tokens, or max_model_len. EOS, stop ids and
stop strings only count once min_tokens tokens were generated. A stop token's
text and a stop string are left out of the output text unless
include_stop_str_in_output.

Stop strings are searched in the decoded text, so they are found across token
boundaries. While a sequence runs, its visible text lags the decoded text by
(longest stop string - 1) characters: a stop string's first characters are
never streamed and then taken back.
"""

from __future__ import annotations

from loraplex.core.sequence import Sequence


def _held_back(params) -> int:
    if params.include_stop_str_in_output or not params.stop_strings:
        return 0
    return max(len(s) for s in params.stop_strings) - 1


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

    def append_token(self, seq: Sequence, token_id: int) -> None:
        """Append token_id to seq; set seq.finish_reason / stop_reason when it ends here."""
        params = seq.sampling_params
        seq.token_ids.append(token_id)
        may_stop = seq.num_output_tokens >= params.min_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif may_stop and token_id in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token_id

        detok = seq.detokenizer
        if detok is None:
            self._check_length(seq)
            return
        previous_len = len(detok.text)
        if seq.finish_reason is None or params.include_stop_str_in_output:
            detok.add_token(token_id)
        if seq.finish_reason is None:
            self._check_length(seq)
        if seq.finish_reason is not None:
            detok.finish()
        if may_stop and params.stop_strings and seq.finish_reason != "stop":
            self._check_stop_strings(seq, previous_len)

    def _check_length(self, seq: Sequence) -> None:
        max_tokens = seq.sampling_params.max_tokens
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            seq.finish_reason, seq.stop_reason = "length", None

    def _check_stop_strings(self, seq: Sequence, previous_len: int) -> None:
        detok = seq.detokenizer
        params = seq.sampling_params
        best = None
        for stop in params.stop_strings:
            # Only matches that end in the new text; earlier ones were checked before.
            start = max(0, previous_len - len(stop) + 1)
            pos = detok.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[1]):
                best = (stop, pos)
        if best is None:
            return
        stop, pos = best
        end = pos + len(stop) if params.include_stop_str_in_output else pos
        detok.text = detok.text[:end]
        seq.finish_reason, seq.stop_reason = "stop", stop

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """The output text a consumer may see now (append-only from step to step)."""
        if seq.detokenizer is None:
            return ""
        text = seq.detokenizer.text
        if seq.finish_reason is not None:
            return text
        hold = _held_back(seq.sampling_params)
        return text[:max(0, len(text) - hold)]
