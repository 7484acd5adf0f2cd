"""The side buffers: one layer's per-sequence summaries, and the decode of one step's rows.

A summary is keyed by the physical block that holds its sequence's newest token. That block
was written by the sequence itself at that step (vLLM shares only full, hashed blocks), so no
other live sequence can hold the key. An entry is trusted only if it describes exactly the
previous length and the same blocks; every block a step writes drops the entry keyed there, and
entries not continued at the previous step (finished, preempted or skipped sequences) are
dropped too. A miss is never wrong, only slower: the summary is rebuilt from the paged cache.

Imports torch and topkphi, never vllm.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch

from topkphi.backends.registry import get_backend
from topkphi.config import Config
from topkphi.integrations.vllm.paged import DecodePlan


@dataclass
class Entry:
    summary: object
    n_tokens: int
    blocks: tuple[int, ...]
    step: int
    nbytes: int


class SideMemory:
    """Bytes held by every store of one worker, against one cap."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.peak = limit, 0, 0

    def add(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)


class SummaryStore:
    """One layer's summaries, least recently continued first."""

    def __init__(self, memory: SideMemory) -> None:
        self.memory = memory
        self._entries: OrderedDict[int, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: int, n_tokens: int, blocks: tuple[int, ...]):
        """The summary of a sequence of ``n_tokens`` in ``blocks`` stored at ``key``, removed; or None."""
        entry = self._pop(key)
        if entry is None or entry.n_tokens != n_tokens or entry.blocks != blocks[: len(entry.blocks)]:
            return None
        return entry.summary

    def forget(self, keys, older_than: int) -> None:
        """Drop the entries at ``keys`` (blocks rewritten) and those last continued before ``older_than``."""
        for key in keys:
            self._pop(key)
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.step >= older_than:
                break
            self._pop(key)

    def put(self, key: int, summary, n_tokens: int, blocks: tuple[int, ...], step: int) -> None:
        self._pop(key)
        nbytes = summary_bytes(summary)
        self._entries[key] = Entry(summary, n_tokens, blocks, step, nbytes)
        self.memory.add(nbytes)
        while self.memory.used > self.memory.limit and len(self._entries) > 1:
            self._pop(next(iter(self._entries)))  # least recently continued: rebuilt if it comes back

    def _pop(self, key: int) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.memory.add(-entry.nbytes)
        return entry


def summary_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the tensor storage a summary holds (spare room of grown buffers included)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(summary_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(summary_bytes(x, seen) for x in obj)
    return 0


@dataclass
class DecodeCounts:
    """What one layer's decodes did: rows, summaries rebuilt, and the mean fraction of the KV read."""

    rows: int = 0
    rebuilt: int = 0
    read_fraction_sum: float = 0.0


class PagedDecoder:
    """One attention layer's topkphi decode over vLLM's paged cache.

    ``layout.gather`` copies each decoding sequence's K/V out of its blocks into ``[1,Hkv,N,d]``
    (O(N) per step: the simplest correct path, not yet the read saving), then the topkphi
    backend appends to the sequence's summary and decodes. ``cfg.scale`` is the layer's scale.
    """

    def __init__(self, cfg: Config, backend: str, memory: SideMemory) -> None:
        self.cfg = cfg
        self.backend = get_backend(backend)
        self.store = SummaryStore(memory)
        self.counts = DecodeCounts()

    def __call__(self, query: torch.Tensor, kv_cache: torch.Tensor, layout, plan: DecodePlan,
                 output: torch.Tensor) -> None:
        """``query [T,Hq,d]`` -> ``output [T,Hq,dv]`` for the plan's rows (``T >= len(plan.rows)``)."""
        bs = plan.block_size
        # continued summaries are taken before this step's writes drop the entries they sit at
        taken = [self.store.take(r.blocks[(r.n_tokens - 2) // bs], r.n_tokens - 1, r.blocks) if r.n_tokens > 1
                 else None for r in plan.rows]
        self.store.forget(plan.written, older_than=plan.step - 1)
        for row, summary in zip(plan.rows, taken):
            k, v = layout.gather(kv_cache, row.block_ids, row.n_tokens)
            if summary is None:
                summary = self.backend.build_summary(k, v, self.cfg)
                self.counts.rebuilt += 1
            else:
                summary = self.backend.append(summary, k, v, self.cfg)
            out, stats = self.backend.decode(query[row.token : row.token + 1], k, v, summary, self.cfg)
            output[row.token] = out[0].to(output.dtype)
            self.store.put(row.key, summary, row.n_tokens, row.blocks, plan.step)
            self.counts.rows += 1
            self.counts.read_fraction_sum += float(stats.read_fraction())


class WorkerState:
    """This process's decoders (one per attention layer) and the memory their side buffers hold."""

    def __init__(self) -> None:
        self.memory: SideMemory | None = None
        self.decoders: list[PagedDecoder] = []

    def memory_for(self, limit: int) -> SideMemory:
        if self.memory is None:
            self.memory = SideMemory(limit)
        return self.memory

    def stats(self) -> dict:
        """Totals over this worker's layers: decode rows, summaries rebuilt, mean fraction of the KV
        read per step, sequences held now, and the side buffers' bytes (now and at the peak)."""
        rows = sum(d.counts.rows for d in self.decoders)
        read = sum(d.counts.read_fraction_sum for d in self.decoders)
        memory = self.memory or SideMemory(0)
        return {
            "layers": len(self.decoders),
            "rows": rows,
            "rebuilt": sum(d.counts.rebuilt for d in self.decoders),
            "read_fraction": read / rows if rows else 1.0,
            "sequences": max((len(d.store) for d in self.decoders), default=0),
            "side_bytes": memory.used,
            "side_bytes_peak": memory.peak,
        }


_WORKER = WorkerState()


def worker() -> WorkerState:
    return _WORKER
