"""Load test: the real app under concurrent mixed traffic, for a bounded time.

Starts the app as ``python main.py --config <tmp> serve`` on a free loopback port (the embedded
SmolLM2 chat model, tiny random-weight LLaVA and Stable Diffusion 1.5 models), warms each model up
once, then runs ``--clients`` threads for ``--seconds``. Each client loops over a random choice of
a streamed chat, a non-streamed chat (16-48 tokens), a question about a small generated PNG sent as
a ``data:`` URI, and a 64x64 two-step image generation, through the official ``openai`` client
with ``max_retries=0``. Meanwhile a sampler polls ``GET /api/status`` about every 100 ms and reads
the server's RSS from ``/proc/<pid>/status``.

Why: under ``one_at_a_time`` three kinds of model compete for one device, so this is the traffic
that makes the manager swap on almost every request. It checks that every request either succeeds or is
refused the documented way (503 with ``Retry-After``), that no instant shows two models holding
memory on one device, and that the server's memory comes back once the models unload (a model or
per-load leak would show as growth over a hundred or more loads).

Prints one table: requests, successes and failures by status per kind, p50/p95 latency (and time
to first token for streamed chat), RSS at baseline, peak and end, and the sampler's counts.
Exits 1 on any unexpected failure, a hang, a sample with more than one model holding memory on a
device, memory not back to baseline, or a model the app itself reports as still referenced.
Usage: python bench/load.py [--seconds 120] [--clients 16] [--seed 0]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import base64
import io
import random
import shutil
import math
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from PIL import Image

from tests.conftest import TINY_SECTIONS, RunningApp, install_tiny_models, start_app, stop_app, write_config

KINDS = ("chat-stream", "chat", "vision", "image")
MIB = 2**20
# Allowed growth of the idle server's RSS from the baseline (after warm-up, no model resident)
# to the end (clients stopped, no model resident). After a warm-up every library is imported and
# its one-time caches exist, so what remains is allocator retention (request threads each get a
# glibc malloc arena; Python keeps its own pools): +9 to +18 MiB in the runs on the 2-core machine.
# Loaded SmolLM2 (98 MB GGUF plus its KV cache) measures about 156 MiB, so a chat model left in
# memory fails, and so does a leak of about 1 MiB per load over the 100+ loads of a 120 s run.
RSS_TOLERANCE_MIB = 100
KEEP_ALIVE_S = 2.0  # idle models unload quickly after the clients stop (the reaper runs every 5 s)
UNLOAD_WAIT_S = 60.0
STATUS_POLL_S = 0.1
REQUEST_TIMEOUT_S = 120.0  # a request still unanswered after this counts as a hang
LEAK_WARNING = "still referenced after unloading"
CHAT_PROMPTS = (
    "Explain how a lighthouse works.",
    "Name three uses of copper.",
    "What is a prime number?",
    "Give me a tip for writing clear emails.",
    "Why is the sky blue?",
)
VISION_QUESTIONS = ("What is in this image?", "Which colour dominates?", "Describe the picture.")


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    kind: str
    status: str  # "ok", an HTTP status ("503"), or what went wrong ("timeout", "bad-response", ...)
    seconds: float
    first_token_s: float | None = None
    retry_after: bool = False
    detail: str = ""

    @property
    def acceptable_refusal(self) -> bool:
        return self.status == "503" and self.retry_after


@dataclass
class Results:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def of(self, kind: str) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.kind == kind]

    def unexpected(self) -> list[Outcome]:
        with self.lock:
            return [o for o in self.outcomes if o.status != "ok" and not o.acceptable_refusal]


# -- the four kinds of request -----------------------------------------------------------


@dataclass(frozen=True)
class Models:
    chat: str
    vision: str
    image: str


def discover_models(url: str) -> Models:
    """The names /v1/models lists for each capability."""
    cards = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()["data"]
    by_capability = {card["capability"]: card["id"] for card in reversed(cards)}  # the first of each wins
    return Models(by_capability["chat"], by_capability["vision"], by_capability["image"])


def png_data_uri(rng: random.Random) -> str:
    """A small PNG of random coloured blocks, as the data: URI a client sends."""
    image = Image.new("RGB", (48, 48), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):
        x, y = rng.randrange(40), rng.randrange(40)
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 8, y + 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_stream(client: openai.OpenAI, models: Models, rng: random.Random) -> tuple[float | None, str]:
    """A streamed chat; returns the time to the first content and what is wrong with the reply, if anything."""
    started = time.perf_counter()
    first: float | None = None
    finish = None
    stream = client.chat.completions.create(
        model=models.chat,
        messages=[{"role": "user", "content": rng.choice(CHAT_PROMPTS)}],
        max_tokens=rng.randint(16, 48),
        stream=True,
    )
    for chunk in stream:
        if not chunk.choices:
            continue
        if first is None and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        finish = chunk.choices[0].finish_reason or finish
    return first, "" if first is not None and finish is not None else f"no content or no finish_reason ({finish})"


def chat(client: openai.OpenAI, models: Models, rng: random.Random) -> str:
    response = client.chat.completions.create(
        model=models.chat,
        messages=[{"role": "user", "content": rng.choice(CHAT_PROMPTS)}],
        max_tokens=rng.randint(16, 48),
    )
    return "" if response.choices and response.choices[0].message.content else "empty reply"


def vision(client: openai.OpenAI, models: Models, rng: random.Random) -> str:
    content = [
        {"type": "text", "text": rng.choice(VISION_QUESTIONS)},
        {"type": "image_url", "image_url": {"url": png_data_uri(rng)}},
    ]
    response = client.chat.completions.create(
        model=models.vision, messages=[{"role": "user", "content": content}], max_tokens=rng.randint(16, 48)
    )
    return "" if response.choices and response.choices[0].message.content is not None else "no message content"


def image(client: openai.OpenAI, models: Models, rng: random.Random) -> str:
    response = client.images.generate(
        model=models.image,
        prompt=rng.choice(("a red square", "a lighthouse at dusk", "a tree on a hill")),
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": rng.randrange(2**31)},
    )
    if not response.data or not response.data[0].b64_json:
        return "no image"
    size = Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).size
    return "" if size == (64, 64) else f"image of {size}"


def run_one(kind: str, client: openai.OpenAI, models: Models, rng: random.Random) -> Outcome:
    """One request of ``kind``, timed and classified; never raises."""
    started = time.perf_counter()
    first: float | None = None
    try:
        if kind == "chat-stream":
            first, problem = chat_stream(client, models, rng)
        else:
            problem = {"chat": chat, "vision": vision, "image": image}[kind](client, models, rng)
    except openai.APIStatusError as error:
        retry_after = error.response.headers.get("retry-after", "").isdigit()
        return Outcome(kind, str(error.status_code), time.perf_counter() - started, None, retry_after, str(error))
    except openai.APITimeoutError as error:
        return Outcome(kind, "timeout", time.perf_counter() - started, detail=str(error))
    except openai.APIConnectionError as error:
        return Outcome(kind, "connection", time.perf_counter() - started, detail=str(error))
    except openai.APIError as error:  # an error event inside a stream
        return Outcome(kind, "stream-error", time.perf_counter() - started, detail=str(error))
    except Exception as error:
        return Outcome(kind, type(error).__name__, time.perf_counter() - started, detail=str(error))
    elapsed = time.perf_counter() - started
    return Outcome(kind, "bad-response" if problem else "ok", elapsed, first, detail=problem)


def client_loop(url: str, models: Models, seed: int, deadline: float, results: Results) -> None:
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    with client:
        while time.monotonic() < deadline:
            results.add(run_one(rng.choice(KINDS), client, models, rng))


# -- the server's side: /api/status and RSS ---------------------------------------------


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    """A memory figure of the process from /proc/<pid>/status (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field_name} in /proc/{pid}/status")


