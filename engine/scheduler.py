"""The slot loop: many sequences, one ``llama_decode`` per step (continuous batching).

Concurrency model: none inside. The scheduler lives on the worker's one thread, which
alternates between draining the pipe (``submit``/``cancel``, never blocking while work is in
flight) and calling ``step``. A single thread needs no locks around the model, the slots or
the pipe, and loses nothing: a message can only be acted on between two decodes anyway, so
cancellation takes effect within one step either way. A reader thread would add a queue and a
lock to reach the same point.

Each ``step``:

1. Admits queued requests into idle slots. A request takes the idle slot whose cached tokens
   share the longest prefix with its prompt and keeps that prefix's KV (``cached_tokens``). When
   the RAM prompt cache holds a longer prefix than any slot, that state is restored into the
   least recently used idle slot. A slot's previous conversation, when the new prompt does not
   extend it, is first saved to the RAM cache (bounded by bytes, least recently used out).
2. Plans one batch: the pending token of every generating sequence, then prompt chunks of
   sequences still prefilling, oldest first, up to ``n_batch`` tokens in all.
3. Decodes once, samples every sequence whose last pending token was in the batch from its own
   logits row, streams its text, and finishes it on EOG, a stop string, ``max_tokens`` or cancel.

Shared prompts (``n`` choices, or several requests sending the same prompt at once): a request
admitted while another sequence with exactly the same tokens has not sampled yet *follows* it
instead of prefilling: its slot waits, and when the leader's last prompt token is decoded the
leader's KV is copied into the follower's sequence (in the unified cache the cells are shared,
not duplicated) and the follower samples its first token from the leader's logits row. If the
leader goes away first, its followers prefill for themselves.

KV memory is one unified cache of ``n_ctx`` cells for all sequences (see ``llama_adapter``), so
one sequence may use the whole context. The scheduler keeps the sum of the slots' tokens within
it: idle slots are evicted (to the RAM cache) first; when active sequences alone do not fit, the
most recently admitted one is preempted: its KV is dropped and it goes back to the front of the
queue with its tokens so far and its sampler, to be prefilled again (recompute) when room returns.
The oldest sequence always progresses, so every sequence eventually finishes. A prompt that
leaves no room in the context is refused at submission; ``max_tokens`` is clamped to the room.

Media (pictures, sounds; see ``engine.projector``): at submission each media input is split
by the projector into text tokens and encoder chunks, and spliced into the prompt; a chunk's
cells appear in ``tokens`` as placeholder ids derived from the media's digest, so prefix
matching, the RAM prompt cache and shared prompts treat a picture like any run of tokens: a
later turn about the same picture reuses its KV and does not encode it again, and a
different picture never matches. Text around a chunk is read in the ordinary batches; each
step also encodes at most one chunk, for one sequence (the oldest that reached one), with
its own decodes, beside the other sequences' batch. A prefix is kept or cut at a chunk's
edges, never inside one.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine import protocol as p
from engine.llama_adapter import GRAMMAR_COMPLETE, LoadedModel, SamplerError, SequenceSampler
from engine.projector import MediaChunk, MediaError
from engine.text import TextStream

log = logging.getLogger(__name__)

MIN_CACHED_TOKENS = 8  # a conversation shorter than this is cheaper to prefill again than to keep


@dataclass
class Sequence:
    """One generation request in flight: its tokens so far, sampler and text state."""

    id: int
    prompt_tokens: int
    params: p.SamplingParams
    sampler: SequenceSampler
    text: TextStream
    max_tokens: int
    tokens: list[int]  # prompt + sampled tokens; the last one may still await its decode
    order: int  # admission order: the oldest progresses first, the newest is preempted first
    completion_tokens: int = 0
    first_token_at: float | None = None
    started: bool = False
    # Log probabilities of tokens whose text is still held back (a stop string may begin), each
    # with the character count its text ends at: they go out with their text, or not at all.
    held_logprobs: list[tuple[p.TokenLogprob, int]] = field(default_factory=list)
    media: dict[int, MediaChunk] = field(default_factory=dict)  # index in ``tokens`` -> the chunk starting there

    def position(self, index: int) -> int:
        """The KV position of ``tokens[index]``: its index, less the cells beyond their
        positions of the media before it (M-RoPE models give a picture fewer positions)."""
        if not self.media:  # text only, the common case: called for every token put in a batch
            return index
        shift = sum(c.n_tokens - c.n_pos for start, c in self.media.items() if start + c.n_tokens <= index)
        return index - shift

    def media_floor(self, index: int) -> int:
        """``index``, or the start of the media chunk it falls inside: a chunk is kept whole or not at all."""
        for start, chunk in self.media.items():
            if start < index < start + chunk.n_tokens:
                return start
        return index

    def text_run(self, index: int, limit: int) -> int:
        """How many of at most ``limit`` tokens from ``index`` are text (before the next media chunk)."""
        if not self.media:
            return limit
        ahead = [start - index for start in self.media if start >= index]
        return min([limit, *ahead])


@dataclass
class Slot:
    """One KV sequence id; ``cache`` lists the tokens it holds, at positions 0..len-1."""

    seq: int
    cache: list[int] = field(default_factory=list)
    request: Sequence | None = None
    last_used: int = 0
    follows: Slot | None = None  # the slot whose prompt this one's request shares (see the docstring)
    # (slot, n): this slot's first n cells are the same KV cells as that slot's (copied by
    # ``_catch_up``), so they are counted once.
    shares: tuple[Slot, int] | None = None

    def pending(self) -> int:
        assert self.request is not None
        return len(self.request.tokens) - len(self.cache)


@dataclass
class _Entry:
    tokens: list[int]
    data: memoryview  # a view of a bytearray from ``LoadedModel.state_get``


class PromptCache:
    """KV states of conversations pushed out of their slot, least recently used out first.

    The buffer of an entry restored into a slot is kept as the ``spare`` for the next save
    (two conversations taking turns swap one buffer instead of faulting in fresh memory each
    turn); it is outside ``max_bytes``, and at most one entry's size.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self._spare: bytearray | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def take_spare(self) -> bytearray | None:
        """The buffer of the last restored entry, for ``state_get`` to write into."""
        spare, self._spare = self._spare, None
        return spare

    def recycle(self, data: memoryview) -> None:
        """An entry's state was restored: keep its buffer as the spare."""
        buffer = data.obj
        data.release()
        if isinstance(buffer, bytearray) and len(buffer) <= self.max_bytes:
            self._spare = buffer

    def put(self, tokens: list[int], data: memoryview) -> bool:
        """Keep ``data`` for ``tokens`` unless it alone exceeds the budget; entries it extends go."""
        if not data or len(data.obj) > self.max_bytes:  # type: ignore[arg-type]
            return False
        for key, entry in list(self._entries.items()):
            if tokens[: len(entry.tokens)] == entry.tokens:
                self._remove(key)
        while self.bytes + len(data.obj) > self.max_bytes:  # type: ignore[arg-type]
            self._remove(next(iter(self._entries)))
        self._entries[self._next_key] = _Entry(list(tokens), data)
        self._next_key += 1
        self.bytes += len(data.obj)  # type: ignore[arg-type]
        return True

    def best(self, prompt: list[int]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and that length."""
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            n = common_prefix(entry.tokens, prompt)
            if n > best_len:
                best_key, best_len = key, n
        return best_key, best_len

    def pop(self, key: int) -> _Entry:
        entry = self._entries[key]
        self._remove(key)
        return entry

    def _remove(self, key: int) -> None:
        self.bytes -= len(self._entries.pop(key).data.obj)  # type: ignore[arg-type]


def _released(request: Sequence) -> tuple[p.TokenLogprob, ...]:
    """The held log probabilities whose tokens' text has now been emitted whole."""
    held, emitted = request.held_logprobs, request.text.emitted
    n = 0
    while n < len(held) and held[n][1] <= emitted:
        n += 1
    released = tuple(entry for entry, _ in held[:n])
    del held[:n]
    return released


def media_placeholder(digest: bytes, part: int) -> int:
    """The token id standing for the cells of part ``part`` of the media with ``digest`` in a
    sequence's tokens: negative (no vocabulary id is), and 128 bits of the digest wide, so
    two different pictures never share one."""
    return -(1 + (int.from_bytes(digest[:16], "big") << 8) + part % 256)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Slots, a queue and the step loop for one loaded model. See the module docstring."""

    def __init__(self, model: LoadedModel, send: Callable[[Any], None], parallel: int,
                 prompt_cache_bytes: int) -> None:
        self.model = model
        self.send = send
        self.slots = [Slot(seq) for seq in range(max(1, parallel))]
        self.queue: deque[Sequence] = deque()
        self.cache = PromptCache(prompt_cache_bytes)
        self.kv_size = model.n_ctx
        self._held = False  # a sequence was preempted: admit nothing until one finishes
        self.step_delay = 0.0  # test seam (protocol.Tune): seconds slept after each decode
        self.fail_after_steps: int | None = None  # test seam: the decode fails after this many more steps
        self._clock = 0  # steps and admissions, for LRU order
        self._order = 0
        self.stats: dict[str, int] = dict.fromkeys(
            ("steps", "decoded_tokens", "multi_sequence_steps", "mixed_steps", "max_sequences_in_step",
             "prefill_chunks", "preemptions", "kv_full", "cache_saves", "cache_restores", "cached_tokens",
             "shared_prompts", "media_chunks", "media_tokens", "media_beside_generation"), 0)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(slot.request for slot in self.slots)

    def snapshot(self) -> dict[str, int]:
        """Counters for tests and the status page."""
        active = sum(1 for slot in self.slots if slot.request)
        return {**self.stats, "active": active, "queued": len(self.queue), "prompt_cache_entries": len(self.cache),
                "prompt_cache_bytes": self.cache.bytes, "kv_used": self._kv_used()}

    # ---- requests ----

    def submit(self, message: p.Generate) -> None:
        """Queue a generation, or answer with an ``Error`` at once when it cannot run."""
        prompt = list(message.prompt)
        error = self._judge_tokens(prompt)
        media: dict[int, MediaChunk] = {}
        if error is None and message.media:
            try:
                prompt, media = self._with_media(prompt, message.media)
            except MediaError as exc:
                self.send(p.Error(message.id, "invalid_request", str(exc), param=exc.param, code="invalid_media"))
                return
            error = self._judge_media(prompt, media)
        error = error or self._judge_length(prompt)
        if error is not None:
            self._free_media(media)
            self.send(p.Error(message.id, "invalid_request", error[0], param="prompt", code=error[1]))
            return
        try:
            sampler = self.model.sampler(message.params)
        except SamplerError as exc:
            self._free_media(media)
            self.send(p.Error(message.id, "invalid_request", str(exc), param=exc.param))
            return
        room = self.kv_size - len(prompt)
        limit = message.params.max_tokens
        max_tokens = room if limit is None else max(0, min(limit, room))
        self._order += 1
        self.queue.append(Sequence(message.id, len(prompt), message.params, sampler, TextStream(message.params.stop),
                                   max_tokens, prompt, self._order, media=media))

    def _with_media(self, prompt: list[int],
                    inputs: tuple[p.MediaInput, ...]) -> tuple[list[int], dict[int, MediaChunk]]:
        """``prompt`` with each media input spliced in: its text tokens as they are, each
        encoder chunk as placeholder ids derived from the media's digest (so the prompt cache
        matches a conversation only with the very same pictures, and a cached one is not
        encoded again). Raises ``MediaError``; frees what it made when it does."""
        tokens: list[int] = []
        media: dict[int, MediaChunk] = {}
        taken = 0
        try:
            for item in sorted(inputs, key=lambda m: m.at):
                tokens.extend(prompt[taken:item.at])
                taken = max(taken, item.at)
                for part, piece in enumerate(self.model.split_media(item)):
                    if isinstance(piece, MediaChunk):
                        media[len(tokens)] = piece
                        tokens.extend([media_placeholder(item.digest, part)] * piece.n_tokens)
                    else:
                        tokens.extend(piece)
        except BaseException:
            self._free_media(media)
            raise
        tokens.extend(prompt[taken:])
        return tokens, media

    def _free_media(self, media: dict[int, MediaChunk]) -> None:
        for chunk in media.values():
            self.model.free_media(chunk)

    def _judge_tokens(self, prompt: list[int]) -> tuple[str, str | None] | None:
        if not prompt:
            return "the prompt is empty", None
        if not all(self.model.valid_token(t) for t in prompt):
            return f"prompt token ids must be between 0 and {self.model.n_vocab - 1}", None
        return None

    @staticmethod
    def _judge_media(prompt: list[int], media: dict[int, MediaChunk]) -> tuple[str, str | None] | None:
        if media and prompt[-1] < 0:  # the first token is sampled from the last prompt token's logits
            return "the prompt must end with text, not with a picture or a sound", None
        return None

    def _judge_length(self, prompt: list[int]) -> tuple[str, str | None] | None:
        if len(prompt) >= self.kv_size:
            return (f"This model's context window is {self.kv_size} tokens; the prompt has {len(prompt)} tokens, "
                    "leaving no room for a completion"), "context_length_exceeded"
        return None

    def cancel(self, request_id: int) -> None:
        """Stop a request now: queued or active, it ends with ``finish_reason="cancelled"``."""
        for request in self.queue:
            if request.id == request_id:
                self.queue.remove(request)
                self._close(request)
                self.send(p.Done(request.id, request.completion_tokens, "cancelled", request.first_token_at))
                return
        for slot in self.slots:
            if slot.request is not None and slot.request.id == request_id:
                self._finish(slot, "cancelled")
                return

    # ---- the step ----

    def step(self) -> None:
        """Admit, plan one batch, decode it once, sample and stream. See the module docstring."""
        self._clock += 1
        self._admit()
        media = self._plan_media()
        plan = self._plan(media[1].n_tokens if media is not None else 0)
        if media is not None and media[0].request is not None:  # (planning may have preempted it)
            self._eval_media(*media)
            if any(n == 1 and slot.request and slot.request.completion_tokens for slot, n in plan):
                self.stats["media_beside_generation"] += 1
        if not plan:
            return
        logits_rows = self._fill_batch(plan)
        rc = self._decode()
        if rc != 0:
            self._decode_failed(plan, rc)
            return
        self._count(plan)
        for slot, n in plan:
            request = slot.request
            assert request is not None
            slot.cache.extend(request.tokens[len(slot.cache): len(slot.cache) + n])
            slot.last_used = self._clock
            row = logits_rows.get(slot.seq)
            if row is None:
                continue
            for follower in [s for s in self.slots if s.follows is slot]:
                self._catch_up(follower, slot, row)
            self._sample(slot, row)

    def _sample(self, slot: Slot, row: int) -> None:
        request = slot.request
        assert request is not None
        try:
            token = request.sampler.sample(row)
        except SamplerError as exc:  # the grammar allows nothing, or too slowly: the request's fault
            self._refuse(slot, str(exc), exc.param)
            return
        if token == GRAMMAR_COMPLETE:
            self._finish(slot, "stop")
        else:
            self._sampled(slot, token, row)

    def _catch_up(self, follower: Slot, leader: Slot, row: int) -> None:
        """Give ``follower`` the leader's freshly decoded prompt and sample its first token."""
        follower.follows = None
        assert leader.request is not None
        self.model.seq_cp(leader.seq, follower.seq, 0, leader.request.position(len(leader.cache)))
        follower.cache = list(leader.cache)
        follower.shares = (leader, len(leader.cache))
        follower.last_used = self._clock
        self.stats["shared_prompts"] += 1
        self._sample(follower, row)

    def _decode(self) -> int:
        if self.fail_after_steps is not None:
            self.fail_after_steps -= 1
            if self.fail_after_steps < 0:
                self.fail_after_steps = None
                return -3  # what llama_decode answers when a compute fails
        rc = self.model.decode()
        if self.step_delay:
            time.sleep(self.step_delay)
        return rc

    def _fill_batch(self, plan: list[tuple[Slot, int]]) -> dict[int, int]:
        """Write the plan into the batch; return the logits row of each sequence that samples."""
        batch = self.model.batch
        batch.clear()
        rows: dict[int, int] = {}
        for slot, n in plan:
            request = slot.request
            assert request is not None
            start = len(slot.cache)
            last = start + n == len(request.tokens)
            for position in range(start, start + n):
                index = batch.add(request.tokens[position], request.position(position), slot.seq,
                                  last and position == start + n - 1)
            if last:
                rows[slot.seq] = index
        return rows

    def _count(self, plan: list[tuple[Slot, int]]) -> None:
        stats = self.stats
        stats["steps"] += 1
        stats["decoded_tokens"] += sum(n for _, n in plan)
        stats["max_sequences_in_step"] = max(stats["max_sequences_in_step"], len(plan))
        if len(plan) > 1:
            stats["multi_sequence_steps"] += 1
        chunks = sum(1 for _, n in plan if n > 1)
        stats["prefill_chunks"] += chunks
        if chunks and any(n == 1 and slot.request and slot.request.completion_tokens for slot, n in plan):
            stats["mixed_steps"] += 1  # a prompt chunk decoded beside a generating sequence

    def _sampled(self, slot: Slot, token: int, row: int) -> None:
        request = slot.request
        assert request is not None
        params = request.params
        if self.model.is_eog(token) and not params.ignore_eos:
            self._finish(slot, "stop")
            return
        request.completion_tokens += 1
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        text, stopped = request.text.feed(self.model.piece(token, token in params.preserved_tokens))
        if params.logprobs is not None:
            request.held_logprobs.append((self.model.logprobs(row, token, params.logprobs), request.text.decoded))
            self.send(p.Delta(request.id, text, _released(request)))
        elif text:
            self.send(p.Delta(request.id, text))
        if stopped:
            self._finish(slot, "stop")
        elif request.completion_tokens >= request.max_tokens:
            self._finish(slot, "length")
        else:
            request.tokens.append(token)

    def _finish(self, slot: Slot, reason: p.FinishReason) -> None:
        """End the slot's request; its KV stays in the slot for the next request's prefix."""
        request = slot.request
        assert request is not None
        self._vacate(slot)
        self._held = False
        slot.last_used = self._clock
        self._close(request)
        if reason != "cancelled":
            tail = request.text.flush()
            # After a stop string the text it cut is gone, and the entries of its tokens with it.
            logprobs = _released(request)
            if tail or logprobs:
                self.send(p.Delta(request.id, tail, logprobs))
        self.send(p.Done(request.id, request.completion_tokens, reason, request.first_token_at, request.text.stop))

    def _refuse(self, slot: Slot, message: str, param: str) -> None:
        request = slot.request
        assert request is not None
        self._vacate(slot)
        self._held = False
        self._close(request)
        self.send(p.Error(request.id, "invalid_request", message, param=param))

    def _fail(self, slot: Slot, message: str) -> None:
        request = slot.request
        assert request is not None
        self._vacate(slot)
        self._held = False
        self._close(request)
        self.send(p.Error(request.id, "internal", message))

    def _close(self, request: Sequence) -> None:
        request.sampler.close()
        self._free_media(request.media)

    def _vacate(self, slot: Slot) -> None:
        """Take the slot's request away; requests that were to share its prompt prefill for themselves."""
        slot.request = None
        slot.follows = None
        for other in self.slots:
            if other.follows is slot:
                other.follows = None

    def _decode_failed(self, plan: list[tuple[Slot, int]], rc: int) -> None:
        if rc == 1:  # no room for the batch: llama.cpp left the memory as it was
            self.stats["kv_full"] += 1
            if not self._preempt_newest(keep_one=True):
                slot = plan[0][0]
                self._fail(slot, "the KV cache has no room for this sequence")
                self._drop_kv(slot)
            return
        # A failed or aborted decode may leave part of the batch in memory: drop those sequences' KV.
        log.error("llama_decode returned %d for a batch of %d tokens", rc, len(self.model.batch))
        for slot, _ in plan:
            self._drop_kv(slot)
            if slot.request is not None:
                self._fail(slot, f"llama_decode returned {rc}")

    # ---- admission ----

    def _admit(self) -> None:
        while self.queue:
            idle = [slot for slot in self.slots if slot.request is None]
            if not idle:
                return
            request = self.queue[0]
            leader = None if self._held else self._leader_for(request)
            if leader is not None:
                slot = min(idle, key=lambda s: (bool(s.cache), s.last_used))
                self.queue.popleft()
                if slot.cache:
                    self._evict(slot)
                slot.follows = leader
                cached = len(request.tokens)
            else:
                slot = self._choose_slot(idle, request.tokens)
                if any(s.request for s in self.slots) and (self._held or not self._fits(slot, request.tokens)):
                    return  # it waits until a running sequence finishes and gives its room back
                self.queue.popleft()
                self._park_idle(exclude=slot)
                cached = self._reuse(slot, request)
            slot.request = request
            slot.last_used = self._clock
            if not request.started:
                request.started = True
                self.stats["cached_tokens"] += cached
                self.send(p.Started(request.id, request.prompt_tokens, cached))
            if request.max_tokens == 0:
                self._finish(slot, "length")

    def _leader_for(self, request: Sequence) -> Slot | None:
        """An active slot whose request has exactly ``request``'s tokens and has not sampled yet."""
        for slot in self.slots:
            other = slot.request
            if other is not None and slot.follows is None and other.completion_tokens == 0 \
                    and other.first_token_at is None and other.tokens == request.tokens:
                return slot
        return None

    def _park_idle(self, exclude: Slot) -> None:
        """Move every other idle slot's conversation to the RAM cache and out of the KV cache.

        All sequences share one KV cache, and attention spans every cell in use, masked or
        not: idle conversations left in it would make every step of the active ones attend
        over them (a 1,700-token prompt read twice as slowly beside two idle ones). From the
        RAM cache a returning conversation is restored by a copy, not read again.
        """
        for slot in self.slots:
            if slot is not exclude and slot.request is None and slot.cache:
                self._evict(slot)

    def _fits(self, slot: Slot, tokens: list[int]) -> bool:
        """Whether ``tokens`` fit the KV cache in ``slot`` beside the active sequences, after
        evicting other idle slots to the RAM cache. Admitting what does not fit would only
        preempt it (or another) again at the next step, over and over."""
        def free() -> int:  # the slot keeps its shared prefix and gives up the rest of its cache
            return self.kv_size - self._kv_used() + len(slot.cache) - len(tokens)
        if free() < 1:
            self._make_room(len(tokens) - len(slot.cache) + 1, exclude=slot)
        return free() >= 1

    def _choose_slot(self, idle: list[Slot], prompt: list[int]) -> Slot:
        """The idle slot sharing the longest prefix; else the least recently used (empty ones first)."""
        best = max(idle, key=lambda s: (common_prefix(s.cache, prompt), -s.last_used))
        if common_prefix(best.cache, prompt) == 0:
            best = min(idle, key=lambda s: (bool(s.cache), s.last_used))
        return best

    def _reuse(self, slot: Slot, request: Sequence) -> int:
        """Prepare ``slot`` for ``request``: keep the longest usable cached prefix; return its length."""
        prompt = request.tokens
        shared = common_prefix(slot.cache, prompt)
        key, cached_len = self.cache.best(prompt)
        if key is not None and cached_len > shared and cached_len >= MIN_CACHED_TOKENS:
            self._evict(slot)
            shared = self._restore(slot, key, prompt)
        elif shared < len(slot.cache) and shared < MIN_CACHED_TOKENS:
            self._evict(slot)  # little in common: keep the old conversation whole in RAM instead
            shared = 0
        elif shared < len(slot.cache):
            self._save(slot)  # the cut below loses the old conversation's tail
        keep = request.media_floor(min(shared, len(prompt) - 1))  # decode at least one token, for fresh logits
        if keep < len(slot.cache) and not self.model.seq_rm(slot.seq, request.position(keep), -1):
            self._drop_kv(slot)  # this memory cannot cut mid-sequence (e.g. sliding window)
            keep = 0
        del slot.cache[keep:]
        self._cut_shares(slot, keep)
        return keep

    def _cut_shares(self, slot: Slot, keep: int) -> None:
        """``slot`` kept only its first ``keep`` cells: what it shares is at most those."""
        for other in self.slots:
            if other.shares is not None and (other is slot or other.shares[0] is slot):
                partner, n = other.shares
                other.shares = (partner, min(n, keep)) if keep else None

    def _restore(self, slot: Slot, key: int, prompt: list[int]) -> int:
        entry = self.cache.pop(key)
        self._make_room(len(entry.tokens), exclude=slot)
        restored = self.model.state_set(slot.seq, entry.data)
        self.cache.recycle(entry.data)
        if not restored:
            self._drop_kv(slot)
            return 0
        slot.cache = list(entry.tokens)
        self.stats["cache_restores"] += 1
        return common_prefix(slot.cache, prompt)

    # ---- KV room ----

    def _kv_used(self) -> int:
        """KV cells in use: every slot's tokens, a prefix shared by a copy counted once."""
        used = sum(len(slot.cache) for slot in self.slots)
        for slot in self.slots:
            if slot.shares is not None:
                partner, n = slot.shares
                used -= min(n, len(partner.cache), len(slot.cache))
        return used

    def _active(self) -> list[Slot]:
        """Slots decoding for themselves, oldest request first."""
        return sorted((s for s in self.slots if s.request and s.follows is None),
                      key=lambda s: s.request.order)  # type: ignore[union-attr]

    def _plan_media(self) -> tuple[Slot, MediaChunk] | None:
        """The one media chunk this step encodes: the oldest sequence's whose prompt reached
        one, once its cells are free. The oldest may preempt newer sequences for them, as a
        generating one may; a newer one waits."""
        if not any(slot.request is not None and slot.request.media for slot in self.slots):
            return None  # every step runs this: without media, skip the sort of the slots
        for rank, slot in enumerate(self._active()):
            request = slot.request
            assert request is not None
            chunk = request.media.get(len(slot.cache))
            if chunk is None:
                continue
            self._make_room(chunk.n_tokens)
            while rank == 0 and self.kv_size - self._kv_used() < chunk.n_tokens and self._preempt_newest(True):
                pass
            return (slot, chunk) if self.kv_size - self._kv_used() >= chunk.n_tokens else None
        return None

    def _plan(self, reserved: int = 0) -> list[tuple[Slot, int]]:
        """The batch of this step: (slot, tokens to decode), generating sequences first.
        ``reserved`` cells are already promised to this step's media chunk."""
        while True:
            active = self._active()
            if not active:
                return []
            generating = [s for s in active if s.pending() == 1]
            self._make_room(reserved + len(generating))
            if self.kv_size - self._kv_used() - reserved < len(generating):
                self._preempt_newest(keep_one=True)
                continue
            plan = [(s, 1) for s in generating]
            planned = reserved + len(plan)
            for slot in active:
                pending = slot.pending()
                if pending <= 1:
                    continue
                room = self.model.n_batch - (planned - reserved)
                if room <= 0:
                    break
                want = slot.request.text_run(len(slot.cache), min(pending, room))  # type: ignore[union-attr]
                if want == 0:
                    continue  # a media chunk comes next: ``_plan_media``'s
                self._make_room(planned + want)
                n = min(want, self.kv_size - self._kv_used() - planned)
                if n <= 0:
                    break
                plan.append((slot, n))
                planned += n
            if plan or reserved or any(s.request.media.get(len(s.cache)) for s in active):  # type: ignore[union-attr]
                return plan
            if not self._preempt_newest(keep_one=True):  # the oldest alone fits by construction
                self._fail(active[0], "the KV cache has no room for this sequence")
                self._drop_kv(active[0])

    def _eval_media(self, slot: Slot, chunk: MediaChunk) -> None:
        """Encode one media chunk of ``slot``'s prompt into its sequence (its own decodes)."""
        request = slot.request
        assert request is not None
        start = len(slot.cache)
        rc = self.model.eval_media(chunk, slot.seq, request.position(start))
        if rc != 0:
            log.error("encoding a media chunk of %d tokens failed for request %d: %d", chunk.n_tokens, request.id, rc)
            self._drop_kv(slot)
            self._fail(slot, f"encoding the media failed ({rc})")
            return
        slot.cache.extend(request.tokens[start: start + chunk.n_tokens])
        slot.last_used = self._clock
        self.stats["media_chunks"] += 1
        self.stats["media_tokens"] += chunk.n_tokens

    def _make_room(self, cells: int, exclude: Slot | None = None) -> None:
        """Evict idle slots, least recently used first, until ``cells`` are free (or none is left)."""
        idle = sorted((s for s in self.slots if s.request is None and s.cache and s is not exclude),
                      key=lambda s: s.last_used)
        for slot in idle:
            if self.kv_size - self._kv_used() >= cells:
                break
            self._evict(slot)

    def _preempt_newest(self, keep_one: bool) -> bool:
        """Send the most recently admitted active sequence back to the queue, dropping its KV."""
        active = [s for s in self.slots if s.request]
        if not active or (keep_one and len(active) == 1):
            return False
        slot = max(active, key=lambda s: s.request.order)  # type: ignore[union-attr]
        request = slot.request
        assert request is not None
        log.info("preempting request %d (%d tokens): the KV cache is full", request.id, len(request.tokens))
        self._vacate(slot)
        self._drop_kv(slot)
        self.queue.appendleft(request)
        self.stats["preemptions"] += 1
        self._held = True  # not readmitted before some sequence finishes: no preempt-readmit loop
        return True

    def _evict(self, slot: Slot) -> None:
        """Save an idle slot's conversation to the RAM cache and free its KV."""
        self._save(slot)
        self._drop_kv(slot)

    def _save(self, slot: Slot) -> None:
        if len(slot.cache) >= MIN_CACHED_TOKENS and self.cache.max_bytes > 0 \
                and self.cache.put(slot.cache, self.model.state_get(slot.seq, self.cache.take_spare())):
            self.stats["cache_saves"] += 1

    def _drop_kv(self, slot: Slot) -> None:
        self.model.seq_clear(slot.seq)
        slot.cache = []
        # The cells it shared now belong to the other slot alone: count them there, once.
        slot.shares = None
        for other in self.slots:
            if other.shares is not None and other.shares[0] is slot:
                other.shares = None
