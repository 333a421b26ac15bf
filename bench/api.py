"""API overhead: the full server, as ``python main.py serve`` builds it, against calling chat.py directly.

The app side is ``main.build_app``, the app ``serve`` runs: the web UI mounted at /, the
assistant behind model "auto" (which clients get by default: this prompt is routed to chat by
its rules, so no extra generation), the middlewares (host check, body limit, the UI's guard,
the audit log) and an API key, which the client sends as ``Authorization: Bearer``. Its
conversations and audit log go to a temporary folder, not the user's.

One process serves that app (uvicorn in a thread) and calls the same ChatService directly, so
both sides use the same loaded model, prompt, sampling values, seed and threads, and both run
llama.cpp on the model manager's compute thread. (Two processes with a llama.cpp model each
contend on a small machine: llama.cpp's idle worker threads spin for a while, so that setup
measures the contention, not the API.) Which side goes first alternates each round.
Prints the added latency of a non-streamed request in milliseconds and the streaming
throughput ratio (HTTP / direct; target >= 0.97).
Usage: python bench/api.py [--runs N] [--max-tokens N] [--threads N] [--json FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import json
import secrets
import socket
import statistics
import tempfile
import threading
import time

import httpx
import uvicorn

from main import SHUTDOWN_GRACE_S, build_app, build_services
from settings import Settings, load_settings

from rows import Row, write_rows

PROMPT = [{"role": "user", "content": "Explain how a lighthouse works."}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_settings(settings: Settings, port: int, api_key: str, scratch: Path) -> Settings:
    """``settings`` as ``serve`` would get them on this port with this key; the conversations and the
    audit log go to ``scratch`` (the same work, without touching the user's)."""
    server = settings.server.model_copy(update={"host": "127.0.0.1", "port": port, "api_key": api_key})
    audit = settings.audit.model_copy(update={"path": scratch / "audit.jsonl"})
    return settings.model_copy(update={"server": server, "data_dir": scratch / "data", "audit": audit})


def check_full_server(base: str, client: httpx.Client, body: dict[str, object]) -> None:
    """Fail early if the app is not the full server: the key must be required and the UI mounted."""
    refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
    if refused.status_code != 401:
        raise SystemExit(f"a request without the API key got HTTP {refused.status_code}, not 401")
    page = client.get(f"{base}/")
    if page.status_code != 200 or "text/html" not in page.headers.get("content-type", ""):
        raise SystemExit(f"the web UI is not mounted at / (HTTP {page.status_code})")


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

    scratch = tempfile.TemporaryDirectory(prefix="enclave-bench-api-")
    port = free_port()
    api_key = secrets.token_urlsafe(24)
    settings = server_settings(load_settings(None), port, api_key, Path(scratch.name))
    if args.threads:
        settings = settings.model_copy(update={"chat": settings.chat.model_copy(update={"threads": args.threads})})
    services = build_services(settings)
    # What serve runs: the same app, uvicorn settings and idle-model reaper (its log config aside).
    app = build_app(services, settings)
    services.manager.start_reaper()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S
        )
    )
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/chat/completions"
    # No "model": clients' default, "auto", so the request goes through the assistant as in the UI.
    body = {"messages": PROMPT, "temperature": 0.0, "top_p": 1.0, "max_tokens": args.max_tokens, "seed": 1}
    # The values the API resolves for that body (the chat defaults, overridden), so both sides sample alike.
    params = services.chat.defaults.override(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, seed=1)
    client = httpx.Client(timeout=120, headers={"Authorization": f"Bearer {api_key}"})
    check_full_server(base, client, body)

    def direct_complete() -> float:
        started = time.perf_counter()
        services.chat.complete(PROMPT, params, cancel=threading.Event())  # the app passes one too
        return time.perf_counter() - started

    def http_complete() -> float:
        started = time.perf_counter()
        client.post(url, json=body).raise_for_status()
        return time.perf_counter() - started

    def direct_stream() -> float:
        started = time.perf_counter()
        stream = services.chat.stream(PROMPT, params, cancel=threading.Event())
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
    # Both sides must do the same work: the same reply, token for token. (Checked after the warm-up:
    # the first reply, with nothing of the prompt evaluated yet, can differ from later ones.)
    direct_text = services.chat.complete(PROMPT, params)
    http_text = client.post(url, json=body).raise_for_status().json()["choices"][0]["message"]["content"]
    if direct_text != http_text:
        raise SystemExit(f"the API's reply differs from the direct one:\n{http_text!r}\n{direct_text!r}")
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
    print("app: the full server (web UI, assistant, API key), as python main.py serve builds it")
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
    client.close()
    server.should_exit = True
    serving.join(timeout=SHUTDOWN_GRACE_S + 5)
    services.manager.close()
    scratch.cleanup()


if __name__ == "__main__":
    main()