def holding_memory(resident: list[dict[str, Any]]) -> dict[str, int]:
    """Per device, how many models hold weights at this instant.

    A swap shows two entries: the old model "unloading" and the new one "loading". The manager
    unloads the victims before it starts the load, so while a model on that device is still
    unloading, the loading one holds nothing yet; any other pair (ready + ready, ready + loading,
    loading + loading) means two models in memory at once.
    """
    by_device: dict[str, Counter[str]] = defaultdict(Counter)
    for model in resident:
        by_device[model["device"].split(":", 1)[0]][model["state"]] += 1
    return {
        device: states["ready"] + states["unloading"] + (0 if states["unloading"] else states["loading"])
        for device, states in by_device.items()
    }


@dataclass
class Sampler:
    """Polls /api/status and the server's RSS until stopped."""

    url: str
    pid: int
    samples: int = 0
    errors: int = 0
    max_entries: int = 0  # resident entries on one device, in any state
    max_holding: int = 0
    violations: list[list[dict[str, Any]]] = field(default_factory=list)
    peak_rss: int = 0
    seconds: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        started = time.monotonic()
        ticks = 0
        with httpx.Client(timeout=10) as http:
            while not self.stop.wait(max(0.0, started + ticks * STATUS_POLL_S - time.monotonic())):
                ticks += 1
                self.seconds = time.monotonic() - started
                try:
                    self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
                    status = http.get(f"{self.url}/api/status").raise_for_status().json()
                except (httpx.HTTPError, OSError):
                    self.errors += 1
                    continue
                self.record(status)

    def record(self, status: dict[str, Any]) -> None:
        resident = status["resident"]
        self.samples += 1
        per_device = Counter(model["device"].split(":", 1)[0] for model in resident)
        self.max_entries = max(self.max_entries, *per_device.values(), 0)
        holding = max(holding_memory(resident).values(), default=0)
        self.max_holding = max(self.max_holding, holding)
        if holding > 1:
            self.violations.append(resident)


