"""The HTTP server against hostile and careless clients: invalid Unicode, odd values, oversized
chunked bodies, foreign Host headers, unknown routes, and a shutdown during a long generation.
Each test drives the real app on loopback."""

from __future__ import annotations

import http.client
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ENDLESS, RunningApp, start_app, stop_app, write_config
from tests.openai_schema import validate


def post_raw(app: RunningApp, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{app.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    return body["error"]


# A lone surrogate, written as the JSON escape a client would send ("\ud800" is valid JSON, not valid Unicode).
SURROGATE = "\\ud800"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi %s"}]}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["%s"]}'),
        ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'),
        ("/v1/chat/completions", '{"messages": [{"role": "%s", "content": "hi"}]}'),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "%s"}}',
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
        ),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi", "%s": 1}]}'),
        ("/v1/images/generations", '{"prompt": "a tree %s"}'),
        ("/v1/images/generations", '{"prompt": "a tree", "size": "%s"}'),
        ("/v1/images/generations", '{"prompt": "a tree", "model": "%s"}'),
    ],
)
def test_a_lone_surrogate_anywhere_is_a_400_never_a_500(running_app: RunningApp, path: str, body: str) -> None:
    error = assert_openai_error(post_raw(running_app, path, (body % SURROGATE).encode()), 400)
    assert "Unicode" in error["message"]


@pytest.mark.parametrize(
    "path, body, status",
    [
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": "x"},
            },
            400,
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {"schema": ["not", "an", "object"]}},
            },
            400,
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": "json"}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**70}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [7]}]}, 400),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"a": 1}}]}, 400),
        ("/v1/chat/completions", {"messages": ["hi"]}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/v1/chat/completions", {"model": "x" * 100_000, "messages": [{"role": "user", "content": "hi"}]}, 404),
        ("/v1/images/generations", {"prompt": "a tree", "size": "²x²"}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "size": "٣x٣"}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "size": "99999999999x64"}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "size": "x"}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "n": 10**9}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "seed": 2**70}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "loras": {"x": "heavy"}}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "loras": [{"weight": 1}]}, 400),
        ("/v1/images/generations", {"prompt": "a tree", "steps": 10**12}, 400),
    ],
)
def test_odd_values_get_a_clear_error_never_a_500(running_app: RunningApp, path: str, body: dict, status: int) -> None:
    response = httpx.post(f"{running_app.url}{path}", json=body, timeout=60)
    error = assert_openai_error(response, status)
    assert len(error["message"]) < 2100  # a client's megabyte is not repeated back


def test_unknown_routes_and_wrong_methods_under_v1_get_openai_errors(running_app: RunningApp) -> None:
    error = assert_openai_error(httpx.get(f"{running_app.url}/v1/nope"), 404)
    assert "/v1/nope" in error["message"]
    wrong = httpx.get(f"{running_app.url}/v1/chat/completions")
    assert_openai_error(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    assert_openai_error(httpx.delete(f"{running_app.url}/v1/models"), 405)
    assert_openai_error(httpx.post(f"{running_app.url}/v1/images/variations", json={}), 404)


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.nip.io", "localhost.attacker.example", "10.0.0.1"])
def test_a_foreign_host_header_is_refused(running_app: RunningApp, host: str) -> None:
    # A page on another site that rebinds its name to 127.0.0.1 sends its own name as Host.
    for path in ("/health", "/v1/models", "/"):
        response = httpx.get(f"{running_app.url}{path}", headers={"Host": host})
        assert_openai_error(response, 400)


def test_loopback_host_names_are_answered(running_app: RunningApp) -> None:
    port = running_app.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(f"{running_app.url}/health", headers={"Host": host}).status_code == 200, host


# -- a small body limit: chunked bodies, uploads -----------------------------------------


@pytest.fixture(scope="module")
def small_limit_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("small-limit")
    app = start_app(write_config(folder, server={"max_request_mb": 1}), folder / "app.log")
    yield app
    stop_app(app)


def peak_rss_mib(app: RunningApp) -> float:
    for line in Path(f"/proc/{app.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM line")


def send_chunked(
    app: RunningApp, path: str, total_mib: int, content_type: str, head: bytes = b"", tail: bytes = b""
) -> tuple[int | None, int]:
    """POST ``total_mib`` MiB in chunks (no Content-Length); (status or None if the server closed, MiB sent)."""
    host, port = app.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", content_type)
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"a" * 2**20
    sent = 0
    try:
        for piece in (head, *[chunk] * total_mib, tail):
            if piece:
                connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += piece is chunk
        connection.send(b"0\r\n\r\n")
    except OSError:  # the server answered and closed the connection before the body ended: good
        pass
    try:
        status: int | None = connection.getresponse().status
    except (OSError, http.client.HTTPException):
        status = None
    connection.close()
    return status, sent


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_all(small_limit_app: RunningApp) -> None:
    before = peak_rss_mib(small_limit_app)
    status, sent_mib = send_chunked(small_limit_app, "/v1/chat/completions", 200, "application/json")
    assert status in (413, None)
    assert sent_mib < 100, "the server kept reading the body"
    # Read whole, 200 MiB of body costs the server hundreds of MiB; refused as it arrives, next to nothing.
    assert peak_rss_mib(small_limit_app) - before < 50
    assert httpx.get(f"{small_limit_app.url}/health").status_code == 200


def test_a_chunked_upload_over_the_limit_is_neither_stored_nor_read_whole(small_limit_app: RunningApp) -> None:
    before = peak_rss_mib(small_limit_app)
    boundary = "x1b2"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    status, sent_mib = send_chunked(
        small_limit_app, "/gradio_api/upload", 200, f"multipart/form-data; boundary={boundary}", head, tail
    )
    assert status in (400, 413, None)  # Gradio's upload route words the refusal itself
    assert sent_mib < 100, "the server kept reading (and storing) the upload"
    assert peak_rss_mib(small_limit_app) - before < 50
    assert httpx.get(f"{small_limit_app.url}/health").status_code == 200


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(small_limit_app: RunningApp) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 2 * 2**20}]}).encode()
    assert_openai_error(post_raw(small_limit_app, "/v1/chat/completions", body), 413)


