"""Several chat requests decoded together (chat.parallel_requests), on the real embedded SmolLM2
through llama.cpp's batch API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chat import ChatService
from model_manager import GIB, LoadSpec, ModelManager, detect_devices
from settings import ChatSettings, GenerationDefaults
from tests.test_model_manager import Worker, wait_until
from text_generation.batch_decoding import BatchRequest, RequestBatcher, _TextOut
from text_generation.stream import GenerationParams

QUESTIONS = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a city."]
GREEDY = GenerationParams(temperature=0.0, max_tokens=12, seed=1)
COUNTING = "List the numbers from 1 to 50, separated by commas."  # SmolLM2 answers in about 190 tokens


@pytest.fixture()
def manager() -> Iterator[ModelManager]:
    manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1, wait_timeout_s=120)
    yield manager
    manager.close()


def service(manager: ModelManager, model: Path, parallel: int) -> ChatService:
    settings = ChatSettings(
        context_size=1024, parallel_requests=parallel, defaults=GenerationDefaults(max_tokens=12, temperature=0)
    )
    return ChatService(manager, settings, model)


def ask(chat: ChatService, question: str, params: GenerationParams = GREEDY, **options: object) -> tuple[str, object]:
    stream = chat.stream([{"role": "user", "content": question}], params, **options)  # type: ignore[arg-type]
    return stream.text(), stream


def while_busy(chat: ChatService, questions: list[str], params: GenerationParams = GREEDY) -> list[Worker]:
    """Ask ``questions`` at once while another request holds the chat model (so they must share)."""
    spec = chat.load_spec(chat.resolve_model().path)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with chat._manager.acquire(spec):
            entered.set()
            release.wait(120)

    holder = Worker(hold).start()
    assert entered.wait(60)
    askers = [Worker(lambda q=q: ask(chat, q, params)).start() for q in questions]
    wait_until(lambda: waiting_for_batch(chat, spec) == len(questions), "every request waits for the batch", timeout=60)
    release.set()
    holder.join(60)
    for asker in askers:
        asker.join(120)
    return askers


def waiting_for_batch(chat: ChatService, spec: LoadSpec) -> int:
    batcher = chat._batchers.get(spec)
    return 0 if batcher is None else len(batcher._pending)


def widest_step(chat: ChatService, manager: ModelManager, spec: LoadSpec) -> int:
    """The most requests one step carried, read once the batch run has given the model back."""
    wait_until(lambda: not chat._batchers[spec].running and not manager.is_busy(spec), "the batch run ends", 60)
    with manager.borrow_if_idle(spec) as model:
        assert model is not None and model.batch is not None, "no batch ran"
        return model.batch.widest_step


def test_requests_that_come_together_are_decoded_together(manager: ModelManager, embedded_model: Path) -> None:
    chat = service(manager, embedded_model, parallel=4)
    askers = while_busy(chat, QUESTIONS)
    assert widest_step(chat, manager, chat.load_spec(embedded_model)) == 4, "all four must share decoding steps"
    for asker in askers:
        assert asker.error is None, asker.error
        text, stream = asker.result
        assert text.strip() and stream.finish_reason in ("stop", "length")
        assert 0 < stream.completion_tokens <= GREEDY.max_tokens and stream.prompt_tokens > 0


def test_a_request_alone_takes_the_single_path_and_gets_the_same_answer(
    manager: ModelManager, embedded_model: Path
) -> None:
    alone, _ = ask(service(manager, embedded_model, parallel=1), QUESTIONS[0])
    batched = service(manager, embedded_model, parallel=4)
    again, _ = ask(batched, QUESTIONS[0])
    assert again == alone
    assert not batched._batchers, "a request alone must not start a batch"
    # one request through the batch context decodes the same tokens as the single path
    [asker] = while_busy(batched, [QUESTIONS[0]])
    assert asker.error is None and asker.result[0] == alone


def test_a_stopped_request_leaves_the_batch_and_the_others_go_on(manager: ModelManager, embedded_model: Path) -> None:
    chat = service(manager, embedded_model, parallel=4)
    long = GenerationParams(temperature=0.0, max_tokens=200, seed=1)
    stop = threading.Event()
    spec = chat.load_spec(chat.resolve_model().path)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with manager.acquire(spec):
            entered.set()
            release.wait(120)

    holder = Worker(hold).start()
    assert entered.wait(60)
    stopped = chat.stream([{"role": "user", "content": COUNTING}], long, cancel=stop)

    def read_then_stop() -> list[str]:
        received = []
        for piece in stopped:
            received.append(piece)
            stop.set()  # Stop pressed as the first piece shows
        return received

    pieces = Worker(read_then_stop).start()
    other = Worker(lambda: ask(chat, COUNTING, long)).start()
    wait_until(lambda: waiting_for_batch(chat, spec) == 2, "both wait for the batch", timeout=60)
    release.set()
    holder.join(60)
    pieces.join(120)
    other.join(180)
    assert stopped.finish_reason == "cancelled" and len(pieces.result) <= 1
    assert other.error is None, other.error
    text, stream = other.result
    assert "49, 50" in text and stream.completion_tokens > 100, "the other request must go on to its end"


def test_stop_strings_are_held_back_until_they_are_known() -> None:
    out = _TextOut(["</answer>", "###"])
    assert out.add(b"Hello <") == ("Hello ", False)
    assert out.add(b"/ans") == ("", False)
    assert out.add(b"wer> tail") == ("", True)
    split = _TextOut([])
    assert split.add("é".encode()[:1]) == ("", False)
    assert split.add("é".encode()[1:]) == ("é", False)
    held = _TextOut(["###"])
    assert held.add(b"a #") == ("a ", False) and held.rest() == "#"


def test_a_batch_gives_way_to_requests_for_other_models() -> None:
    taken: list[list[BatchRequest]] = []
    waiting = {"others": False}

    def run_batch(take: object, cancel: threading.Event) -> None:
        taken.append(take(4))  # type: ignore[operator]

    batcher = RequestBatcher(run_batch, lambda: waiting["others"])
    waiting["others"] = True
    first = BatchRequest(lambda model: None, 0.0, 1.0, 1.0, 1)  # type: ignore[arg-type,return-value]
    batcher.submit(first)
    wait_until(lambda: len(taken) >= 2, "the run borrows the model again after giving way", timeout=10)
    assert all(batch == [] for batch in taken), "nothing new is taken while others wait"
    waiting["others"] = False
    wait_until(lambda: taken[-1] == [first], "the request is served once nobody else waits", timeout=10)
    wait_until(lambda: not batcher.running, "the batcher stops when nothing is left", timeout=10)
