"""The scheduler: `--parallel` slots, one decode loop for all of them, prompt caching.

No HTTP here. A request comes in as a `Job` (token ids, sampling, limits) and its results go
out through the job's `emit` callback, as events: `Started`, `Piece`s of text, then `Finished`
or `Failed`. One thread runs the model; each pass of its loop

  1. drops cancelled jobs (a client that went away) and frees their slots,
  2. gives waiting jobs the idle slots: the slot whose cached tokens share the longest prefix
     with the prompt (prompt caching: only the rest is prefilled), else the least recently used,
  3. runs one prefill chunk of one newly admitted job (so a long prompt never stalls the others
     for more than a chunk),
  4. runs one batched decode step (`batch.Batch`) for every slot that is generating.

A job therefore joins and leaves the batch between steps, and a cancelled job's slot is free
after the step that was running when it was cancelled.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import mlx.core as mx

from .. import _blas
from ..batch import Batch, Sequence
from ..chat import common_prefix
from ..errors import MlxLlamaError
from ..sample import SamplingParams

if TYPE_CHECKING:
    from ..constraints import TokenMatcher


@dataclass
class Started:
    cached_tokens: int  # prompt tokens the slot's cache already held


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # all of them, the cached ones included
    completion_tokens: int  # every sampled token, an end-of-generation token included
    cached_tokens: int
    prompt_seconds: float  # from the slot taking the job to the first token
    generation_seconds: float  # the tokens after the first


@dataclass
class Failed:
    message: str  # one line, for the client


class Busy(MlxLlamaError):
    """Too many jobs are waiting for a slot."""


@dataclass(eq=False)
class Job:
    ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: set[int]
    stop_strings: tuple[str, ...] = ()
    matcher: TokenMatcher | None = None  # the constraint the answer must match, this job's state in it
    emit: Callable[[object], None] = lambda event: None  # called from the scheduler's thread
    cancelled: bool = False


@dataclass(eq=False)
class Slot:
    index: int
    cache: list
    tokens: list[int] = field(default_factory=list)  # the tokens `cache` holds
    job: Job | None = None
    seq: Sequence | None = None
    state: str = "idle"  # "idle", "prefill" or "decode"
    released: float = 0.0  # when it last became idle (least recently used first)
    admitted: float = 0.0

    def held(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache can keep: at least one is left to prefill."""
        return min(common_prefix(ids, self.tokens), len(ids) - 1)


