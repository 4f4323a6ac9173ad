"""Sampler: turns a batch of next-token logits into tokens, with batched tensor ops.

Order of processing (vLLM's): structured-output grammar mask -> allowed_token_ids ->
bad words -> min_tokens mask -> logit_bias -> repetition penalty -> frequency/presence
penalties -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> sample.
Returned logprobs come from the raw logits (the log-softmax of what the model produced,
with only the grammar's mask applied, before anything else above), as vLLM does by
default, and are computed only for the rows whose request asked for them.

The logits arrive in the model's dtype (bfloat16 on a GPU) and are widened to float32
for every stage above; a batch that is all greedy, with nothing that changes logits and
no logprobs (the common case, and offline batches), takes the argmax of the model's own
logits: the same tokens, without a float32 copy of the whole batch's logits per step.

Token controls (logit_bias, allowed_token_ids, bad words) are turned into host tensors
once per request (TokenControls, built when the request is added); each step gathers
those of the rows that have them into one index tensor per kind, and the device applies
them in one scatter each. The grammar masks come filled by the engine
(structured_output.GrammarState) as one bitmask of the grammar rows. A grammar row that
the other controls leave without any allowed token (min_tokens forbidding the EOS the
grammar requires, say) falls back to the grammar's mask alone, decided on the device.

The result stays on the device (SamplerOutput): the engine feeds the sampled ids
to the next step without the host reading them, and copies them back with one
non-blocking copy per step (SamplerOutput.to_host). Nothing here waits for the
device: every decision that depends on the batch's parameters is taken on the
host, from the parameters themselves, and host values go to the device with
non-blocking copies (transfer.device_tensor).

Randomness: a seeded sequence draws from its own torch.Generator, so its tokens
depend only on its seed and its own history, never on what else is in the
batch. Unseeded sequences share the engine's generator.

Sampling uses the exponential race: argmax(p / q) with q ~ Exp(1) picks token i
with probability p_i, and needs one [vocab] draw per sequence.

Each stage is a function of (logits, the rows' sequences); a new sampling
parameter is one more stage in __call__, applied only when some row uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.core.sequence import Sequence
from loraplex.core.grammar import GrammarMasks, bitmask_to_bool
from loraplex.core.transfer import device_tensor


class TokenControls:
    """A request's logit_bias, allowed_token_ids and bad words as host tensors, built once."""

    def __init__(self, params) -> None:
        bias = params.logit_bias or {}
        self.bias_ids = torch.tensor(list(bias), dtype=torch.long) if bias else None
        self.bias_values = torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None
        allowed = params.allowed_token_ids
        self.allowed_ids = torch.tensor(allowed, dtype=torch.long) if allowed else None
        self.bad_words = params.bad_words_token_ids or []

    @staticmethod
    def for_params(params) -> TokenControls | None:
        if params.logit_bias or params.allowed_token_ids or params.bad_words_token_ids:
            return TokenControls(params)
        return None

    def banned_now(self, output_token_ids: list[int]) -> list[int]:
        """Last tokens of bad words whose other tokens end the output (vLLM's rule: only the
        output counts, not the prompt)."""
        banned = []
        for ids in self.bad_words:
            prefix = len(ids) - 1
            if prefix > len(output_token_ids):
                continue
            if prefix == 0 or output_token_ids[-prefix:] == ids[:-1]:
                banned.append(ids[-1])
        return banned


@dataclass
class SampledLogprobs:
    """Raw logprobs of the rows that asked for them (rows[i] is the batch row of entry i)."""
    rows: list[int]
    chosen: torch.Tensor        # [m] float32: logprob of the sampled token
    ranks: torch.Tensor         # [m] int64: its rank, 1 = most likely
    top_ids: torch.Tensor       # [m, k] int64, best first (k = the largest logprobs asked)
    top_values: torch.Tensor    # [m, k] float32


@dataclass
class HostSamples:
    """What the host reads back of one step: token ids, and logprobs by batch row."""
    token_ids: list[int]
    # row -> (logprob, rank, [(token id, logprob)] of the top k), for rows that asked
    logprobs: dict[int, tuple[float, int, list[tuple[int, float]]]]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                 # [batch] int64 on the logits' device
    logprobs: SampledLogprobs | None = None
    top_k: list[int] | None = None          # per logprobs row: how many top entries it asked for

    def to_host(self) -> HostCopy:
        """Start copying the results to the host (non-blocking); HostCopy.wait() reads them."""
        return HostCopy(self)


class HostCopy:
    """The device-to-host copy of one step's samples, started at construction.

    On CUDA the copies go into page-locked buffers and an event marks their end, so the
    host goes on working until it needs the values; on the CPU they are already there.
    """

    def __init__(self, out: SamplerOutput) -> None:
        self._top_k = out.top_k
        self._rows = out.logprobs.rows if out.logprobs is not None else []
        tensors = [out.token_ids]
        if out.logprobs is not None:
            lp = out.logprobs
            tensors += [lp.chosen, lp.ranks, lp.top_ids, lp.top_values]
        self._event = None
        if out.token_ids.device.type == "cuda":
            copies = []
            for t in tensors:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                copies.append(host)
            tensors = copies
            self._event = torch.cuda.Event()
            self._event.record()
        self._tensors = tensors

    def wait(self) -> HostSamples:
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._tensors[0].tolist()
        logprobs = {}
        if self._rows:
            chosen, ranks, top_ids, top_values = (t.tolist() for t in self._tensors[1:])
            for i, row in enumerate(self._rows):
                k = self._top_k[i]
                logprobs[row] = (chosen[i], ranks[i], list(zip(top_ids[i][:k], top_values[i][:k])))
        return HostSamples(token_ids, logprobs)


