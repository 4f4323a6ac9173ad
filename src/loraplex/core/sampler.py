"""Sampler: turns a batch of next-token logits into tokens, with batched tensor ops.

Order of processing (vLLM's): min_tokens mask -> repetition penalty ->
frequency/presence penalties -> greedy argmax, or temperature -> top-k ->
top-p -> min-p -> sample. Returned logprobs come from the raw logits (the
log-softmax of what the model produced, before any of the above), as vLLM does
by default.

Randomness: a seeded sequence draws from its own torch.Generator, so its tokens
depend only on its seed and its own history, never on what else is in the
batch. Unseeded sequences share the engine's generator.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) picks token i
with probability p_i, and needs one [vocab] draw per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.core.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float                                # raw logprob of the sampled token
    rank: int                                     # its rank among raw logprobs, 1 = best
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first


def _pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _token_counts(rows: list[list[int]], vocab: int, device) -> torch.Tensor:
    """[batch, vocab] occurrence counts; ids >= vocab (padding) land in a dropped column."""
    ids = _pad(rows, vocab, device)                                   # [batch, max_len]
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


class Sampler:
    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator   # for unseeded sequences; None: torch's global one

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence],
                 stop_ids: list[set[int]]) -> list[SampledToken]:
        """logits: [batch, vocab] float32, row i for seqs[i]. stop_ids[i]: ids that end seqs[i]
        (masked while it has fewer than min_tokens output tokens)."""
        logits = logits.float()
        batch, vocab = logits.shape
        device = logits.device
        params = [s.sampling_params for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1)              # [batch, vocab]
        logits = logits.clone()

        # min_tokens: forbid stopping too early.
        for i, (seq, p) in enumerate(zip(seqs, params)):
            if seq.num_output_tokens < p.min_tokens and stop_ids[i]:
                ids = torch.tensor(sorted(t for t in stop_ids[i] if t < vocab), dtype=torch.long)
                logits[i, ids.to(device)] = float("-inf")

        logits = apply_penalties(logits, seqs)
        greedy = torch.tensor([p.is_greedy for p in params], device=device)
        tokens = logits.argmax(dim=-1)                                 # [batch]
        if not bool(greedy.all()):
            sampled = self._sample(logits, seqs, params)
            tokens = torch.where(greedy, tokens, sampled)

        return self._collect(tokens, raw_logprobs, params)

    def _sample(self, logits, seqs, params) -> torch.Tensor:
        """Token per row drawn from the filtered distribution (greedy rows get a dummy value)."""
        probs = filtered_probs(logits, params)                         # [batch, vocab]
        vocab, device = probs.shape[1], probs.device
        # Exponential race. Seeded rows draw from their own generator, one row at a time.
        q = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if unseeded:
            q_shared = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=self.generator)
            q[unseeded] = q_shared
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i].exponential_(generator=s.generator)
        return (probs / q.clamp_min(1e-20)).argmax(dim=-1)

    def _collect(self, tokens, raw_logprobs, params) -> list[SampledToken]:
        rows = torch.arange(len(params), device=tokens.device)
        chosen = raw_logprobs[rows, tokens]                                      # [batch]
        ranks = (raw_logprobs > chosen[:, None]).sum(dim=-1) + 1                  # [batch]
        k_max = max((p.logprobs or 0) for p in params)
        top_vals = top_ids = None
        if k_max > 0:
            top_vals, top_ids = raw_logprobs.topk(min(k_max, raw_logprobs.shape[-1]), dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        tokens_l, chosen_l, ranks_l = tokens.tolist(), chosen.tolist(), ranks.tolist()
        out = []
        for i, p in enumerate(params):
            top = None
            if p.logprobs is not None:
                k = p.logprobs
                top = list(zip(top_ids[i][:k], top_vals[i][:k])) if k else []
            out.append(SampledToken(tokens_l[i], chosen_l[i], ranks_l[i], top))
        return out


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[batch, vocab] probabilities after temperature, top-k, top-p and min-p (rows sum to 1).

    top-p keeps the smallest set of most likely tokens whose mass reaches top_p;
    min-p drops tokens less likely than min_p times the most likely one.
    """
    batch, vocab = logits.shape
    device = logits.device
    temp = torch.tensor([p.temperature if not p.is_greedy else 1.0 for p in params], device=device)
    logits = logits / temp[:, None]

    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)   # [batch, vocab]
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass of strictly better tokens; the best token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    probs = logits.softmax(dim=-1)                                 # [batch, vocab]
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    # Renormalized so each row is the distribution actually sampled from.
    return probs / probs.sum(dim=-1, keepdim=True)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens) penalties."""
    params = [s.sampling_params for s in seqs]
    batch, vocab = logits.shape
    device = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    use_rep = bool((rep != 1.0).any())
    if not use_rep and not bool((freq != 0).any()) and not bool((pres != 0).any()):
        return logits
    output_counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
    if use_rep:
        prompt_seen = _token_counts([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab, device) > 0
        seen = prompt_seen | (output_counts > 0)                   # [batch, vocab]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    logits = logits - freq * output_counts - pres * (output_counts > 0).float()
    return logits
