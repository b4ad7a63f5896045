"""Decoding strategies over an incremental decoding ``Session``: greedy, sampling, beam search.

A session is a decoder with its KV cache: ``feed(ids)`` appends tokens and
returns the logits of the next one; ``reorder(rows)`` keeps the given rows
(beam search).  Heads open sessions with ``start(rows_per_prompt)``.

Beam search scores a finished hypothesis as Hugging Face and fairseq do:
``sum of token log-probs / generated_length ** length_penalty``, where the
length counts the generated tokens including eos.  The search stops when
every row has ``num_beams`` finished hypotheses and no running beam can still
beat the worst of them (the bound of HF's ``early_stopping="never"``), or after
``max_new_tokens``; beams still running then compete with the finished ones.

Shape legend: B batch (prompts), K beams, P prompt length, N generated length, V vocabulary.
"""

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from polytrain.config.model import DecodingConfig


class Session(Protocol):
    def feed(self, ids_BL: Tensor) -> Tensor:
        """Append ``ids_BL`` to every row; the logits (B, V) of the token after them."""

    def reorder(self, rows_B: Tensor) -> None:
        """Continue row ``rows_B[i]`` as row i."""


Strategy = Callable[[Callable[[int], Session], Tensor, int, int, DecodingConfig, torch.Generator | None], Tensor]
"""A decoding strategy (``config.registries.STRATEGIES``): ``strategy(start, prompt_BP, max_new_tokens, eos_id, cfg, generator) -> (B, <= max_new_tokens) ids``."""