def _pad(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return device_tensor(out, torch.long, torch.device(device))


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
                 stop_ids: list[set[int]], grammar: GrammarMasks | None = None) -> SamplerOutput:
        """logits: [batch, vocab] in the model's dtype, row i for seqs[i]. stop_ids[i]: ids that end
        seqs[i] (masked while it has fewer than min_tokens output tokens). grammar: the
        structured-output masks of the rows that have a grammar."""
        device = logits.device
        params = [s.sampling_params for s in seqs]
        # min_tokens: forbid stopping too early.
        rows, ids = [], []
        for i, (seq, p) in enumerate(zip(seqs, params)):
            if seq.num_output_tokens < p.min_tokens and stop_ids[i]:
                stop = [t for t in stop_ids[i] if t < logits.shape[1]]
                rows += [i] * len(stop)
                ids += stop
        controlled = any(s.token_controls is not None for s in seqs)
        if (grammar is None and not rows and not controlled and not uses_penalties(params)
                and all(p.is_greedy and p.logprobs is None for p in params)):
            # Nothing changes the logits: the argmax of the model's own (bfloat16) logits is the
            # argmax of their float32 widening (exact, ties to the first index either way),
            # without widening 128 x 128,256 of them every step.
            return SamplerOutput(logits.argmax(dim=-1))
        logits = logits.float()
        if grammar is not None:
            logits = apply_grammar(logits, grammar)
        raw = logits
        if rows or controlled:
            # Changed in place below; `raw` stays as it was, for logprobs and the grammar (with
            # float32 models it is the caller's tensor: the decode graph's static output).
            logits = logits.clone()
        apply_token_controls(logits, seqs)
        if rows:
            logits.index_put_((device_tensor(rows, torch.long, device), device_tensor(ids, torch.long, device)),
                              torch.tensor(float("-inf"), device=device))
        logits = apply_penalties(logits, seqs)
        if grammar is not None:
            logits = keep_a_grammar_token(logits, raw, grammar)
        tokens = logits.argmax(dim=-1)                                 # [batch]
        greedy = [p.is_greedy for p in params]
        if not all(greedy):
            sampled = self._sample(logits, seqs, params)
            tokens = torch.where(device_tensor(greedy, torch.bool, device), tokens, sampled)

        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return SamplerOutput(tokens)
        top_k = [params[i].logprobs for i in rows]
        return SamplerOutput(tokens, raw_logprobs(raw, tokens, rows, max(top_k)), top_k)

    def _sample(self, logits, seqs, params) -> torch.Tensor:
        """Token per row drawn from the filtered distribution (greedy rows get a dummy value)."""
        probs = filtered_probs(logits, params)                         # [batch, vocab]
        vocab, device = probs.shape[1], probs.device
        # Exponential race. Seeded rows draw from their own generator, one row at a time.
        q = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(unseeded) == len(seqs):
            q.exponential_(generator=self.generator)
        elif unseeded:
            q_shared = torch.empty(len(unseeded), vocab, device=device).exponential_(generator=self.generator)
            q[device_tensor(unseeded, torch.long, device)] = q_shared
        for i, s in enumerate(seqs):
            if s.generator is not None:
                q[i].exponential_(generator=s.generator)
        return (probs / q.clamp_min(1e-20)).argmax(dim=-1)


def apply_grammar(logits: torch.Tensor, grammar: GrammarMasks) -> torch.Tensor:
    """logits with every token the rows' grammars forbid at -inf (a new tensor)."""
    index = device_tensor(grammar.rows, torch.long, logits.device)
    allowed = bitmask_to_bool(grammar.bitmask, logits.shape[1])                 # [m, vocab]
    masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, index, masked)


def keep_a_grammar_token(logits: torch.Tensor, grammar_logits: torch.Tensor, grammar: GrammarMasks) -> torch.Tensor:
    """Grammar rows left with no allowed token by the other controls take the grammar's logits alone."""
    index = device_tensor(grammar.rows, torch.long, logits.device)
    rows = logits.index_select(0, index)
    dead = torch.isneginf(rows).all(dim=-1, keepdim=True)                    # [m, 1], decided on the device
    return logits.index_copy(0, index, torch.where(dead, grammar_logits.index_select(0, index), rows))


