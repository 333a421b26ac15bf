"""Several chat requests decoded together on one llama.cpp model.

A llama.cpp context can hold several sequences, each with its own KV cells; one ``llama_decode``
then carries one token of every sequence still going. On two CPU cores this gave 1.5 times the
tokens per second of one request after another with 4 requests, and 2 times with 16
(``bench/batch.py``); on a GPU, where one sequence leaves most of the hardware idle, more.

``BatchDecoder.run`` is the loop: it takes new requests from a source between steps (up to the
number of sequences), evaluates their prompts, then decodes one token for each request at a
time, each with its own sampler (penalties, top-k, top-p, min-p, temperature, seed), its own
stop strings and its own cancel signal, and hands the text to each request's reader. It runs on
the model's compute thread; readers block on their own queue.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

N_BATCH = 512  # tokens per llama_decode: llama_cpp.Llama's default n_batch, which the app keeps
TOP_K, MIN_P = 40, 0.05  # llama_cpp.Llama's defaults for create_completion, which the single path uses
GIVE_WAY_S = 0.05  # how long a batch run that gave way waits before borrowing the model again
PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over (llama_cpp.Llama's last_n_tokens_size)


@dataclass(frozen=True)
class Prepared:
    """A request's prompt as the model's tokens, fitted to a sequence's context."""

    tokens: list[int]
    max_tokens: int
    stop: list[str]
    dropped_messages: int = 0


@dataclass
class Finished:
    reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    dropped_messages: int


@dataclass(eq=False)
class BatchRequest:
    """One chat request for the batch: how to make its prompt, how to sample, where its text goes."""

    prepare: Callable[[Any], Prepared]  # (the loaded model) -> its prompt; runs on the compute thread
    temperature: float
    top_p: float
    repeat_penalty: float
    seed: int
    cancel: threading.Event | None = None
    output: queue.Queue[str | Finished | BaseException] = field(default_factory=queue.Queue)
    abandoned: threading.Event = field(default_factory=threading.Event)  # its reader left

    def results(self) -> Iterator[str | Finished]:
        """The pieces of text, then how it finished; raises the error if it failed."""
        while True:
            item = self.output.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Finished):
                return

    @property
    def cancelled(self) -> bool:
        return self.abandoned.is_set() or (self.cancel is not None and self.cancel.is_set())