class Scheduler:
    def __init__(self, model, tokenizer, slots: int = 1, context: int | None = None, max_waiting: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.context = min(context or model.config.context_length, model.config.context_length)
        self.slots = [Slot(i, model.make_cache()) for i in range(slots)]
        self.batch: Batch | None = None  # made by the model's thread, whose MLX stream it uses
        self.max_waiting = max_waiting
        self.waiting: deque[Job] = deque()
        self.steps = 0  # decode steps run so far
        self.lock = threading.Condition()
        self.running = False
        self.thread = threading.Thread(target=self._loop, name="mlx_llama-scheduler", daemon=True)

    # ---- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.lock:
            if len(self.waiting) >= self.max_waiting:
                raise Busy(f"the server is busy: {len(self.waiting)} requests are waiting for a slot")
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop the job at the next step (nothing more is emitted); a no-op once it finished."""
        with self.lock:
            job.cancelled = True
            self.lock.notify()

    def status(self) -> dict:
        with self.lock:
            slots = [{"id": s.index, "state": s.state, "cached_tokens": len(s.tokens) if s.state == "idle" else None,
                      "prompt_tokens": len(s.job.ids) if s.job else None,
                      "generated_tokens": len(s.seq.stats.sampled) if s.seq else None} for s in self.slots]
            return {"slots": slots, "waiting": len(self.waiting), "steps": self.steps, "context": self.context}

    # ---- the model's thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        # MLX's streams belong to a thread: arrays this thread computes are made here
        stream = mx.new_stream(mx.default_device())
        mx.set_default_stream(stream)
        _blas.drain_at_exit(stream)
        self.batch = Batch(self.model, len(self.slots))
        while True:
            with self.lock:
                while self.running and not self.waiting and all(s.state == "idle" for s in self.slots):
                    self.lock.wait()
                if not self.running:
                    return
                self._drop_cancelled()
                admitted = self._assign()
            try:
                for slot in admitted:
                    self._start(slot)
                self._prefill()
                self._decode()
            except Exception as e:  # a bug, not a bad request: fail what runs, keep serving
                traceback.print_exc(file=sys.stderr)
                self._fail_all(f"internal error: {type(e).__name__}: {e}")

    def _drop_cancelled(self) -> None:
        self.waiting = deque(j for j in self.waiting if not j.cancelled)
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self._release(slot)

    def _assign(self) -> list[Slot]:
        """Give waiting jobs idle slots; the slots' caches are not touched yet."""
        admitted = []
        while self.waiting:
            idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                break
            job = self.waiting.popleft()
            # the longest cached prefix first, then the least recently used
            slot = max(idle, key=lambda s: (s.held(job.ids), -s.released))
            slot.job, slot.state, slot.admitted = job, "prefill", time.monotonic()
            admitted.append(slot)
        return admitted

    def _start(self, slot: Slot) -> None:
        """Cut the slot's cache back to the prompt's cached prefix and set up its sequence."""
        job = slot.job
        keep = slot.held(job.ids)
        for layer in slot.cache:
            layer.trim(layer.offset - keep)
        slot.tokens = slot.tokens[:keep]
        try:
            slot.seq = Sequence(self.model, self.tokenizer, job.ids[keep:], job.max_tokens, params=job.params,
                                cache=slot.cache, stop_ids=job.stop_ids, stop_strings=job.stop_strings,
                                past=job.ids[:keep], context=self.context, matcher=job.matcher)
        except MlxLlamaError as e:
            job.emit(Failed(str(e)))
            self._release(slot)
            return
        job.emit(Started(keep))

    def _prefill(self) -> None:
        """One chunk of the prompt of the job admitted first; its first token once the prompt is in."""
        filling = [s for s in self.slots if s.state == "prefill" and s.seq is not None]
        if not filling:
            return
        slot = min(filling, key=lambda s: s.admitted)
        try:
            token = slot.seq.prefill()
        except MlxLlamaError as e:  # the constraint's first mask: this job fails, the others go on
            slot.job.emit(Failed(str(e)))
            self._release(slot)
            return
        if token is not None:
            self._deliver(slot, token)
            if slot.job is not None:  # not finished by its first token
                slot.state = "decode"
                self.batch.add(slot.seq)

    def _decode(self) -> None:
        if not len(self.batch):
            return
        handed = self.batch.step()
        self.steps += 1
        by_seq = {id(s.seq): s for s in self.slots if s.seq is not None}
        for seq, token in handed:
            slot = by_seq[id(seq)]
            if not slot.job.cancelled:
                self._deliver(slot, token)
        for slot in self.slots:
            if slot.seq is not None and slot.seq.error is not None:
                slot.job.emit(Failed(slot.seq.error))
                self._release(slot)

    def _deliver(self, slot: Slot, token: int) -> None:
        seq, job = slot.seq, slot.job
        text = seq.add(token)
        if text:
            job.emit(Piece(text))
        if seq.done:
            st = seq.stats
            reason = "stop" if st.finish_reason == "stop" else "length"  # OpenAI calls the context's end "length"
            job.emit(Finished(reason, st.prompt_tokens + st.cached_tokens, len(st.sampled), st.cached_tokens,
                              st.prompt_seconds, st.generation_seconds))
            self._release(slot)

    def _release(self, slot: Slot) -> None:
        """The slot becomes idle; its cache keeps what it holds for a later prompt to reuse."""
        if slot.seq is not None:
            if slot.state == "decode":
                self.batch.remove(slot.seq)
            slot.tokens = (slot.job.ids + slot.seq.stats.sampled)[: slot.cache[0].offset]
        else:
            slot.tokens = slot.tokens[: slot.cache[0].offset]
        with self.lock:
            slot.job, slot.seq, slot.state, slot.released = None, None, "idle", time.monotonic()

    def _fail_all(self, message: str) -> None:
        """After an unexpected error: fail every running job and forget what the caches hold."""
        for slot in self.slots:
            if slot.job is not None:
                slot.job.emit(Failed(message))
                self._release(slot)
            for layer in slot.cache:
                layer.trim(layer.offset)
            slot.tokens = []
