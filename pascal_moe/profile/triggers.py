"""Trigger tokens and example contexts per expert: what text makes an expert fire.

Shape legend: N real tokens of a batch, L MoE layers, E routed experts, k experts
per token, V vocabulary, C contexts kept per expert.

lift(token v, expert e) = P(e | v) / P(e), with P(e | v) = (occurrences of v routed to e)
/ (occurrences of v) and P(e) = (tokens routed to e) / (all tokens) in that layer (top-k
membership, so P(e) sums to k over experts).  Tokens seen fewer than `min_count` times
are ignored (their lift is noise).  Counts are sparse: (token, expert) pairs that
occurred, per layer, merged in bounded chunks; memory grows with distinct pairs, not data.
Contexts: per expert the C routed tokens with the highest routing weight (a bounded min-heap),
decoded with `before` tokens of left and `after` of right context and the token marked `[[tok]]`.
"""

from __future__ import annotations

import heapq

import numpy as np
import pandas as pd
import torch

from pascal_moe.profile.capture import RoutedBatch


class SparseCounter:
    """Counts and weight sums over int64 keys, merged lazily (np.unique over appended chunks)."""

    def __init__(self, merge_at: int = 2_000_000) -> None:
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.wsum = np.zeros(0, np.float64)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._n_pending = 0
        self.merge_at = merge_at

    def add(self, keys: torch.Tensor, weights: torch.Tensor) -> None:
        uniq, inv = torch.unique(keys, return_inverse=True)
        cnt = torch.bincount(inv, minlength=uniq.numel())
        ws = torch.zeros(uniq.numel(), dtype=torch.float64, device=keys.device).scatter_add_(0, inv, weights.double())
        self._pending.append((uniq.cpu().numpy(), cnt.cpu().numpy(), ws.cpu().numpy()))
        self._n_pending += uniq.numel()
        if self._n_pending > self.merge_at:
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        k = np.concatenate([self.keys] + [p[0] for p in self._pending])
        c = np.concatenate([self.counts] + [p[1] for p in self._pending])
        w = np.concatenate([self.wsum] + [p[2] for p in self._pending])
        self.keys, inv = np.unique(k, return_inverse=True)
        self.counts = np.bincount(inv, weights=c, minlength=len(self.keys)).astype(np.int64)
        self.wsum = np.bincount(inv, weights=w, minlength=len(self.keys))
        self._pending, self._n_pending = [], 0