def apply_token_controls(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """allowed_token_ids, bad words and logit_bias, in place; one scatter per kind for the whole batch."""
    controlled = [(i, s.token_controls) for i, s in enumerate(seqs) if s.token_controls is not None]
    if not controlled:
        return
    device, vocab = logits.device, logits.shape[1]
    allowed = [(i, c.allowed_ids) for i, c in controlled if c.allowed_ids is not None]
    if allowed:
        rows = device_tensor([i for i, _ in allowed], torch.long, device)
        ids = torch.cat([a for _, a in allowed])
        which = torch.repeat_interleave(torch.arange(len(allowed)), torch.tensor([len(a) for _, a in allowed]))
        keep = torch.zeros(len(allowed), vocab, dtype=torch.bool, device=device)
        keep[device_tensor(which, torch.long, device), device_tensor(ids, torch.long, device)] = True
        logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill(~keep, float("-inf")))
    banned_rows, banned_ids = [], []
    for i, c in controlled:
        if c.bad_words:
            banned = c.banned_now(seqs[i].output_token_ids)
            banned_rows += [i] * len(banned)
            banned_ids += banned
    if banned_rows:
        logits.index_put_((device_tensor(banned_rows, torch.long, device), device_tensor(banned_ids, torch.long, device)),
                          torch.tensor(float("-inf"), device=device))
    biased = [(i, c) for i, c in controlled if c.bias_ids is not None]
    if biased:
        rows = torch.cat([torch.full((len(c.bias_ids),), i, dtype=torch.long) for i, c in biased])
        ids = torch.cat([c.bias_ids for _, c in biased])
        values = torch.cat([c.bias_values for _, c in biased])
        logits.index_put_((device_tensor(rows, torch.long, device), device_tensor(ids, torch.long, device)),
                          device_tensor(values, torch.float32, device), accumulate=True)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], k: int) -> SampledLogprobs:
    """Log-softmax of the raw logits of `rows` only: the sampled token's logprob and rank, and the
    top k (every row gets the largest k asked; each keeps its own k on the host)."""
    index = device_tensor(rows, torch.long, logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)      # [m, vocab]
    chosen = logprobs.gather(1, tokens.index_select(0, index)[:, None])      # [m, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1                              # [m]
    top_values, top_ids = logprobs.topk(max(1, min(k, logprobs.shape[-1])), dim=-1)   # [m, k]
    return SampledLogprobs(rows, chosen[:, 0], ranks, top_ids, top_values)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], ks: list[int]) -> list[tuple]:
    """Host entries (logprob, rank, [(token id, logprob)] of the top k) of prompt tokens: row i of
    `logits` ([r, vocab], the position before targets[i]) scores targets[i] with ks[i] top tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)                                     # [r, vocab]
    target = device_tensor(targets, torch.long, logits.device)[:, None]
    chosen = logprobs.gather(1, target)                                                      # [r, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = logprobs.topk(max(1, min(max(ks), logprobs.shape[-1])), dim=-1)
    chosen, ranks, top_ids, top_values = (t.tolist() for t in (chosen[:, 0], ranks, top_ids, top_values))
    return [(chosen[i], ranks[i], list(zip(top_ids[i][:k], top_values[i][:k]))) for i, k in enumerate(ks)]


def filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[batch, vocab] probabilities after temperature, top-k, top-p and min-p (rows sum to 1).

    top-p keeps the smallest set of most likely tokens whose mass reaches top_p;
    min-p drops tokens less likely than min_p times the most likely one.
    """
    batch, vocab = logits.shape
    device = logits.device
    temp = device_tensor([p.temperature if not p.is_greedy else 1.0 for p in params], torch.float32, device)
    logits = logits / temp[:, None]

    top_k = [p.top_k if p.top_k > 0 else vocab for p in params]
    top_p = [p.top_p for p in params]
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        top_k_t = device_tensor(top_k, torch.long, device)
        top_p_t = device_tensor(top_p, torch.float32, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)   # [batch, vocab]
        rank = torch.arange(vocab, device=device)[None, :]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k_t[:, None], float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass of strictly better tokens; the best token always survives.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p_t[:, None], float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    probs = logits.softmax(dim=-1)                                 # [batch, vocab]
    min_p = [p.min_p for p in params]
    if any(m > 0 for m in min_p):
        min_p_t = device_tensor(min_p, torch.float32, device)
        threshold = min_p_t[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    # Renormalized so each row is the distribution actually sampled from.
    return probs / probs.sum(dim=-1, keepdim=True)


def uses_penalties(params: list) -> bool:
    return any(p.repetition_penalty != 1.0 or p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition (prompt + output tokens), then frequency and presence (output tokens) penalties."""
    params = [s.sampling_params for s in seqs]
    if not uses_penalties(params):
        return logits
    batch, vocab = logits.shape
    device = logits.device
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    rep = device_tensor([p.repetition_penalty for p in params], torch.float32, device)[:, None]
    freq = device_tensor([p.frequency_penalty for p in params], torch.float32, device)[:, None]
    pres = device_tensor([p.presence_penalty for p in params], torch.float32, device)[:, None]
    output_counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
    if use_rep:
        prompt_seen = _token_counts([s.token_ids[:s.num_prompt_tokens] for s in seqs], vocab, device) > 0
        seen = prompt_seen | (output_counts > 0)                   # [batch, vocab]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    logits = logits - freq * output_counts - pres * (output_counts > 0).float()
    return logits