def resident_models(url: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/status", timeout=30).raise_for_status().json()["resident"]


def wait_until_unloaded(url: str, timeout_s: float) -> bool:
    """Whether the keep-alive unloaded every model within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not resident_models(url):
            return True
        time.sleep(0.5)
    return False


def idle_rss(app: RunningApp, settle_s: float = 3.0) -> int:
    """The idle server's RSS once no model is resident, after a short settle."""
    time.sleep(settle_s)
    return rss_bytes(app.process.pid)


# -- setting up, running, reporting ------------------------------------------------------


def launch(folder: Path) -> RunningApp:
    """The real app on a free loopback port, with the embedded chat model and tiny vision and image models."""
    models = folder / "tiny-models"
    models.mkdir()
    install_tiny_models(models)
    config = write_config(
        folder,
        models,
        manager={"policy": "one_at_a_time", "keep_alive_s": KEEP_ALIVE_S},
        # One llama.cpp thread leaves the second core to the HTTP server, the clients and the sampler.
        chat={"context_size": 2048, "threads": 1},
        **TINY_SECTIONS,
    )
    return start_app(config, folder / "app.log", 180.0)


def warm_up(url: str, models: Models) -> list[Outcome]:
    """One request of each kind, so that imports and one-time allocations happen before the baseline."""
    rng = random.Random(-1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    with client:
        return [run_one(kind, client, models, rng) for kind in KINDS]


def run_clients(url: str, models: Models, clients: int, seconds: float, seed: int) -> tuple[Results, list[str]]:
    """Run the clients until the deadline; returns the outcomes and the clients that never returned."""
    results = Results()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(url, models, seed + i, deadline, results), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    hard_stop = deadline + REQUEST_TIMEOUT_S + 10
    for thread in threads:
        thread.join(timeout=max(0.0, hard_stop - time.monotonic()))
    return results, [t.name for t in threads if t.is_alive()]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def kind_row(kind: str, outcomes: list[Outcome], latency: bool = True) -> str:
    ok = [o for o in outcomes if o.status == "ok"]
    refused = sum(o.acceptable_refusal for o in outcomes)
    failures = Counter(o.status for o in outcomes if o.status != "ok" and not o.acceptable_refusal)
    failed = ", ".join(f"{status}: {n}" for status, n in sorted(failures.items())) or "0"
    seconds = [o.seconds for o in ok]
    ttft = [o.first_token_s for o in ok if o.first_token_s is not None]
    cells = [kind, str(len(outcomes)), str(len(ok)), str(refused), failed]
    if latency:  # over mixed kinds a latency means little
        cells += [seconds_text(percentile(seconds, 50)), seconds_text(percentile(seconds, 95))]
        cells += [seconds_text(percentile(ttft, 50)), seconds_text(percentile(ttft, 95))] if ttft else []
    return "| " + " | ".join(cells + ["-"] * (9 - len(cells))) + " |"


def request_table(results: Results) -> list[str]:
    header = "| kind | requests | ok | 503 + Retry-After | failures by status | p50 s | p95 s | TTFT p50 | TTFT p95 |"
    rows = [kind_row(kind, results.of(kind)) for kind in KINDS]
    with results.lock:
        everything = list(results.outcomes)
    return [header, "|" + "---|" * 9, *rows, kind_row("all", everything, latency=False)]


@dataclass
class Memory:
    after_start: int
    baseline: int
    peak: int
    high_water: int
    end: int | None  # None: the models never unloaded

    @property
    def growth(self) -> int | None:
        return None if self.end is None else self.end - self.baseline

    @property
    def back(self) -> bool:
        return self.growth is not None and self.growth <= RSS_TOLERANCE_MIB * MIB


def memory_lines(memory: Memory) -> list[str]:
    end = "models never unloaded" if memory.end is None else f"{memory.end / MIB:.0f} MiB"
    growth = "-" if memory.growth is None else f"{memory.growth / MIB:+.0f} MiB"
    return [
        f"Server RSS: after start-up {memory.after_start / MIB:.0f} MiB; baseline (after warm-up, no model "
        f"resident) {memory.baseline / MIB:.0f} MiB; peak during load {memory.peak / MIB:.0f} MiB "
        f"(VmHWM {memory.high_water / MIB:.0f} MiB); end (clients stopped, no model resident) {end}",
        f"Memory back to baseline: {'yes' if memory.back else 'NO'} (end - baseline = {growth}, "
        f"tolerance +{RSS_TOLERANCE_MIB} MiB)",
    ]


def load_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """How often each model loaded during the run, and the memory the manager measured per load."""
    counts = {
        label: n - before["load_counts"].get(label, 0)
        for label, n in sorted(after["load_counts"].items())
        if n > before["load_counts"].get(label, 0)
    }
    sizes: dict[str, list[int]] = defaultdict(list)
    for record in after["history"]:  # the manager keeps the last 100 transitions
        if record["action"] == "load":
            sizes[record["label"]].append(record["bytes"])
    return [
        "Model loads during the run: " + (", ".join(f"{label} {n}" for label, n in counts.items()) or "none"),
        "Memory per load as the manager measured it (median of its last transitions): "
        + ", ".join(f"{label} {statistics.median(b) / MIB:.0f} MiB" for label, b in sorted(sizes.items())),
    ]


def sampler_lines(sampler: Sampler, policy: str) -> list[str]:
    return [
        f"/api/status samples ({policy}, one every {STATUS_POLL_S * 1000:.0f} ms planned): {sampler.samples} in "
        f"{sampler.seconds:.0f} s ({sampler.errors} failed); max entries on one device (any state) "
        f"{sampler.max_entries}; max models holding memory on one device {sampler.max_holding}; samples with "
        f"more than one: {len(sampler.violations)}",
    ]


def server_log_findings(app: RunningApp) -> tuple[int, int, list[str]]:
    """Counts of ERROR and Traceback lines in the server's log, and the leak warnings it wrote."""
    lines = app.log().splitlines()
    errors = sum("ERROR" in line for line in lines)
    tracebacks = sum(line.startswith("Traceback") for line in lines)
    return errors, tracebacks, [line for line in lines if LEAK_WARNING in line]


def print_failures(results: Results, hung: list[str], sampler: Sampler, app: RunningApp) -> None:
    for outcome in results.unexpected()[:10]:
        print(f"  {outcome.kind}: {outcome.status} after {outcome.seconds:.2f} s: {outcome.detail[:300]}")
    if hung:
        print(f"  clients still waiting {REQUEST_TIMEOUT_S + 10:.0f} s after the deadline: {', '.join(hung)}")
    for resident in sampler.violations[:3]:
        states = ", ".join(f"{m['label']} {m['state']}{' (in use)' if m['in_use'] else ''}" for m in resident)
        print(f"  more than one model holding memory: {states}")
    excerpt = [line for line in app.log().splitlines() if "ERROR" in line or "Traceback" in line or "Error" in line]
    if excerpt:
        print("  server log excerpt:\n    " + "\n    ".join(excerpt[:20]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the clients run (default 120)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' random choices")
    return parser.parse_args()


def timed(label: str, action: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    value = action()
    print(f"{label}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return value


@dataclass
class Run:
    """What one load run measured."""

    warm: list[Outcome]
    results: Results
    hung: list[str]
    sampler: Sampler
    memory: Memory
    before: dict[str, Any]  # /api/status before the clients start
    after: dict[str, Any]  # and once they stopped


def measure(app: RunningApp, clients: int, seconds: float, seed: int) -> Run:
    """Warm up, take the baseline, run the clients with the sampler, wait for the unload, take the end."""
    pid = app.process.pid
    after_start = rss_bytes(pid)
    models = discover_models(app.url)
    warm = timed("warm-up", lambda: warm_up(app.url, models))
    if not wait_until_unloaded(app.url, UNLOAD_WAIT_S):
        raise RuntimeError("the models did not unload after the warm-up")
    baseline = idle_rss(app)
    before = httpx.get(f"{app.url}/api/status", timeout=30).raise_for_status().json()
    sampler = Sampler(app.url, pid, peak_rss=baseline)
    sampler_thread = threading.Thread(target=sampler.run, daemon=True)
    sampler_thread.start()
    results, hung = timed("load", lambda: run_clients(app.url, models, clients, seconds, seed))
    sampler.stop.set()
    sampler_thread.join(timeout=15)
    after = httpx.get(f"{app.url}/api/status", timeout=30).raise_for_status().json()
    end = idle_rss(app) if wait_until_unloaded(app.url, UNLOAD_WAIT_S) else None
    memory = Memory(after_start, baseline, sampler.peak_rss, rss_bytes(pid, "VmHWM"), end)
    return Run(warm, results, hung, sampler, memory, before, after)


def report(run: Run, app: RunningApp, clients: int, seconds: float) -> bool:
    """Print the table and the verdict; whether every check passed."""
    errors, tracebacks, leaks = server_log_findings(app)
    policy = run.after["policy"]
    print(
        f"Load test: {clients} clients for {seconds:.0f} s against {app.url} (loopback), policy {policy}, "
        f"device {run.after['device']}, keep_alive_s {KEEP_ALIVE_S:g}; SmolLM2-135M Q4_1 chat, tiny random "
        "LLaVA and SD1.5"
    )
    print("Warm-up (one of each kind): " + ", ".join(f"{o.kind} {o.status} {o.seconds:.2f} s" for o in run.warm))
    print("\n".join(request_table(run.results)))
    print("\n".join(memory_lines(run.memory)))
    print("\n".join(sampler_lines(run.sampler, policy)))
    print("\n".join(load_lines(run.before, run.after)))
    print(f"Server log: {errors} ERROR lines, {tracebacks} tracebacks, {len(leaks)} '{LEAK_WARNING}' warnings")
    checks = {
        "unexpected failures": not run.results.unexpected() and all(o.status == "ok" for o in run.warm),
        "no hung client": not run.hung,
        "at most one model in memory per device": not run.sampler.violations and run.sampler.samples > 0,
        "memory back to baseline": run.memory.back,
        "no model left referenced": not leaks,
        "server alive": app.process.poll() is None,
    }
    failed = [name for name, ok in checks.items() if not ok]
    print(f"Result: FAIL ({'; '.join(failed)})" if failed else "Result: PASS")
    if failed:
        print_failures(run.results, run.hung, run.sampler, app)
    total = len(run.results.outcomes)
    print(f"{total} requests, {total / seconds:.2f}/s", file=sys.stderr)
    return not failed


def main() -> int:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="enclave-load-"))
    app = timed("build tiny models and start the app", lambda: launch(folder))
    passed = False
    try:
        run = measure(app, args.clients, args.seconds, args.seed)
        passed = report(run, app, args.clients, args.seconds)
    finally:
        stop_app(app)
        if passed:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"server log and models kept in {folder}", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
