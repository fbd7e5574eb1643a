"""The engine loop: schedule -> model.forward -> sample -> stream tokens to each request.

`Engine` is the in-process core that the Serve deployment (`server.EngineServer`) wraps; it is also
usable directly (tests, tools). Steps run through its `ModelRunner` (serving/runtime/runner.py: the
device, dtype and micro-batch overlap). It owns the model's KVCache, sized from a byte budget, the
KVManager over its pages and slots, and the Scheduler. One asyncio task runs steps while there is
work; the forward runs in a worker thread so new requests and aborts are accepted meanwhile (they
take effect between steps, never under a running forward).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import torch

from v4d.serving.engine.kv_manager import KVManager
from v4d.serving.engine.scheduler import Scheduler
from v4d.serving.engine.sequence import SamplingParams, Sequence, Status, prompt_ids
from v4d.serving.errors import BadRequest, ContextTooLong, Overloaded, ShardUnavailable
from v4d.serving.model.cache import KVCache
from v4d.serving.model.graphs import DecodeGraphs, graphs_enabled
from v4d.serving.plan import EnginePlan
from v4d.serving.runtime.runner import ModelRunner
from v4d.serving.sizing import page_bytes, page_tokens, pages_for, slot_bytes

log = logging.getLogger(__name__)
SHARD_RETRIES = 3  # failed steps (ShardUnavailable) a request survives before it fails


@dataclass(frozen=True)
class EngineLimits:
    kv_budget_bytes: int
    max_num_seqs: int = 8
    max_batch_tokens: int = 512
    max_queue: int = 64
    max_context_tokens: int = 1 << 20
    prefix_snapshots: int = -1  # state slots kept for prefix sharing; -1: max_num_seqs // 4, at least 1
    kv_format: str = "deployed"  # KV storage: deployed (FP8/FP4, what the planner sizes), bf16 or fp32
    cuda_graphs: bool = True  # decode steps as CUDA graphs per batch bucket (CUDA only; V4D_CUDA_GRAPHS=0 too)
    micro_batches: int = 1  # decode micro-batches per step, for the default runner (runtime/runner.py)

    @property
    def snapshots(self) -> int:
        return self.prefix_snapshots if self.prefix_snapshots >= 0 else max(1, self.max_num_seqs // 4)

    @classmethod
    def from_plan(cls, engine: EnginePlan, max_context_tokens: int) -> EngineLimits:
        return cls(
            kv_budget_bytes=engine.kv_budget_bytes,
            max_num_seqs=engine.max_num_seqs,
            max_batch_tokens=engine.max_batch_tokens,
            max_queue=engine.max_queue,
            max_context_tokens=max_context_tokens,
            kv_format=engine.kv_format,
            micro_batches=engine.micro_batches,
        )


def kv_layout(cfg: Any, limits: EngineLimits) -> tuple[int, int, int]:
    """(pages, page bytes, slot bytes) the engine allocates for `limits`: the budget less every
    state slot (sequences + prefix snapshots), in whole pages of `limits.kv_format`."""
    if limits.kv_format not in ("deployed", "bf16", "fp32"):
        raise ValueError(f"engine.kv_format: expected deployed, bf16 or fp32, got {limits.kv_format!r}")
    pb, sb = page_bytes(cfg, limits.kv_format), slot_bytes(cfg, limits.kv_format)
    slots = limits.max_num_seqs + limits.snapshots
    num_pages = (limits.kv_budget_bytes - slots * sb) // pb
    if num_pages < 1:
        raise ValueError(
            f"engine.kv_budget_bytes: {limits.kv_budget_bytes} B cannot hold {slots} state slots of "
            f"{sb} B plus one {pb} B page; raise it or lower engine.max_num_seqs"
        )
    return num_pages, pb, sb


def copy_slot(kv: KVCache, src: int, dst: int) -> None:
    """Copy one state slot (window ring + compressor tails of every layer) into another."""
    for lc in kv.layers.values():
        lc.window[dst] = lc.window[src]
        for st in (lc.comp, lc.index_comp):
            if st is not None:
                st.tail[dst] = st.tail[src]


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0; otherwise temperature + nucleus (top_p) sampling from `gen`."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < params.top_p  # smallest prefix reaching top_p (the first always kept)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(self, model: Any, limits: EngineLimits, metrics: Any | None = None, runner: ModelRunner | None = None):
        """`runner` runs the model's steps on its device (default: where the model's weights are, with
        `limits.micro_batches`)."""
        if runner is None:
            w = model.embed.weight
            runner = ModelRunner(model, w.device, w.dtype, micro_batches=limits.micro_batches)
        self.model, self.runner, self.cfg, self.limits, self.metrics = model, runner, model.cfg, limits, metrics
        num_pages, pb, sb = kv_layout(self.cfg, limits)
        slots, snaps = limits.max_num_seqs, limits.snapshots
        graphs = limits.cuda_graphs and runner.device.type == "cuda" and graphs_enabled()
        # CUDA graphs pad decode batches with rows of one scratch slot and page past the managed ones
        self.kv = runner.new_cache(num_pages + graphs, slots + snaps + graphs, limits.kv_format)
        if graphs:
            runner.graphs = DecodeGraphs(
                model,
                self.kv,
                pages_for(self.cfg, limits.max_context_tokens),
                scratch_slot=slots + snaps,
                scratch_page=num_pages,
            )
        self.kv_manager = KVManager(
            num_pages, slots, page_tokens(self.cfg), pb, sb, snaps, copy_slot=lambda s, d: copy_slot(self.kv, s, d)
        )
        self.scheduler = Scheduler(
            self.kv_manager,
            limits.max_num_seqs,
            limits.max_batch_tokens,
            limits.max_queue,
            limits.max_context_tokens,
        )
        self.snapshot_bytes = snaps * sb
        self.queues: dict[str, asyncio.Queue] = {}
        self.seqs: dict[str, Sequence] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.aborts: set[str] = set()
        self.loop_task: asyncio.Task | None = None
        self.num_steps = 0
        self._preempt_seen = 0
        self.retry_backoff_s = 1.0
        self.layer_pages = {
            "csa": self.cfg.count_layers("csa"),
            "indexer": self.cfg.count_layers("csa"),
            "hca": self.cfg.count_layers("hca"),
        }

    # -- requests --------------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream {token_ids, finish_reason, num_prompt_tokens, num_output_tokens} for one request; an
        item holds every token produced since the caller took the previous one."""
        rid = str(request.get("request_id") or f"req-{random.getrandbits(48):012x}")
        if rid in self.seqs:
            raise BadRequest("request_id", f"{rid!r} is already running")
        params = SamplingParams.from_request(request)
        seq = Sequence(rid, prompt_ids(request, self.cfg.vocab_size), params)
        gen = None
        if params.temperature > 0:  # built before admission: a request that cannot be seeded never queues
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        queue: asyncio.Queue = asyncio.Queue()
        self.seqs[rid], self.queues[rid] = seq, queue
        if gen is not None:
            self.generators[rid] = gen
        try:
            self.scheduler.add(seq)
        except Exception as e:
            self._forget(seq)
            self._count_reject(e)
            raise
        done, held = False, None
        try:  # admitted: from here on every exit either finishes the request or aborts it
            self._kick()
            while True:
                item = held if held is not None else await queue.get()
                held = None
                if isinstance(item, BaseException):
                    done = True
                    raise item
                # Tokens the caller has not taken yet leave as one item (a lagging stream catches up
                # in one hop, not one per token); an error after them waits for the next turn.
                while item["finish_reason"] is None and not queue.empty():
                    nxt = queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        held = nxt
                        break
                    item = {**nxt, "token_ids": item["token_ids"] + nxt["token_ids"]}
                done = item["finish_reason"] is not None
                yield item
                if done:
                    return
        finally:
            if not done:  # the caller went away (client disconnect, cancellation)
                self.abort(rid)

    def abort(self, request_id: str) -> bool:
        """Stop a request; its stream ends with finish_reason "abort". Takes effect between steps."""
        if request_id not in self.seqs:
            return False
        self.aborts.add(request_id)
        self._kick()
        return True

    def stats(self) -> dict[str, Any]:
        kvm, s = self.kv_manager, self.scheduler
        return {
            "kv_cache_utilization": kvm.utilization,
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "capacity_tokens": kvm.capacity_tokens,
            "num_pages": kvm.num_pages,
            "num_pages_in_use": kvm.num_used_pages,
            "num_state_slots": kvm.num_slots,
            "num_state_slots_in_use": kvm.num_used_slots,
            "page_bytes": kvm.page_bytes,
            "slot_bytes": kvm.slot_bytes,
            "kv_bytes_in_use": kvm.used_bytes,
            "kv_capacity_bytes": kvm.capacity_bytes,
            "prefix_snapshot_bytes": self.snapshot_bytes,
            "prefix_cache_queries": kvm.prefix_queries,
            "prefix_cache_hits": kvm.prefix_hits,
            "num_preemptions": s.num_preemptions,
            "num_steps": self.num_steps,
            "max_context_tokens": s.max_context_tokens,
        }

    # -- the loop --------------------------------------------------------------------------------
    def _kick(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._apply_aborts()
            batch = self.scheduler.schedule()
            self._export()
            if not batch:
                return  # idle (new requests restart the loop)
            now = time.monotonic()
            for seq, _ in batch:
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                    self._observe("queue_time", now - seq.arrival)
            try:
                logits = await asyncio.to_thread(self.runner.run, batch, self.kv)
            except ShardUnavailable as e:
                await self._retry_later(batch, e)
                continue
            except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the rest
                log.exception("engine step failed")
                for seq, _ in batch:
                    self._fail(seq, e)
                continue
            self.num_steps += 1
            last = {id(seq): lg for (seq, _), lg in zip(batch, logits, strict=True)}
            for seq in self.scheduler.advance(batch):
                self._append(seq, sample(last[id(seq)], seq.params, self.generators.get(seq.request_id)))
            await asyncio.sleep(0)

    async def _retry_later(self, batch: list[tuple[Sequence, int]], error: ShardUnavailable) -> None:
        """Experts unreachable mid-step: the step's cache writes are partial, so its sequences are
        preempted (recomputed later, outputs unchanged) and retried after a backoff, while Serve
        replaces the shard replica; after `SHARD_RETRIES` failed steps a request fails."""
        log.warning("expert shard unavailable, retrying the step's requests: %s", error)
        for seq, _ in reversed(batch):
            seq.shard_failures += 1
            if seq.shard_failures > SHARD_RETRIES:
                self._fail(seq, error)
            elif seq.status is Status.RUNNING:
                self.scheduler.preempt(seq)
        worst = max(seq.shard_failures for seq, _ in batch)
        await asyncio.sleep(min(self.retry_backoff_s * 2 ** (worst - 1), 8.0))

    def _append(self, seq: Sequence, token: int) -> None:
        now = time.monotonic()
        p = seq.params
        seq.output.append(token)
        self._inc("generation_tokens", 1)
        if seq.first_token is None:
            seq.first_token = now
            self._inc("prompt_tokens", len(seq.prompt))
            self._observe("ttft", now - seq.arrival)
        else:
            self._observe("itl", now - seq.last_token)
        seq.last_token = now
        reason = None
        if token in p.stop_token_ids or (token == self.cfg.eos_token_id and not p.ignore_eos):
            reason = "stop"
        elif len(seq.output) >= p.max_tokens:
            reason = "length"
        emitted = [] if reason == "stop" else [token]  # the stopping token is not part of the text
        if reason:
            self.scheduler.finish(seq, reason)
        self._emit(seq, emitted, reason)

    def _emit(self, seq: Sequence, token_ids: list[int], reason: str | None) -> None:
        queue = self.queues.get(seq.request_id)
        if queue is not None:
            queue.put_nowait(
                {
                    "token_ids": token_ids,
                    "finish_reason": reason,
                    "num_prompt_tokens": len(seq.prompt),
                    "num_output_tokens": len(seq.output),
                }
            )
        if reason:
            self._forget(seq)
            self._inc("request_success", 1, {"finished_reason": reason})
            self._observe("e2e_latency", time.monotonic() - seq.arrival)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self.scheduler.finish(seq, "error")
        queue = self.queues.get(seq.request_id)
        if queue is not None:
            queue.put_nowait(error)
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        for d in (self.seqs, self.queues, self.generators):
            d.pop(seq.request_id, None)

    def _apply_aborts(self) -> None:
        for rid in self.aborts:
            seq = self.seqs.get(rid)
            if seq is not None and seq.status is not Status.FINISHED:
                self.scheduler.finish(seq, "abort")
                self._emit(seq, [], "abort")
        self.aborts.clear()

    # -- metrics ---------------------------------------------------------------------------------
    def _export(self) -> None:
        m = self.metrics
        if m is None:
            return
        kvm, s = self.kv_manager, self.scheduler
        m.kv_cache_usage.set(kvm.utilization)
        m.requests_running.set(len(s.running))
        m.requests_waiting.set(len(s.waiting))
        m.kv_state_slots_in_use.set(kvm.num_used_slots)
        for kind, layers in self.layer_pages.items():
            m.kv_pages_in_use.set(kvm.num_used_pages * layers, tags={"kind": kind})
        self._inc("preemptions", s.num_preemptions - self._preempt_seen)
        self._preempt_seen = s.num_preemptions

    def _inc(self, attr: str, value: float, tags: dict[str, str] | None = None) -> None:
        if self.metrics is not None and value:
            getattr(self.metrics, attr).inc(value, tags=tags)

    def _observe(self, attr: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, attr).observe(value)

    def _count_reject(self, e: Exception) -> None:
        if self.metrics is None:
            return
        if isinstance(e, Overloaded):
            self.metrics.requests_rejected.inc(tags={"reason": "queue_full"})
        elif isinstance(e, ContextTooLong):
            self.metrics.request_errors.inc(tags={"kind": "context_too_long"})