def filter_logits(logits_BV: Tensor, top_k: int, top_p: float) -> Tensor:
    """``logits_BV`` with every token outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k:
        kth_B1 = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(-1)
        before_BV = probs_BV.cumsum(-1) - probs_BV  # mass of the more likely tokens
        drop_sorted_BV = before_BV >= top_p  # the nucleus already reached p without this token
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample_next(logits_BV: Tensor, cfg: DecodingConfig, generator: torch.Generator | None) -> Tensor:
    """(B,) ids drawn from softmax(filtered logits / temperature)."""
    probs_BV = filter_logits(logits_BV.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


def token_by_token(session: Session, prompt_BP: Tensor, max_new_tokens: int, eos_id: int,
                   pick: Callable[[Tensor], Tensor]) -> Tensor:
    """Feed the prompt, then one picked token per step; rows that produced eos keep producing eos."""
    logits_BV = session.feed(prompt_BP)
    done_B = torch.zeros(len(prompt_BP), dtype=torch.bool, device=prompt_BP.device)
    out = []
    for step in range(max_new_tokens):
        next_B = torch.where(done_B, eos_id, pick(logits_BV))
        out.append(next_B)
        done_B |= next_B == eos_id
        if done_B.all() or step == max_new_tokens - 1:
            break
        logits_BV = session.feed(next_B[:, None])
    return torch.stack(out, dim=1)


def greedy(start, prompt_BP, max_new_tokens, eos_id, cfg, generator):
    return token_by_token(start(1), prompt_BP, max_new_tokens, eos_id, lambda logits: logits.argmax(-1))


def sample(start, prompt_BP, max_new_tokens, eos_id, cfg, generator):
    return token_by_token(start(1), prompt_BP, max_new_tokens, eos_id,
                          lambda logits: sample_next(logits, cfg, generator))


def beam_search(start, prompt_BP, max_new_tokens, eos_id, cfg, generator):
    return BeamSearch(cfg.num_beams, cfg.length_penalty, max_new_tokens, eos_id).run(start, prompt_BP)


class BeamSearch:
    """Per prompt: ``num_beams`` running hypotheses, a pool of finished ones, the best finished one returned."""

    def __init__(self, num_beams: int, length_penalty: float, max_new_tokens: int, eos_id: int):
        self.k, self.alpha, self.max_new, self.eos = num_beams, length_penalty, max_new_tokens, eos_id

    def score(self, log_prob: float, length: int) -> float:
        return log_prob / length**self.alpha

    def run(self, start: Callable[[int], Session], prompt_BP: Tensor) -> Tensor:
        batch, k, device = len(prompt_BP), self.k, prompt_BP.device
        session = start(k)
        logits = session.feed(prompt_BP.repeat_interleave(k, dim=0))
        scores_BK = torch.full((batch, k), float("-inf"), device=device)
        scores_BK[:, 0] = 0.0  # the k copies of a prompt are one hypothesis until the first step
        tokens_BKN = prompt_BP.new_empty(batch, k, 0)
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(self.max_new):
            length = step + 1
            log_probs_BKV = F.log_softmax(logits.float(), dim=-1).view(batch, k, -1)
            vocab = log_probs_BKV.shape[-1]
            candidates_BX = (scores_BK[..., None] + log_probs_BKV).view(batch, k * vocab)
            top_scores, top_index = candidates_BX.topk(min(2 * k, k * vocab), dim=-1)
            beams_BK = torch.arange(k, device=device).expand(batch, k).clone()
            next_BK = torch.full((batch, k), self.eos, dtype=torch.long, device=device)
            next_scores_BK = torch.full((batch, k), float("-inf"), device=device)
            for b in range(batch):
                if not done[b]:
                    self.advance(b, top_scores[b].tolist(), top_index[b].tolist(), vocab, length, tokens_BKN,
                                 finished, beams_BK, next_BK, next_scores_BK)
                    done[b] = self.is_done(finished[b], float(next_scores_BK[b].max()), length)
            rows_X = (torch.arange(batch, device=device)[:, None] * k + beams_BK).flatten()
            tokens_BKN = torch.cat([tokens_BKN.flatten(0, 1)[rows_X].view(batch, k, -1), next_BK[..., None]], -1)
            scores_BK = next_scores_BK
            if all(done) or step == self.max_new - 1:
                break
            session.reorder(rows_X)
            logits = session.feed(next_BK.flatten()[:, None])
        return self.best(finished, scores_BK, tokens_BKN, done)

    def advance(self, b: int, scores: list[float], indices: list[int], vocab: int, length: int, tokens_BKN: Tensor,
                finished: list, beams_BK: Tensor, next_BK: Tensor, next_scores_BK: Tensor) -> None:
        """Walk row ``b``'s candidates best first: eos ends a hypothesis, others fill the ``k`` running slots."""
        filled = 0
        for rank, (score, index) in enumerate(zip(scores, indices)):
            if score == float("-inf"):
                break
            beam, token = divmod(index, vocab)
            if token == self.eos:
                if rank < self.k:  # an eos candidate outside the top k would not have survived as a beam
                    finished[b].append((self.score(score, length), tokens_BKN[b, beam].tolist() + [token]))
                continue
            beams_BK[b, filled], next_BK[b, filled], next_scores_BK[b, filled] = beam, token, score
            filled += 1
            if filled == self.k:
                break

    def is_done(self, finished: list[tuple[float, list[int]]], best_running: float, length: int) -> bool:
        if best_running == float("-inf"):
            return True
        if len(finished) < self.k:
            return False
        kth_best = sorted((s for s, _ in finished), reverse=True)[self.k - 1]
        longest = self.max_new if self.alpha > 0 else length  # where a running beam's score could peak
        return kth_best >= self.score(best_running, longest)

    def best(self, finished: list, scores_BK: Tensor, tokens_BKN: Tensor, done: list[bool]) -> Tensor:
        rows = []
        for b, pool in enumerate(finished):
            if not done[b]:
                pool = pool + [(self.score(s, tokens_BKN.shape[-1]), tokens_BKN[b, i].tolist())
                               for i, s in enumerate(scores_BK[b].tolist()) if s > float("-inf")]
            rows.append(max(pool, key=lambda hypothesis: hypothesis[0])[1])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.eos] * (width - len(r)) for r in rows], device=tokens_BKN.device)
