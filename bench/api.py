"""API overhead: the OpenAI-compatible endpoint against calling chat.py directly.

One process serves the API (uvicorn in a thread) and calls the same ChatService
directly, so both sides use the same loaded model, prompt, seed and threads. (Two
processes with a llama.cpp model each contend on a small machine: llama.cpp's idle
worker threads spin for a while, so that setup measures the contention, not the API.)
Prints the added latency of a non-streamed request in milliseconds and the
streaming throughput ratio (HTTP / direct; target >= 0.97).
Usage: python bench/api.py [--runs N] [--max-tokens N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from api.app import create_app
from main import build_services
from settings import ServerSettings, load_settings
from text_generation.stream import GenerationParams

from rows import Row, write_rows

PROMPT = [{"role": "user", "content": "Explain how a lighthouse works."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=None, help="llama.cpp threads (default: physical cores); fewer leaves a "
        "core for the HTTP server and client, which otherwise compete with generation on a small machine",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()

    settings = load_settings(None)
    if args.threads:
        settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"threads": args.threads})})
    services = build_services(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(services, ServerSettings(port=port), settings.image.outputs_dir), port=port, log_level="warning"
        )
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, seed=1)
    body = {"messages": PROMPT, "temperature": 0.0, "top_p": 1.0, "max_tokens": args.max_tokens, "seed": 1}
    client = httpx.Client(timeout=120)

    def direct_complete() -> float:
        started = time.perf_counter()
        services.chat.complete(PROMPT, params)
        return time.perf_counter() - started

    def http_complete() -> float:
        started = time.perf_counter()
        client.post(url, json=body).raise_for_status()
        return time.perf_counter() - started

    def direct_stream() -> float:
        started = time.perf_counter()
        stream = services.chat.stream(PROMPT, params)
        stream.text()
        return stream.completion_tokens / (time.perf_counter() - started)

    def http_stream() -> float:
        started = time.perf_counter()
        usage = None
        with client.stream("POST", url, json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if '"usage": {' in line:  # parse only the last chunk: the client's work is not the API's
                    usage = json.loads(line[6:])["usage"]
        return usage["completion_tokens"] / (time.perf_counter() - started)

    for warm_up in (direct_complete, http_complete, direct_stream, http_stream):
        warm_up()
    samples: dict[str, list[float]] = {name: [] for name in ("direct", "http", "direct_tps", "http_tps")}
    for run in range(args.runs):
        pairs = [("direct", direct_complete), ("http", http_complete)]
        streams = [("direct_tps", direct_stream), ("http_tps", http_stream)]
        if run % 2:
            pairs.reverse()
            streams.reverse()
        for name, measure in pairs + streams:
            samples[name].append(measure())
    direct, http = statistics.median(samples["direct"]), statistics.median(samples["http"])
    direct_tps, http_tps = statistics.median(samples["direct_tps"]), statistics.median(samples["http_tps"])
    threads = services.chat.load_spec(services.chat.resolve_model().path).option("threads")
    name = services.chat.resolve_model().name
    print(f"model: {name}  threads: {threads}  runs: {args.runs}  max_tokens: {args.max_tokens}")
    print(f"non-streamed request: direct {direct * 1000:.1f} ms, HTTP {http * 1000:.1f} ms")
    print(f"added latency (HTTP - direct, median): {(http - direct) * 1000:.1f} ms")
    print(f"streaming: direct {direct_tps:.1f} tokens/s, HTTP {http_tps:.1f} tokens/s")
    print(f"streaming throughput ratio (target >= 0.97): {http_tps / direct_tps:.3f}")
    write_rows(
        args.json,
        [
            Row(
                f"API streaming tokens/s vs chat.py ({name})",
                "tokens/s",
                direct_tps,
                http_tps,
                minimum=0.97,
            ),
            Row(f"API non-streamed request vs chat.py ({name})", "s", direct, http, higher_is_better=False),
        ],
    )
    server.should_exit = True
    services.manager.close()


if __name__ == "__main__":
    main()
