"""The Gradio UI's own routes against hostile clients: file inputs that name URLs or server files,
what a client that has not signed in can read, and guessing the key on the login form.

Most tests drive the real app as a subprocess; the server process records every connection and
name lookup it makes (tests/netwatch/sitecustomize.py), so "it fetched nothing" is observed, not
inferred from a status code.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from PIL import Image, PngImagePlugin

from api.gradio_guard import GradioGuard, LoginLimiter, client_key, find_file_refusal, upload_folder
from api.guards import BodySizeLimit
from settings import ServerSettings
from tests.conftest import ROOT, TINY_SECTIONS, RunningApp, start_app, stop_app, write_config

KEY = "s3cret"
FILE_DATA = {"_type": "gradio.FileData"}
PRIVATE_MARK = b"Kestrel-4410 private picture"
# Values the configuration puts into the UI; a client without the key must see none of them.
SECRETS = {
    "chat.system_prompt": "Zebra-7731 secret instructions",
    "vision.default_question": "Okapi-5518 default question",
    "image.defaults.negative_prompt": "Quokka-9902 negative words",
    "a LoRA's name": "film-grain",
}


# -- helpers -----------------------------------------------------------------------------


class Listener:
    """A TCP server on loopback that only counts the connections it is offered."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


def file_data(path: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "meta": FILE_DATA, **extra}


def private_picture(folder: Path) -> Path:
    """A PNG outside Gradio's upload folder, carrying a mark that shows wherever its bytes go."""
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", PRIVATE_MARK.decode())
    path = folder / "private.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path, pnginfo=info)
    return path