# -- shutdown ----------------------------------------------------------------------------------


def test_sigterm_during_a_long_generation_stops_the_server_within_seconds(tmp_path: Path) -> None:
    app = start_app(write_config(tmp_path, chat={"context_size": 2048}), tmp_path / "app.log")
    try:
        body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 4000, "stream": True,
                "response_format": ENDLESS}  # fmt: skip
        with httpx.stream("POST", f"{app.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)  # generating; the whole reply would take tens of seconds
            started = time.monotonic()
            app.process.send_signal(signal.SIGTERM)
            try:
                app.process.wait(timeout=15)
            except Exception:
                pytest.fail(f"the server was still running 15 s after SIGTERM:\n{app.log()[-2000:]}")
            stopped_in = time.monotonic() - started
    finally:
        stop_app(app)
    assert stopped_in < 10, f"took {stopped_in:.1f} s"  # a bound for the grace period (3 s), not a speed test
    # uvicorn ends by re-raising the signal it handled, as a process stopped by SIGTERM should.
    assert app.process.returncode in (0, -signal.SIGTERM), app.log()[-2000:]


def test_nothing_listens_beyond_loopback(running_app: RunningApp) -> None:
    port = int(running_app.url.rsplit(":", 1)[1])
    addresses = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for address in addresses - {"127.0.0.1"}:
        with socket.socket() as probe:
            probe.settimeout(1)
            assert probe.connect_ex((address, port)) != 0, f"the server answers on {address}"


# -- hostile text through every text entry point ------------------------------------------------

HOSTILE = {
    "whitespace run": "a" + " " * 31_990 + "b",
    "newline run": "draw\n" + "\n \n" * 10_000 + "x",
    "tabs and punctuation": "\t.!?;" * 6_000,
    "control characters": "".join(chr(code) for code in range(32)) * 500,
    "one character, 1 MB": "a" * 2**20,
    "draw, repeated": "draw " * 6_000,
    "lone surrogate": "\ud800",
}


def timed_post(app: RunningApp, path: str, body: dict) -> tuple[int, float]:
    payload = json.dumps(body).encode()  # json escapes a lone surrogate as "\ud800", as a client would send it
    started = time.perf_counter()
    response = post_raw(app, path, payload)
    return response.status_code, time.perf_counter() - started


ENTRY_POINTS = {
    "chat content": ("/v1/chat/completions", lambda text: {"model": "auto", "max_tokens": 1,
                                                             "messages": [{"role": "user", "content": text}]}),
    "chat stop": ("/v1/chat/completions", lambda text: {"max_tokens": 1, "stop": [text],
                                                          "messages": [{"role": "user", "content": "hi"}]}),
    "image prompt": ("/v1/images/generations", lambda text: {"prompt": text, "size": "64x64", "steps": 1}),
    "image size": ("/v1/images/generations", lambda text: {"prompt": "a tree", "size": text}),
}  # fmt: skip


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "cats",
    "watch",
    "from",
    "the",
    "old",
    "garden",
    "wall",
]


def normal_text() -> str:
    """Ordinary words, about as many tokens as the longest hostile text the chat model reads (the
    32,000-character whitespace run is about 520 tokens); fresh each time, so no cache helps it."""
    return " ".join(random.choice(WORDS) for _ in range(480))


def post_in_background(app: RunningApp, path: str, body: dict) -> tuple[threading.Thread, list[tuple[int, float]]]:
    outcome: list[tuple[int, float]] = []
    thread = threading.Thread(target=lambda: outcome.append(timed_post(app, path, body)))
    thread.start()
    return thread, outcome


def slowest_health_check(app: RunningApp, busy: threading.Thread) -> float:
    """The slowest /health answer while ``busy`` runs: other clients must never wait on a hostile request."""
    slowest = 0.0
    while busy.is_alive():
        started = time.perf_counter()
        httpx.get(f"{app.url}/health", timeout=30)
        slowest = max(slowest, time.perf_counter() - started)
        time.sleep(0.05)
    return slowest


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_hostile_text_is_answered_in_bounded_time_and_blocks_no_one(running_app: RunningApp, entry: str) -> None:
    path, body_of = ENTRY_POINTS[entry]
    normal = timed_post(running_app, path, body_of(normal_text()))[1]
    for name, text in HOSTILE.items():
        request, outcome = post_in_background(running_app, path, body_of(text))
        slowest = slowest_health_check(running_app, request)
        request.join()
        status, seconds = outcome[0]
        assert status < 500, f"{entry} / {name}: {status}"
        # A ratio to the normal request in the same run, with a floor for timer noise and a 1 MB upload.
        assert seconds <= 5 * normal + 2.0, f"{entry} / {name}: {seconds:.2f} s against {normal:.2f} s"
        assert slowest < 1.0, f"{entry} / {name}: /health took {slowest:.2f} s meanwhile"
