"""Structured outputs, the engine's half: one grammar matcher per sequence, and each step's masks.

GrammarState lives in the EngineCore. Once per step, for the rows whose sequence has a grammar,
it fills their next-token bitmasks on the host (llguidance, in parallel, in Rust) and hands
them to the sampler, which applies them on the device; when the step's tokens are known it
advances the matchers. Rows without a grammar cost nothing.

With overlapped scheduling this needs no extra wait: the engine samples step N+1 after it has
read step N's tokens (engine_core.py), so a row's matcher has seen every token before its next
mask is computed, and the masks are filled while the device runs step N+1's forward pass.
The request's half (the constraint, compiled and validated) is core/structured_output.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loraplex.core.structured_output import llguidance
from loraplex.core.transfer import device_tensor
from loraplex.errors import InvalidRequestError

logger = logging.getLogger(__name__)


@dataclass
class GrammarMasks:
    """The step's grammar masks: rows[i] of the batch may take the tokens whose bits are set in bitmask[i]."""
    rows: list[int]
    bitmask: torch.Tensor        # [len(rows), ceil(vocab / 32)] int32, on the logits' device


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[m, words] int32 bitmask -> [m, vocab_size] bool (True: allowed), on the bitmask's device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1                        # [m, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


class GrammarState:
    """The engine's grammar matchers: one per sequence that has a grammar (seq.grammar)."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: set[int], device: torch.device) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = device
        self._tokenizer = None          # llguidance's view of the vocabulary, built on first use
        self._executor = None

    def _ll_tokenizer(self):
        if self._tokenizer is None:
            llg = llguidance()
            path = self.model_dir / "tokenizer.json"
            if not path.is_file():
                raise InvalidRequestError(f"structured outputs need the model's tokenizer.json, which "
                                          f"{str(self.model_dir)!r} does not have")
            text = path.read_text()
            from tokenizers import Tokenizer
            n_vocab = max(self.vocab_size, Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True))
            self._tokenizer = llg.LLTokenizer(text, n_vocab=n_vocab, eos_token=self.eos_token_ids or None)
            # Masks are filled on two threads at most: the engine's host work shares the CPU.
            self._executor = llg.LLExecutor(num_threads=2)
        return self._tokenizer

    def start(self, grammar: str):
        """A new matcher for `grammar` (compile_grammar's text)."""
        matcher = llguidance().LLMatcher(self._ll_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"structured outputs: the grammar cannot be used: {matcher.get_error()}")
        return matcher

    def masks(self, seqs: list) -> GrammarMasks | None:
        """The next-token masks of the rows whose sequence has a grammar (None when none has)."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return None
        words = (self._tokenizer.vocab_size + 31) // 32
        host = np.zeros((len(rows), words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr([(seqs[row].grammar, i) for i, row in enumerate(rows)],
                                               host.ctypes.data, words * 4, len(rows))
        return GrammarMasks(rows, device_tensor(host, torch.int32, self.device))

    def accept(self, seq, token_id: int) -> bool:
        """Advance seq's matcher by its new token; True when nothing more can be generated under the
        grammar, so the sequence must stop: it took the EOS that ends a complete output (which
        stops it anyway unless ignore_eos), or it broke. A complete output's next mask allows EOS
        alone, so the output ends with EOS, as vLLM's does."""
        matcher = seq.grammar
        if not matcher.consume_token(token_id):
            logger.error("request %s: the grammar refused token %d that its mask allowed (%s); stopping it",
                         seq.request_id, token_id, matcher.get_error())
            return True
        return matcher.is_stopped() and token_id in self.eos_token_ids