class TriggerStats:
    """Sparse (token, expert) counts per layer, token occurrence counts, and top-weight contexts."""

    def __init__(
        self, n_layers: int, n_experts: int, vocab: int, contexts: int = 5, before: int = 12, after: int = 4
    ) -> None:
        self.L, self.E, self.C = n_layers, n_experts, contexts
        self.before, self.after = before, after
        self.pairs = [SparseCounter() for _ in range(n_layers)]
        self.token_count = np.zeros(vocab, np.int64)  # [V]
        self.expert_tokens = np.zeros((n_layers, n_experts), np.int64)  # [L, E]
        self.n_tokens = 0
        # heaps[l][e]: min-heap of (weight, (-sample, -position), token_id, window ids, marked position in window);
        # the tiebreak makes the order total (equal weights: the earlier token wins), so the kept contexts are
        # the top C of all tokens whatever the batching, and the heaps of consecutive shards merge exactly
        self.heaps: list[list[list[tuple]]] = [[[] for _ in range(n_experts)] for _ in range(n_layers)]
        self.sample_offset = 0  # global index of this pass's first sample (a shard's start)

    def add(self, rb: RoutedBatch) -> None:
        tok = rb.token_ids  # [N]
        bc = torch.bincount(tok, minlength=len(self.token_count)).cpu().numpy()
        if len(bc) > len(self.token_count):
            self.token_count = np.pad(self.token_count, (0, len(bc) - len(self.token_count)))
        self.token_count[: len(bc)] += bc
        self.n_tokens += rb.n_tokens
        for li, (w, idx) in enumerate(zip(rb.weights, rb.indices)):
            self.pairs[li].add((tok.view(-1, 1) * self.E + idx).reshape(-1), w.reshape(-1))  # keys [N*k]
            self.expert_tokens[li] += torch.bincount(idx.reshape(-1), minlength=self.E).cpu().numpy()
            if self.C > 0:
                self._add_contexts(rb, li, w, idx)

    def _add_contexts(self, rb: RoutedBatch, li: int, w: torch.Tensor, idx: torch.Tensor) -> None:
        dense = torch.full((w.shape[0], self.E), float("-inf"), device=w.device).scatter_(1, idx, w.float())  # [N, E]
        # stable descending sort: among equal weights the earlier token (sample, position order) comes first
        vals, order = dense.sort(dim=0, descending=True, stable=True)
        n = min(self.C, dense.shape[0])
        vals, order = vals[:n], order[:n]  # [C, E]
        heaps = self.heaps[li]
        floor = torch.tensor([h[0][0] if len(h) >= self.C else float("-inf") for h in heaps], device=w.device)
        cand = (vals >= floor) & torch.isfinite(vals)  # [C, E] equal weights decided by the tiebreak below
        ids = rb.batch.input_ids
        for c, e in cand.nonzero().tolist():
            t = int(order[c, e])
            row, pos = int(rb.rows[t]), int(rb.positions[t])
            sample = self.sample_offset + rb.batch.sample_index[row]
            lo = max(0, pos - self.before)
            n_real = int(rb.batch.attention_mask[row].sum())
            window = tuple(ids[row, lo : min(n_real, pos + self.after + 1)].tolist())
            item = (float(vals[c, e]), (-sample, -pos), int(rb.token_ids[t]), window, pos - lo)
            if len(heaps[e]) < self.C:
                heapq.heappush(heaps[e], item)
            elif item[:2] > heaps[e][0][:2]:
                heapq.heapreplace(heaps[e], item)

    def lift_table(self, layer: int, min_count: int) -> pd.DataFrame:
        """All (token, expert) pairs of a layer with count, P(e|v), lift and mean weight (tokens >= min_count)."""
        sc = self.pairs[layer]
        sc.merge()
        tok, ex = sc.keys // self.E, sc.keys % self.E
        occ = self.token_count[tok]
        keep = occ >= max(min_count, 1)
        base = self.expert_tokens[layer] / max(self.n_tokens, 1)  # [E] P(e)
        p_e_v = sc.counts[keep] / occ[keep]
        return pd.DataFrame(
            {
                "token_id": tok[keep],
                "expert": ex[keep],
                "count": sc.counts[keep],
                "p_given_token": p_e_v,
                "lift": p_e_v / np.maximum(base[ex[keep]], 1e-12),
                "weight": sc.wsum[keep] / np.maximum(sc.counts[keep], 1),
            }
        )

    def pair_count(self, layer: int, token_id: int, expert: int) -> int:
        """How often `token_id` was routed to `expert` in `layer` (any token count)."""
        sc = self.pairs[layer]
        sc.merge()
        key = token_id * self.E + expert
        i = int(np.searchsorted(sc.keys, key))
        return int(sc.counts[i]) if i < len(sc.keys) and sc.keys[i] == key else 0

    def frame(self, tokenizer, min_count: int, top_n: int) -> pd.DataFrame:
        """triggers.parquet rows: per (layer, expert) the `top_n` highest-lift tokens, then the contexts.

        Built a layer at a time into columns (one small frame per layer, token strings decoded once per
        id): a list of per-row dicts was ~1 KiB a row, 100+ MiB at 48 layers x 128 experts."""
        cols = ["layer", "expert", "kind", "rank", "token_id", "token", "count", "lift", "context", "weight"]
        decoded: dict[int, str] = {}

        def dec(t: int) -> str:
            if t not in decoded:
                decoded[t] = tokenizer.decode([t])
            return decoded[t]

        def row(c: dict[str, list], *values) -> None:  # values in `cols` order
            for k, v in zip(cols, values):
                c[k].append(v)

        frames: list[pd.DataFrame] = []
        for li in range(self.L):
            c: dict[str, list] = {k: [] for k in cols}
            table = self.lift_table(li, min_count)
            lifts = {(int(t), int(e)): float(lf) for t, e, lf in zip(table.token_id, table.expert, table.lift)}
            best = table.sort_values(["expert", "lift", "count"], ascending=[True, False, False])
            for e, grp in best.groupby("expert", sort=True):
                for r, x in enumerate(grp.head(top_n).itertuples()):
                    tid = int(x.token_id)
                    row(c, li, int(e), "token", r, tid, dec(tid), int(x.count), float(x.lift), None, float(x.weight))
            for e, heap in enumerate(self.heaps[li]):
                for r, (wt, _, tid, window, at) in enumerate(sorted(heap, reverse=True)):
                    text = (
                        tokenizer.decode(list(window[:at]))
                        + "[["
                        + dec(window[at])
                        + "]]"
                        + tokenizer.decode(list(window[at + 1 :]))
                    )
                    count = self.pair_count(li, tid, e)
                    row(c, li, e, "context", r, tid, dec(tid), count, lifts.get((tid, e), float("nan")), text, wt)
            frames.append(pd.DataFrame(c, columns=cols))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
        return df.astype(
            {
                "layer": "int32",
                "expert": "int32",
                "rank": "int32",
                "token_id": "int64",
                "count": "int64",
                "lift": "float64",
                "weight": "float64",
            }
        )
