"""The `self` backend: the target model writes its own text, steered toward target experts.

In the spirit of MoEQuant's EBSS (methods.md §6): a beam search where each
candidate next token v of a beam is scored

    score(c ⊕ v) = LP(c) + log p(v | c) + Σ_e  bonus / sqrt(1 + used_e(c)) · hit_e(v)

LP is the beam's cumulative log-probability (the perplexity guard that keeps text
natural; candidates must also lie in the top-p nucleus and within `max_drop` nats of
the beam's most likely token), hit_e(v) = 1 when token v, fed to the model, is routed
to target expert e (measured by router hooks during the very forward that scores the
candidates, which also advances the KV cache), and
used_e(c) counts the beam's earlier hits on e, so the bonus shrinks for experts the
beam already reaches (a balance term, like EBSS's usage std).  Candidates are drawn
without replacement from the nucleus (Gumbel top-m), n-gram repeats are banned, and
all Gumbel noise comes from one seeded generator, so a run is reproducible.

Shape legend: P passages searched together, W beam width, M candidates per beam,
B = P*W beams, C = B*M candidates, V vocabulary, N tokens in one forward,
k experts per token, G target experts of the group.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd
import torch

from pascal_moe.agent.verify import Measured, Rejections
from pascal_moe.models import moe_layers
from pascal_moe.models.hooks import router_hooks
from pascal_moe.models.base import MoELayer


@dataclass(frozen=True, slots=True)
class SelfSampleConfig:
    width: int = 4  # W: beams kept per passage
    expand: int = 6  # M: candidates drawn per beam and step
    new_tokens: int = 96  # tokens written after the prompt
    prompt_tokens: int = 8  # tokens of seed text each passage starts from
    bonus: float = 2.0  # nats per target-expert hit (0 = plain stochastic beam search)
    temperature: float = 1.0
    top_p: float = 0.95
    max_drop: float = 6.0  # nats: a candidate must be at least exp(-max_drop) as likely as the beam's best token
    no_repeat_ngram: int = 4
    parallel: int = 8  # P: passages searched in one batch


@dataclass(slots=True)
class SelfPassage:
    text: str
    prompt: str
    logprob: float  # mean log p of the written tokens (the naturalness the search kept)
    hits: int  # target-expert hits counted during the search (written tokens only)
    n_new: int
    token_ids: list[int]  # prompt + written tokens, as searched (decoding may re-tokenize differently)
    prompt_index: int = 0  # which of the given prompts it grew from


class _TargetHits:
    """Router hooks that record, per forward, which target experts each token reaches.

    `hits` after a forward: [N, G] bool, column g = target expert g of `keys`.
    """

    def __init__(self, layers: Sequence[MoELayer], keys: Sequence[int], n_experts: int):
        self.layers, self.keys, self.E = list(layers), [int(k) for k in keys], n_experts
        self.cols = {
            lay.ordinal: [(g, k % n_experts) for g, k in enumerate(self.keys) if k // n_experts == lay.ordinal]
            for lay in self.layers
        }
        self.hits: torch.Tensor | None = None

    @contextmanager
    def installed(self) -> Iterator[_TargetHits]:
        watched = [lay for lay in self.layers if self.cols[lay.ordinal]]
        hooks = [self._hook(lay) for lay in watched]
        with router_hooks([lay.router for lay in watched], lambda i, z, _a: hooks[i](z)):
            yield self

    def reset(self, n: int, device: torch.device) -> None:
        self.hits = torch.zeros(n, len(self.keys), dtype=torch.bool, device=device)  # [N, G]

    def _hook(self, lay: MoELayer):
        cols = self.cols[lay.ordinal]
        g_idx = torch.tensor([g for g, _ in cols])
        experts = torch.tensor([e for _, e in cols])

        def hook(logits: torch.Tensor) -> None:
            _, idx = lay.select(logits)  # idx [N, k]
            hit = (idx.unsqueeze(-1) == experts.to(idx.device)).any(1)  # [N, G_l]
            assert self.hits is not None
            self.hits[:, g_idx.to(idx.device)] |= hit

        return hook


def banned_tokens(tokenizer, vocab: int) -> list[int]:
    """Tokens never written: special tokens, and tokens whose text alone holds control characters or U+FFFD.

    Why U+FFFD: a byte-level piece of a multi-byte character decodes to it; a beam that
    writes one and moves on leaves a broken character, which the screen rejects.  Whole
    characters that the vocabulary merges into one token stay allowed.
    """
    special = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) if i is not None}
    special |= set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = tokenizer.batch_decode([[i] for i in range(min(vocab, len(tokenizer)))])
    ctrl = {
        i
        for i, t in enumerate(texts)
        if "\ufffd" in t or any(ch not in "\n\t\r" and unicodedata.category(ch) == "Cc" for ch in t)
    }
    extra = set(range(len(tokenizer), vocab))  # rows of the embedding no token maps to
    return sorted(special | ctrl | extra)


def allowed(logp: torch.Tensor, seqs: list[list[int]], banned: list[int], c: SelfSampleConfig) -> torch.Tensor:
    """logp [B, V] with every token a beam may not write set to -inf (values of the others unchanged).

    Bans (special/control tokens, n-gram repeats) come first, then the nucleus and
    `max_drop` over what is left, so a beam always keeps at least one finite candidate.
    """
    logp = logp.clone()
    logp[:, banned] = float("-inf")
    _ban_repeats(logp, seqs, c.no_repeat_ngram)
    logp = _nucleus(logp, c.top_p)
    return logp.masked_fill(logp < logp.max(-1, keepdim=True).values - c.max_drop, float("-inf"))


def _nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """logp [B, V] with tokens outside the top-p nucleus (of the allowed tokens' renormalised mass) set to -inf."""
    if top_p >= 1.0:
        return logp
    sorted_lp, order = logp.sort(-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_lp, -1)  # renormalised over tokens not banned already
    drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
    return logp.scatter(-1, order, sorted_lp.masked_fill(drop, float("-inf")))


def _ban_repeats(logp: torch.Tensor, seqs: list[list[int]], n: int) -> None:
    """In place: forbid tokens that would repeat an n-gram already in the beam."""
    if n < 2:
        return
    for b, s in enumerate(seqs):
        if len(s) < n - 1:
            continue
        tail = tuple(s[-(n - 1) :])
        banned = [s[i + n - 1] for i in range(len(s) - n + 1) if tuple(s[i : i + n - 1]) == tail]
        if banned:
            logp[b, banned] = float("-inf")


class SelfSampler:
    """Writes passages with the model being quantized; one instance per loaded model."""

    def __init__(self, model, tokenizer, cfg: SelfSampleConfig = SelfSampleConfig()):
        self.model, self.tok, self.cfg = model, tokenizer, cfg
        self.layers = moe_layers(model)
        self.E = self.layers[0].spec.n_experts
        self.banned = banned_tokens(tokenizer, model.get_output_embeddings().weight.shape[0])

    def prompt_ids(self, texts: Sequence[str]) -> list[tuple[int, list[int]]]:
        """(index, first `prompt_tokens` tokens) of each text long enough to give them."""
        n = self.cfg.prompt_tokens
        enc = self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
        return [(i, ids[:n]) for i, ids in enumerate(enc) if len(ids) >= n]

    def sample(self, keys: Sequence[int], prompts: Sequence[str], seed: int) -> list[SelfPassage]:
        """One passage per usable prompt, steered toward the experts `keys` (layer*E + expert)."""
        return self.sample_groups([(keys, prompts)], seed)[0]

    @torch.no_grad()
    def sample_groups(self, jobs: Sequence[tuple[Sequence[int], Sequence[str]]], seed: int) -> list[list[SelfPassage]]:
        """For each job (keys, prompts): one passage per usable prompt, steered toward that job's keys.

        Passages of different jobs share search batches (each row scores only its own keys),
        which keeps the batched forwards full when groups ask for few passages each.
        """
        union = sorted({int(k) for keys, _ in jobs for k in keys})
        col = {k: g for g, k in enumerate(union)}
        rows = []  # (job, prompt index, prompt ids, column mask [G])
        for j, (keys, prompts) in enumerate(jobs):
            mask = torch.zeros(len(union), dtype=torch.bool)
            mask[[col[int(k)] for k in keys]] = True
            rows += [(j, i, ids, mask) for i, ids in self.prompt_ids(prompts)]
        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        tracker = _TargetHits(self.layers, union, self.E)
        out: list[list[SelfPassage]] = [[] for _ in jobs]
        with tracker.installed():
            for start in range(0, len(rows), self.cfg.parallel):
                chunk = rows[start : start + self.cfg.parallel]
                masks = torch.stack([m for *_, m in chunk]).to(self.device)  # [P, G]
                for (j, i, _, _), p in zip(chunk, self._search([x for _, _, x, _ in chunk], masks, tracker, gen)):
                    p.prompt_index = i
                    out[j].append(p)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, input_ids: torch.Tensor, cache, tracker: _TargetHits):
        tracker.reset(input_ids.numel(), self.device)
        res = self.model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True)
        return res.logits[:, -1].float(), res.past_key_values, tracker.hits  # [rows, V], cache, [N, G]

    def _search(
        self, prompt_ids: list[list[int]], masks: torch.Tensor, tracker: _TargetHits, gen: torch.Generator
    ) -> list[SelfPassage]:
        c = self.cfg
        P, W, M, G = len(prompt_ids), c.width, c.expand, len(tracker.keys)
        B, dev = P * W, self.device
        logits, cache, _ = self._forward(torch.tensor(prompt_ids), None, tracker)  # [P, V]
        cache.batch_repeat_interleave(W)
        logits = logits.repeat_interleave(W, 0)  # [B, V]
        seqs = [list(prompt_ids[b // W]) for b in range(B)]
        lp_sum = torch.zeros(B, device=dev)  # cumulative log p of written tokens
        score = torch.zeros(P, W, device=dev)
        score[:, 1:] = float("-inf")  # identical beams at the start: only beam 0 may expand
        used = torch.zeros(B, G, device=dev)  # hits per beam and target expert
        mine = masks.repeat_interleave(W, 0).float()  # [B, G] 1 where the column is this beam's target
        for _ in range(c.new_tokens):
            logp = torch.log_softmax(logits / c.temperature, -1)  # [B, V]
            logp = allowed(logp, seqs, self.banned, c)
            gumbel = -torch.log(-torch.log(torch.rand(logp.shape, generator=gen, device=dev).clamp_min(1e-20)))
            cand = (logp + gumbel).topk(M, -1).indices  # [B, M]
            cand_lp = logp.gather(1, cand)  # [B, M]
            cache.batch_repeat_interleave(M)
            next_logits, cache, hits = self._forward(cand.reshape(-1, 1), cache, tracker)  # [C, V], [C, G]
            weight = mine * c.bonus / torch.sqrt(1.0 + used)  # [B, G]
            bonus = (hits.view(B, M, G).float() * weight.unsqueeze(1)).sum(-1)  # [B, M]
            total = score.view(B, 1) + cand_lp + bonus  # [B, M]
            best = total.view(P, W * M).topk(W, -1)  # [P, W]
            flat = (best.indices + torch.arange(P, device=dev).unsqueeze(1) * (W * M)).view(-1)  # [B] into C
            beam = flat // M
            cache.batch_select_indices(flat)
            logits = next_logits[flat]
            seqs = [seqs[b] + [t] for b, t in zip(beam.tolist(), cand.view(-1)[flat].tolist())]
            lp_sum = lp_sum[beam] + cand_lp.view(-1)[flat]
            used = used[beam] + hits[flat].float() * mine
            score = best.values
        top = score.argmax(-1)  # [P]
        out = []
        for p in range(P):
            b = p * W + int(top[p])
            n0 = len(prompt_ids[p])
            out.append(
                SelfPassage(
                    self.tok.decode(seqs[b], skip_special_tokens=True),
                    self.tok.decode(seqs[b][:n0], skip_special_tokens=True),
                    float(lp_sum[b]) / c.new_tokens,
                    int(used[b].sum()),
                    c.new_tokens,
                    seqs[b],
                )
            )
        return out


def prompt_pool(
    seed: pd.DataFrame, triggers: pd.DataFrame, targets: Sequence[Any], n_experts: int, n: int
) -> list[tuple[str, str]]:
    """(kind, text) starting points for a group: trigger contexts and the seed texts richest in its experts.

    Why: a passage that starts where the target experts already fire needs less steering,
    so it stays closer to natural text.  Alternates context / seed, best first.
    """
    keys = {t.layer * n_experts + t.expert for t in targets}
    mine = triggers[
        (triggers["kind"] == "context")
        & triggers.apply(lambda r: int(r["layer"]) * n_experts + int(r["expert"]) in keys, axis=1)
    ]
    contexts = [re.sub(r"\[\[|\]\]", "", str(c)) for c in mine.sort_values("rank")["context"].dropna()]
    rate = [
        sum(int(c) for k, c in zip(ks, cs) if int(k) in keys) / max(int(nt), 1)
        for ks, cs, nt in zip(seed["keys"], seed["counts"], seed["n_tokens"])
    ]
    best = seed.assign(_rate=rate).sort_values("_rate", ascending=False, kind="stable")["text"].head(n).tolist()
    pool: list[tuple[str, str]] = []
    for i in range(max(len(contexts), len(best))):
        pool += [("context", contexts[i])] if i < len(contexts) else []
        pool += [("seed", best[i])] if i < len(best) else []
    return pool[: max(n, 1)]


def unverified(measured: Sequence[Measured], rejections: Rejections | None = None) -> list[Measured]:
    """EBSS-style acceptance (`--no-verify-routing`): every passage that passed the text screen is kept.

    Why: MoEQuant's EBSS keeps what its steered search writes without checking where the
    text routes; keeping the screen and dropping only the hit-rate test isolates what router
    verification adds at equal tokens.  Measured counts stay on each row, so coverage is
    still credited from real routing.  Screen rejections are counted into `rejections`.
    """
    out = [
        replace(m, accepted=True, reject_reason=None) if m.reject_reason == "below_threshold" else m for m in measured
    ]
    if rejections is not None:
        for m in out:
            rejections.add(m.reject_reason)
    return out