class _TextOut:
    """A sequence's tokens to text: UTF-8 split across tokens is joined, and text that may be the
    start of a stop string is held back until it is known not to be one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""

    def add(self, data: bytes) -> tuple[str, bool]:
        """The text that can be given out now, and whether a stop string was reached."""
        self._held += self._decoder.decode(data)
        for stop in self._stop:
            at = self._held.find(stop)
            if at >= 0:
                text, self._held = self._held[:at], ""
                return text, True
        keep = max((n for s in self._stop for n in range(1, len(s)) if self._held.endswith(s[:n])), default=0)
        text = self._held[: len(self._held) - keep]
        self._held = self._held[len(text) :]
        return text, False

    def rest(self) -> str:
        text, self._held = self._held + self._decoder.decode(b"", final=True), ""
        return text


@dataclass(eq=False)
class _Sequence:
    seq: int
    request: BatchRequest
    prepared: Prepared
    sampler: Any
    text: _TextOut
    position: int  # where the next token goes
    generated: int = 0
    next_token: int = -1  # sampled, not yet evaluated


class BatchDecoder:
    """A second llama.cpp context on a loaded model, for up to ``sequences`` requests at once; each
    has ``context_per_sequence`` tokens of its own."""

    def __init__(self, llama: Any, sequences: int, context_per_sequence: int, threads: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._llama = llama
        self.sequences = sequences
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_per_sequence * sequences
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = sequences  # one KV stream per sequence (a shared one was slower, bench/batch.py)
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama sets it
        self._ctx = llama_cpp.llama_init_from_model(llama._model.model, params)
        if not self._ctx:
            raise MemoryError(f"llama.cpp could not make a context for {sequences} sequences")
        self.context_per_sequence = int(llama_cpp.llama_n_ctx_seq(self._ctx))
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(llama._model.model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.widest_step = 0  # the most sequences one step has carried (for tests and benchmarks)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)

    def run(self, model: Any, take: Callable[[int], list[BatchRequest]]) -> None:
        """Serve requests until ``take`` has none left: ``take(free)`` returns up to ``free`` new
        requests; [] while nothing is going ends the run."""
        live: dict[int, _Sequence] = {}
        try:
            while True:
                free = [seq for seq in range(self.sequences) if seq not in live]
                taken = take(len(free)) if free else []
                for request in taken:
                    self._admit(model, request, free.pop(0), live)
                if live:
                    self._step(live)
                elif not taken:
                    return
        except BaseException as error:
            for sequence in live.values():
                sequence.request.output.put(error)
                self._lib.llama_sampler_free(sequence.sampler)
            self._lib.llama_memory_clear(self._memory, False)
            raise

    # -- one request ---------------------------------------------------------------------------

    def _admit(self, model: Any, request: BatchRequest, seq: int, live: dict[int, _Sequence]) -> None:
        if request.cancelled:
            request.output.put(Finished("cancelled", 0, 0, 0))
            return
        try:
            prepared = request.prepare(model)
        except BaseException as error:  # a bad request fails alone
            request.output.put(error)
            return
        sequence = _Sequence(seq, request, prepared, self._sampler(request), _TextOut(prepared.stop), 0)
        tokens = prepared.tokens
        last = 0
        for start in range(0, len(tokens), N_BATCH):  # the prompt, in batches; scores for its last token
            chunk = tokens[start : start + N_BATCH]
            self._decode([(t, start + i, seq, start + i == len(tokens) - 1) for i, t in enumerate(chunk)])
            last = len(chunk) - 1
        sequence.position = len(tokens)
        live[seq] = sequence
        self._accept(sequence, last, live)

    def _sampler(self, request: BatchRequest) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        lib.llama_sampler_chain_add(
            chain, lib.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, request.repeat_penalty, 0.0, 0.0)
        )
        if request.temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(request.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(request.temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(request.seed & 0xFFFFFFFF))
        return chain

    def _accept(self, sequence: _Sequence, index: int, live: dict[int, _Sequence]) -> None:
        """Sample the sequence's next token from output ``index`` of the last decode, give out its
        text, and finish the sequence when it ends."""
        token = self._lib.llama_sampler_sample(sequence.sampler, self._ctx, index)
        request = sequence.request
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            return self._finish(sequence, "stop", live, flush=True)
        sequence.generated += 1
        text, stopped = sequence.text.add(self._piece(token))
        if text:
            request.output.put(text)
        if stopped:
            return self._finish(sequence, "stop", live, flush=False)
        if request.cancelled:
            return self._finish(sequence, "cancelled", live, flush=False)
        if sequence.generated >= sequence.prepared.max_tokens or sequence.position >= self.context_per_sequence:
            return self._finish(sequence, "length", live, flush=True)
        sequence.next_token = token
        return None

    def _finish(self, sequence: _Sequence, reason: str, live: dict[int, _Sequence], *, flush: bool) -> None:
        """``flush``: give out text held back for a stop string that never came."""
        rest = sequence.text.rest() if flush else ""
        if rest:
            sequence.request.output.put(rest)
        prepared = sequence.prepared
        sequence.request.output.put(
            Finished(reason, len(prepared.tokens), sequence.generated, prepared.dropped_messages)
        )
        self._lib.llama_sampler_free(sequence.sampler)
        self._lib.llama_memory_seq_rm(self._memory, sequence.seq, -1, -1)
        live.pop(sequence.seq, None)

    # -- every request at once -----------------------------------------------------------------

    def _step(self, live: dict[int, _Sequence]) -> None:
        """One token for every sequence going, in one llama_decode."""
        going = list(live.values())
        self.widest_step = max(self.widest_step, len(going))
        self._decode([(s.next_token, s.position, s.seq, True) for s in going])
        for index, sequence in enumerate(going):
            sequence.position += 1
            self._accept(sequence, index, live)

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        batch = self._batch
        for index, (token, position, seq, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = logits
        batch.n_tokens = len(entries)
        result = self._lib.llama_decode(self._ctx, batch)
        if result != 0:
            raise RuntimeError(f"llama.cpp could not evaluate {len(entries)} tokens (llama_decode returned {result})")

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:  # a longer piece: ask again with room for it
            buffer = ctypes.create_string_buffer(-size)
            size = self._lib.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]


class RequestBatcher:
    """Gathers the requests for one model into batch runs. The first request starts a run, which
    borrows the model from the model manager (through its queue, like any request) and keeps it while
    requests keep coming; later requests join the run between steps. When requests for other models
    wait, the run takes no new ones: it ends when those going are done, the model goes back to the
    manager, and the requests left borrow it again in the manager's queue, in their turn.

    ``run_batch(take, cancel)`` borrows the model (giving up when ``cancel`` is set) and runs a
    ``BatchDecoder`` with ``take``; ``others_waiting()`` says whether requests for other models wait.
    """

    def __init__(
        self,
        run_batch: Callable[[Callable[[int], list[BatchRequest]], threading.Event], None],
        others_waiting: Callable[[], bool],
    ) -> None:
        self._run_batch = run_batch
        self._others_waiting = others_waiting
        self._lock = threading.Lock()
        self._pending: deque[BatchRequest] = deque()
        self._running = False
        self._gave_way = False  # the last run took nothing new because others waited

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running

    def submit(self, request: BatchRequest) -> None:
        with self._lock:
            self._pending.append(request)
            if self._running:
                return
            self._running = True
        threading.Thread(target=self._run, name="chat-batch", daemon=True).start()

    def _take(self, free: int) -> list[BatchRequest]:
        with self._lock:
            if self._pending and self._others_waiting():
                self._gave_way = True
                return []  # let the requests going finish and the model go to those who wait
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _all_cancelled(self) -> bool:
        with self._lock:
            return all(request.cancelled for request in self._pending)

    def _run(self) -> None:
        while True:
            try:
                self._run_batch(self._take, _WhenAllCancelled(self._all_cancelled))
            except BaseException as error:
                with self._lock:
                    failed, self._pending = list(self._pending), deque()
                    self._running = False
                for request in failed:
                    request.output.put(error)
                return
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                gave_way, self._gave_way = self._gave_way, False
            # requests came (or stayed) while the model went to others: borrow it again, after a
            # moment if those others could not take it yet (they wait for something else)
            if gave_way:
                time.sleep(GIVE_WAY_S)


class _WhenAllCancelled(threading.Event):
    """Set as soon as every request waiting for the run is cancelled: the run then stops waiting for
    the model, and nothing loads for requests nobody wants any more."""

    def __init__(self, all_cancelled: Callable[[], bool]) -> None:
        super().__init__()
        self._all_cancelled = all_cancelled

    def is_set(self) -> bool:
        return self._all_cancelled()
