"""The whole DeepSeek-V4 model: embed -> 4 streams -> blocks -> head mHC -> norm -> LM head.

Module and parameter names are the official inference names (`embed.weight`,
`layers.{i}.attn.compressor.ape`, `layers.{i}.ffn.gate.tid2eid`, `mtp.0.e_proj.weight`, ...), so a
converted checkpoint loads with `load_state_dict`.

`forward(batch, kv)` runs several sequences at once, each a chunk of new tokens (a prefill chunk of
any size or one decode token) against its own `SeqCache`: projections and the MoE see every token
of the batch together, attention runs per sequence. Any split into chunks gives the same logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from v4d.serving import sizing
from v4d.serving.config import ModelConfig
from v4d.serving.model.block import Block
from v4d.serving.model.cache import Fmt, KVCache, SeqCache
from v4d.serving.model.linear import linear_fp32
from v4d.serving.model.mhc import hc_head
from v4d.serving.model.moe import ExpertBackend, LocalExperts
from v4d.serving.model.mtp import MTPBlock
from v4d.serving.model.norm import RMSNorm
from v4d.serving.model.step import Step

Batch = Sequence[tuple[Sequence[int] | torch.Tensor, SeqCache]]


HEAD_CHUNK_ROWS = 8192  # vocab rows upcast at once: 8192 x 7168 x 4 B = 235 MB at V4-Flash size


def head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits [T, vocab] = x W^T without an fp32 copy of the whole head (2 GB at V4-Flash size):
    an fp32 weight, or x in the weight's dtype, goes through `linear_fp32`; otherwise the weight is
    upcast HEAD_CHUNK_ROWS vocab rows at a time (the same fp32 products and sums as one upcast)."""
    if weight.dtype == torch.float32 or x.dtype == weight.dtype:
        return linear_fp32(x, weight)
    x = x.float()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for lo in range(0, weight.shape[0], HEAD_CHUNK_ROWS):
        rows = weight[lo : lo + HEAD_CHUNK_ROWS]
        out[:, lo : lo + rows.shape[0]] = F.linear(x, rows.float())
    return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, with_experts: bool = True):
        """`with_experts=False` leaves out routed experts (an attention engine whose experts live on
        remote shards); set `model.experts` to a backend that reaches them."""
        super().__init__()
        cfg.check()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.layers = nn.ModuleList(Block(cfg, i, with_experts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)  # model dtype (stored bf16); logits in fp32
        self.hc_head_fn = nn.Parameter(torch.zeros(n, n * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32))
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPBlock(cfg, L + k, with_experts) for k in range(cfg.num_nextn_predict_layers))
        self.experts: ExpertBackend = LocalExperts({b.layer: b.ffn for b in [*self.layers, *self.mtp]})

    # -- batching ---------------------------------------------------------------------------------
    def _flatten(self, batch: Batch, kv: KVCache) -> tuple[torch.Tensor, Step]:
        dev = self.embed.weight.device
        ids, chunks = [], []
        for i, (tokens, seq) in enumerate(batch):
            t = torch.as_tensor(tokens, dtype=torch.long).flatten()
            if t.numel() == 0:
                raise ValueError(f"batch[{i}]: empty chunk of token ids")
            if int(t.min()) < 0 or int(t.max()) >= self.cfg.vocab_size:
                raise ValueError(f"batch[{i}]: token ids must be in 0..{self.cfg.vocab_size - 1}")
            kv.check_pages(seq, seq.num_tokens + t.numel())
            ids.append(t)
            chunks.append((seq.num_tokens, t.numel(), seq.slot, seq.page_ids))
        if len({c[2] for c in chunks}) != len(chunks):
            raise ValueError("batch: two sequences share one state slot")
        return torch.cat(ids).to(dev), Step.build(self.cfg, chunks, kv.num_slots, dev)

    def hidden(self, batch: Batch, kv: KVCache) -> tuple[torch.Tensor, Step]:
        """Run the blocks; returns the final streams [N, hc_mult, d] and the step (pre-advance
        positions). Advances every `SeqCache.num_tokens` by its chunk."""
        ids, step = self._flatten(batch, kv)
        X = self.blocks(ids, step, kv)
        for (_, seq), (lo, hi, start) in zip(batch, step.spans, strict=True):
            seq.num_tokens = start + hi - lo
        return X, step

    def blocks(self, ids: torch.Tensor, step: Step, kv: KVCache) -> torch.Tensor:
        """Embedding and every block over the step's rows (device work only: a static step's call is
        what serving/model/graphs.py captures)."""
        X = self.embed(ids).unsqueeze(1).repeat(1, self.cfg.hc_mult, 1)
        for ratio in sorted({b.attn.ratio for b in self.layers} - {0}):
            step.compression(ratio)  # per-step metadata shared by the layers of that ratio: built once, here
        for block in self.layers:
            X = block(X, ids, step, kv, self.experts)
        return X

    def logits(self, X: torch.Tensor, fn=None, scale=None, base=None, norm: RMSNorm | None = None) -> torch.Tensor:
        """Head mHC, final norm and LM head (fp32) over rows of streams [T, hc_mult, d]."""
        fn = self.hc_head_fn if fn is None else fn
        scale = self.hc_head_scale if scale is None else scale
        base = self.hc_head_base if base is None else base
        x = hc_head(X, fn, scale, base, self.cfg.rms_norm_eps, self.cfg.hc_eps)
        return head_logits((norm or self.norm)(x), self.head.weight)

    @torch.inference_mode()
    def forward(self, batch: Batch, kv: KVCache, all_logits: bool = False) -> list[torch.Tensor]:
        """Per sequence: logits of its last new token [vocab], or of every new token [T, vocab]."""
        X, step = self.hidden(batch, kv)
        rows = [slice(lo if all_logits else hi - 1, hi) for lo, hi, _ in step.spans]
        out = self.logits(torch.cat([X[r] for r in rows]))
        sizes = [r.stop - r.start for r in rows]
        return [o if all_logits else o[0] for o in out.split(sizes)]

    # -- MTP --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def mtp_logits(
        self, X: torch.Tensor, next_ids: torch.Tensor, step: Step, kv: KVCache, depth: int = 0
    ) -> torch.Tensor:
        """MTP block `depth` over the streams `hidden` returned: row t (given token t+1 in
        `next_ids`) predicts token t+2. Needs `KVCache(..., with_mtp=True)`. Returns [N, vocab]."""
        block = self.mtp[depth]
        H = block(X, next_ids.to(X.device), step, kv, self.experts, self.embed)
        return self.logits(H, block.hc_head_fn, block.hc_head_scale, block.hc_head_base, block.norm)

    # -- whole-sequence convenience (tests, tools) ------------------------------------------------
    def scratch_cache(
        self, num_tokens: int, with_mtp: bool = False, fmt: Fmt | None = None
    ) -> tuple[KVCache, SeqCache]:
        """A one-sequence cache for `num_tokens`, in `fmt` (default: the plain format of the weights)."""
        pages = sizing.pages_for(self.cfg, num_tokens)
        kv = KVCache(
            self.cfg,
            pages,
            1,
            dtype=self.embed.weight.dtype,
            device=self.embed.weight.device,
            with_mtp=with_mtp,
            fmt=fmt,
        )
        return kv, SeqCache(0, list(range(pages)))

    @torch.inference_mode()
    def prefill_logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits of every position of one sequence in one pass: [T, vocab]."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        kv, seq = self.scratch_cache(ids.numel())
        return self.forward([(ids, seq)], kv, all_logits=True)[0]


def init_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Random weights of a sensible scale (fan-in normal projections, small mHC mixing, random hash
    table), so a random model has non-trivial attention and routing."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "embed.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            elif leaf == "ape" or leaf == "attn_sink" or leaf.endswith("_base"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif leaf.endswith("_scale"):
                p.copy_(0.1 + 0.1 * torch.rand(p.shape, generator=g))
            elif leaf.endswith("_fn"):
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                perm = torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g).argsort(-1)
                b.copy_(perm[:, : cfg.num_experts_per_tok].to(b.dtype))
    return model