def fn_index(app: RunningApp, api_name: str, cookies: httpx.Cookies | None = None) -> int:
    config = httpx.get(f"{app.url}/config", cookies=cookies, timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def event_stream(url: str, cookies: httpx.Cookies | None = None, timeout_s: float = 90.0) -> str:
    """The whole server-sent event stream of a Gradio call, until its last event."""
    lines: list[str] = []
    last_event = False
    with httpx.stream("GET", url, cookies=cookies, timeout=timeout_s) as response:
        for line in response.iter_lines():
            lines.append(line)
            if line.startswith("event: ") and line.removeprefix("event: ") in ("complete", "error"):
                last_event = True
            elif last_event and line.startswith("data:"):
                break
    return "\n".join(lines)


def file_urls(text: str) -> list[str]:
    """Every /gradio_api/file= reference in a response, as a path to fetch."""
    found = []
    for part in text.split("/gradio_api/file=")[1:]:
        end = min((part.find(c) for c in "\"' \\\n" if c in part), default=len(part))
        found.append("/gradio_api/file=" + part[:end])
    return found


def everything_said(app: RunningApp, response: httpx.Response, api_name: str) -> bytes:
    """A response, the event stream it started (if any) and every file that stream links to."""
    said = [response.content]
    if response.status_code == 200 and "event_id" in response.text:
        event = response.json()["event_id"]
        stream = event_stream(f"{app.url}/gradio_api/call/{api_name}/{event}")
        said.append(stream.encode())
        for url in file_urls(stream):
            said.append(httpx.get(f"{app.url}{url}", timeout=30).content)
    return b"\n".join(said)


def queue_stream(app: RunningApp, session: str, timeout_s: float = 90.0) -> str:
    """What the queue sends a browser session, until its call completes."""
    lines: list[str] = []
    url = f"{app.url}/gradio_api/queue/data"
    with httpx.stream("GET", url, params={"session_hash": session}, timeout=timeout_s) as response:
        for line in response.iter_lines():
            lines.append(line)
            if "process_completed" in line or response.status_code != 200:
                break
    return "\n".join(lines)


def network_record(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# -- defect 1: file inputs name only uploads ---------------------------------------------


@pytest.fixture(scope="module")
def watched_app(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[tuple[RunningApp, Path]]:
    """The real app without a key, with tiny models, recording its network calls."""
    folder = tmp_path_factory.mktemp("watched")
    record = folder / "network.jsonl"
    config = write_config(
        folder, tiny_models, server={"max_request_mb": 1}, chat={"context_size": 1024}, **TINY_SECTIONS
    )
    watch = {"PYTHONPATH": str(ROOT / "tests" / "netwatch"), "NETWATCH_LOG": str(record)}
    app = start_app(config, folder / "app.log", extra_env=watch)
    yield app, record
    stop_app(app)


def test_a_file_input_naming_a_url_is_refused_before_anything_is_fetched(
    watched_app: tuple[RunningApp, Path],
) -> None:
    app, record = watched_app
    listener = Listener()
    tag = uuid.uuid4().hex[:8]
    names = [f"attacker-{tag}.invalid", f"attacker-{tag}.hf.co"]  # hf.co: a name Gradio fetches without checks
    urls = [
        f"http://127.0.0.1:{listener.port}/x.png",
        f"http://{names[0]}/x.png",
        f"https://{names[1]}/x.png",
        f"http://{names[0]}:{listener.port}/gradio_api/file=x.png",
    ]
    describe, chat = fn_index(app, "describe"), fn_index(app, "chat")
    answers: list[httpx.Response] = []
    try:
        for url in urls:
            image = file_data(url)
            message = {"text": "What is in this picture?", "files": [image]}
            answers += [
                httpx.post(f"{app.url}/gradio_api/call/describe", json={"data": [image, "q", []]}, timeout=30),
                httpx.post(f"{app.url}/gradio_api/call/v2/describe", json={"image_path": image}, timeout=30),
                httpx.post(f"{app.url}/gradio_api/call/chat", json={"data": [message, [], "", 0, 1, 4, 1, 1]}),
                httpx.post(
                    f"{app.url}/gradio_api/queue/join",
                    json={"data": [image, "q", []], "fn_index": describe, "session_hash": tag, "trigger_id": None},
                    timeout=30,
                ),
                httpx.post(
                    f"{app.url}/gradio_api/queue/join",
                    json={"data": [message, [], None, "", 0, 1, 4, 1, 1], "fn_index": chat, "session_hash": tag},
                    timeout=30,
                ),
                httpx.post(f"{app.url}/gradio_api/run/describe", json={"data": [image, "q", []]}, timeout=30),
                # The url field, beside an uploaded file's path: only this server's own file links pass.
                httpx.post(
                    f"{app.url}/gradio_api/call/describe",
                    json={"data": [file_data(str(upload_folder() / "abc" / "x.png"), url=url), "q", []]},
                    timeout=30,
                ),
            ]
    finally:
        listener.close()
    looked_up = [r for r in network_record(record) if any(name in r["target"] for name in names)]
    touched = [r for r in network_record(record) if r["kind"] == "connect" and str(listener.port) in r["target"]]
    assert looked_up == [], f"the server looked up a host name a client chose: {looked_up}"
    assert touched == [] and listener.connections == 0, "the server connected to the URL a client gave"
    assert [a.status_code for a in answers] == [400] * len(answers), [a.text for a in answers]
    assert all("upload" in a.json()["error"]["message"] for a in answers)


def test_a_file_input_naming_a_server_file_is_refused_and_never_read(
    watched_app: tuple[RunningApp, Path], tmp_path: Path
) -> None:
    app, _ = watched_app
    picture = private_picture(tmp_path / "elsewhere")
    targets = [
        str(picture),
        "/etc/passwd",
        str(ROOT / "config.yaml"),
        f"{upload_folder()}/../{picture.relative_to('/')}",  # out of the upload folder again
        f"file://{picture}",
        picture.name,  # relative: the server's working directory
    ]
    describe = fn_index(app, "describe")
    said: list[bytes] = []
    statuses: list[int] = []
    for target in targets:
        image = file_data(target)
        message = {"text": "What is in this picture?", "files": [image]}
        for api_name, data in (("describe", [image, "q", []]), ("chat", [message, [], "", 0, 1, 8, 1, 1])):
            answer = httpx.post(f"{app.url}/gradio_api/call/{api_name}", json={"data": data}, timeout=30)
            statuses.append(answer.status_code)
            said.append(everything_said(app, answer, api_name))
        session = uuid.uuid4().hex
        joined = httpx.post(
            f"{app.url}/gradio_api/queue/join",
            json={"data": [image, "q", []], "fn_index": describe, "session_hash": session},
            timeout=30,
        )
        statuses.append(joined.status_code)
        said.append(joined.content)
        if joined.status_code == 200:
            stream = queue_stream(app, session)
            said += [stream.encode(), *(httpx.get(f"{app.url}{url}").content for url in file_urls(stream))]
    everything = b"\n".join(said)
    assert PRIVATE_MARK not in everything, "the private picture came back to the client"
    assert b"root:x:0:0" not in everything
    assert statuses == [400] * len(statuses), statuses


def test_uploads_still_work_as_the_browser_sends_them(watched_app: tuple[RunningApp, Path], tmp_path: Path) -> None:
    """The check refuses nothing Gradio's own client sends: an upload, then a call naming it
    (with the file link the browser adds), answered by the tiny vision model."""
    app, _ = watched_app
    picture = tmp_path / "blue.png"
    Image.new("RGB", (40, 30), (30, 60, 220)).save(picture)
    with picture.open("rb") as handle:
        uploaded = httpx.post(f"{app.url}/gradio_api/upload", files={"files": handle}, timeout=30)
    assert uploaded.status_code == 200, uploaded.text
    path = uploaded.json()[0]
    link = f"{app.url}/gradio_api/file={quote(path)}"
    answer = httpx.post(
        f"{app.url}/gradio_api/call/describe",
        json={"data": [file_data(path, url=link, orig_name="blue.png"), "What colour is it?", []]},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    stream = event_stream(f"{app.url}/gradio_api/call/describe/{answer.json()['event_id']}")
    assert "event: complete" in stream and "What colour is it?" in stream, stream


def test_a_chunked_body_over_the_limit_is_refused_with_413(watched_app: tuple[RunningApp, Path]) -> None:
    app, _ = watched_app

    def chunks() -> Iterator[bytes]:
        yield b'{"data": ["'
        for _ in range(3 * 64):  # 3 MB in 16 kB chunks, no Content-Length: the limit is 1 MB
            yield b"x" * 16384
        yield b'"]}'

    answer = httpx.post(f"{app.url}/gradio_api/call/describe", content=chunks(), timeout=30)
    assert answer.status_code == 413 and "max_request_mb" in answer.text
    assert httpx.get(f"{app.url}/health").status_code == 200


# -- the check itself, in-process ----------------------------------------------------------


def test_file_objects_are_judged_by_where_they_point() -> None:
    folder = upload_folder()
    inside = str(folder / "abc" / "cat.png")
    allowed = [
        {"text": "hi", "files": []},
        {"data": [file_data(inside), "q", [{"role": "user", "content": "hi"}]]},
        {"data": [file_data(inside, url=f"http://127.0.0.1:7860/gradio_api/file={quote(inside)}")]},
        {"data": [{"url": f"/gradio_api/file={inside}"}]},
        {"data": [None, {"path": None}]},
    ]
    refused = [
        {"data": [file_data("http://example.org/x.png")]},
        {"data": [{"path": "HTTPS://example.org/x.png"}]},
        {"data": [{"path": "data:image/png;base64,AAAA"}]},
        {"data": [{"path": "//example.org/x.png"}]},
        {"data": [{"path": str(folder)}]},  # the folder itself
        {"data": [{"path": str(folder) + "-other/x.png"}]},  # a sibling with the same prefix
        {"data": [{"path": inside + "/../../../etc/passwd"}]},
        {"data": [{"path": inside + "\x00.png"}]},
        {"data": [{"path": 7}]},
        {"data": [{"meta": FILE_DATA}]},
        {"data": [file_data(inside, url="http://example.org/x.png")]},
        {"data": [{"url": "http://example.org/gradio_api/file=/etc/passwd"}]},
        {"a": [[[[{"b": {"c": [file_data("/etc/passwd")]}}]]]]},  # nested anywhere
    ]
    assert [find_file_refusal(body, folder) for body in allowed] == [None] * len(allowed)
    assert all(find_file_refusal(body, folder) for body in refused)
    deep: Any = file_data("/etc/passwd")
    for _ in range(50_000):  # deeper than Python's recursion limit
        deep = [deep]
    assert find_file_refusal(deep, folder)


def test_a_symbolic_link_in_the_upload_folder_does_not_lead_out(tmp_path: Path) -> None:
    folder = tmp_path / "uploads"
    (folder / "abc").mkdir(parents=True)
    (folder / "abc" / "link.png").symlink_to("/etc/passwd")
    assert find_file_refusal(file_data(str(folder / "abc" / "link.png")), folder.resolve())


def test_the_guard_reads_no_more_than_the_limit_of_a_chunked_body() -> None:
    pulled = 0
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def endless_body() -> dict[str, Any]:
        nonlocal pulled
        pulled += 4096
        return {"type": "http.request", "body": b"x" * 4096, "more_body": True}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # The guard inside the body-size check, as the app assembles them.
    guard = BodySizeLimit(GradioGuard(inner, ServerSettings()), max_bytes=64 * 1024, limit_mb=0.0625)
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "headers": [], "query_string": b""}
    asyncio.run(guard(scope, endless_body, send))
    assert sent[0]["status"] == 413 and reached == []
    assert pulled <= 64 * 1024 + 4096


def test_the_guard_hands_a_clean_body_on_and_refuses_what_it_cannot_read() -> None:
    inside = str(upload_folder() / "abc" / "cat.png")

    def call(body: bytes, content_type: bytes = b"application/json") -> tuple[int, list[bytes]]:
        reached: list[bytes] = []
        statuses: list[int] = []

        async def inner(scope: Any, receive: Any, send: Any) -> None:
            reached.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        headers = [(b"content-type", content_type)]
        scope = {"type": "http", "method": "POST", "path": "/gradio_api/queue/join", "headers": headers}
        asyncio.run(GradioGuard(inner, ServerSettings())(scope, receive, send))
        return statuses[0], reached

    clean = json.dumps({"data": [file_data(inside), "q", []], "fn_index": 1}).encode()
    assert call(clean) == (200, [clean])  # the same bytes reach Gradio
    url = json.dumps({"data": [file_data("http://example.org/x.png")]}).encode()
    assert call(url, b"multipart/form-data; boundary=x") == (400, [])  # the content type changes nothing
    assert call(b"[" * 100_000 + b"]" * 100_000) == (400, [])  # too deep for Python's JSON parser
    assert call(b"\xff\xfe not json") == (400, [])


# -- defect 2: nothing of the UI before the key -------------------------------------------


@pytest.fixture(scope="module")
def guarded_ui(tmp_path_factory: pytest.TempPathFactory, tiny_models: Path) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("guarded-ui")
    config = write_config(
        folder,
        tiny_models,
        server={"api_key": KEY},
        chat={"context_size": 1024, "system_prompt": SECRETS["chat.system_prompt"]},
        vision={**TINY_SECTIONS["vision"], "default_question": SECRETS["vision.default_question"]},
        image={
            **TINY_SECTIONS["image"],
            "defaults": {
                **TINY_SECTIONS["image"]["defaults"],
                "negative_prompt": SECRETS["image.defaults.negative_prompt"],
            },
        },
    )
    app = start_app(config, folder / "app.log")
    yield app
    stop_app(app)


UNAUTHENTICATED_GETS = [
    "/",
    "/?page=",
    "/?deep_link=abc",
    "/config",
    "/config?deep_link=abc",
    "/gradio_api/info",
    "/gradio_api/info?all_endpoints=true",
    "/gradio_api/openapi.json",
    "/gradio_api/runs",
    "/login",
    "/logout",
    "/theme.css",
    "/gradio_api/theme.css",
    "/manifest.json",
    "/robots.txt",
    "/gradio_api/app_id",
    "/gradio_api/token",
    "/gradio_api/user",
    "/gradio_api/login_check",
    "/gradio_api/startup-events",
    "/openapi.json",
    "/api/docs",
    "/v1/models",
    "/api/status",
]


def login(app: RunningApp, password: str = KEY, address: str | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address) if address else None
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.post(f"{app.url}/login", data={"username": "me", "password": password})


def test_a_client_without_the_key_learns_nothing_of_the_ui(guarded_ui: RunningApp) -> None:
    seen: dict[str, str] = {}
    for path in UNAUTHENTICATED_GETS:
        for encoding in ("identity", "gzip, deflate, br"):  # a compressed page must not slip past
            response = httpx.get(f"{guarded_ui.url}{path}", headers={"accept-encoding": encoding}, timeout=30)
            seen[f"GET {path} ({encoding})"] = response.text
    seen["POST /login (wrong key)"] = login(guarded_ui, "wrong-key", "127.0.0.5").text
    leaks = [(what, where) for where, text in seen.items() for what, value in SECRETS.items() if value in text]
    assert leaks == [], f"shown to a client without the key: {leaks}"
    # The login page is still Gradio's login form.
    page = httpx.get(f"{guarded_ui.url}/", timeout=30).text
    assert 'window.gradio_config = {"auth_required":true' in page
    assert "window.gradio_api_info = " in page

    signed_in = login(guarded_ui)
    assert signed_in.status_code == 200 and signed_in.json() == {"success": True}
    config = httpx.get(f"{guarded_ui.url}/config", cookies=signed_in.cookies, timeout=30)
    assert config.status_code == 200
    # The same values are there once the key is given: the test above could have seen them.
    assert all(value in config.text for value in SECRETS.values()), "the UI lost its configuration"
    full_page = httpx.get(f"{guarded_ui.url}/", cookies=signed_in.cookies, timeout=30).text
    assert SECRETS["chat.system_prompt"] in full_page and '"auth_required":true' not in full_page


def test_a_signed_in_client_still_uses_the_ui(guarded_ui: RunningApp) -> None:
    from gradio_client import Client

    cookies = login(guarded_ui).cookies
    index = fn_index(guarded_ui, "chat", cookies)
    assert isinstance(index, int)
    client = Client(guarded_ui.url, auth=("me", KEY), verbose=False)
    _, history = client.predict({"text": "Say hi.", "files": []}, [], "", 0.0, 1.0, 4, 1.0, 1, api_name="/chat")
    assert history and history[-1]["role"] == "assistant"


# -- defect 3: guessing the key on the login form ------------------------------------------


def test_failed_logins_are_limited_per_address(guarded_ui: RunningApp) -> None:
    attacker, other = "127.0.0.3", "127.0.0.4"
    tries = [login(guarded_ui, f"guess-{n}", attacker) for n in range(11)]
    assert [t.status_code for t in tries[:10]] == [400] * 10, [t.text for t in tries]
    assert tries[10].status_code == 429, tries[10].text
    assert 0 < int(tries[10].headers["retry-after"]) <= 60
    assert "too many failed logins" in tries[10].json()["error"]["message"]
    assert login(guarded_ui, KEY, attacker).status_code == 429  # not even the right key is checked now
    assert login(guarded_ui, KEY, other).status_code == 200  # another address is not affected


def test_the_limiter_counts_failures_in_a_sliding_window() -> None:
    now = [1000.0]
    limiter = LoginLimiter(max_failures=10, window_s=60, clock=lambda: now[0])
    for _ in range(10):
        assert limiter.retry_after("a") == 0
        limiter.attempt("a")
        now[0] += 1
    assert limiter.retry_after("a") == pytest.approx(50)  # the first failure ages out at 1060
    assert limiter.retry_after("b") == 0
    now[0] = 1060.0
    assert limiter.retry_after("a") == 0  # one slot is free again
    limiter.attempt("a")
    assert limiter.retry_after("a") == pytest.approx(1)
    limiter.succeeded("a")
    assert limiter.retry_after("a") == 0


def test_the_login_limit_lifts_after_its_window_and_a_success_resets_it() -> None:
    """The middleware around a stand-in for Gradio's /login, with a clock the test moves."""
    now = [0.0]
    checked: list[bytes] = []

    async def gradio_login(scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        checked.append(body)
        await send({"type": "http.response.start", "status": 200 if body == b"right" else 400, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    guard = GradioGuard(gradio_login, ServerSettings(api_key=KEY), LoginLimiter(clock=lambda: now[0]))

    def attempt(password: bytes, client: str = "10.1.1.1") -> int:
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": password, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        scope = {"type": "http", "method": "POST", "path": "/login", "headers": [], "client": (client, 5)}
        asyncio.run(guard(scope, receive, send))
        return statuses[0]

    assert [attempt(b"wrong") for _ in range(10)] == [400] * 10
    assert attempt(b"wrong") == 429 and attempt(b"right") == 429 and len(checked) == 10  # not even checked
    now[0] = 59.0
    assert attempt(b"right") == 429
    now[0] = 60.0
    assert attempt(b"right") == 200  # the window has passed
    assert [attempt(b"wrong") for _ in range(10)] == [400] * 10  # the success forgot earlier failures
    assert attempt(b"wrong") == 429


def test_the_limiter_forgets_the_oldest_clients_first() -> None:
    limiter = LoginLimiter(max_failures=2, window_s=60, clock=lambda: 0.0, max_clients=3)
    for client in ("a", "b", "c", "d"):
        limiter.attempt(client)
        limiter.attempt(client)
    assert limiter.retry_after("a") == 0 and all(limiter.retry_after(c) > 0 for c in "bcd")


def test_client_addresses_are_keyed_as_one_machine_holds_them() -> None:
    def key(host: str) -> str:
        return client_key({"client": (host, 1)})

    assert key("10.0.0.1") != key("10.0.0.2")
    assert key("2001:db8::1") == key("2001:db8::ffff:1") == "2001:db8::/64"
    assert key("::ffff:10.0.0.1") == "10.0.0.1"


@pytest.mark.browser
def test_the_login_page_works_in_a_browser(guarded_ui: RunningApp, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.conftest import CHROMIUM_FLAGS

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Chromium is missing: run 'make test' or apt-get install chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        page = browser.new_page()
        page.goto(guarded_ui.url)
        password = page.locator("input[type=password]")
        expect(password).to_be_visible(timeout=30_000)
        page.locator("input[type=text]").first.fill("me")
        password.fill(KEY)
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#chat-input textarea")).to_be_visible(timeout=30_000)
        browser.close()
