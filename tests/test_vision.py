"""vision.py with a tiny random-weight LLaVA, loaded through the real loading code and model manager.

The tiny model's answers mean nothing: these tests check streaming, the prompt, seeds,
cancelling, quantised loading, errors and swapping with the real chat model.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tiny_llava import IMAGE_TOKEN, IMAGE_TOKENS, build_tiny_llava

from chat import ChatService
from errors import BadInputError, ModelLoadError, ModelMissingError, TooLargeError
from model_manager import LoadSpec, ModelManager
from settings import ChatSettings, VisionSettings
from text_generation.stream import GenerationParams, Message
from vision import (
    MAX_QUESTION_CHARS,
    VisionService,
    choose_placement,
    estimate_model_bytes,
    release_text,
)

GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=24, seed=1, repeat_penalty=1.0)
# What llava-1.5's template makes of a two-question conversation.
TEMPLATED = "USER: <image>\nWhat is it? ASSISTANT: A flag. USER: Which colours? ASSISTANT:"
SAMPLED = GenerationParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234, repeat_penalty=1.0)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)  # two cores, shared with other test processes
    return build_tiny_llava(tmp_path_factory.mktemp("vision") / "tiny-llava")


def make_service(folder: Path, manager: ModelManager | None = None, **settings: Any) -> VisionService:
    manager = manager or ModelManager(keep_alive_s=-1)
    return VisionService(manager, VisionSettings(**settings), folder, cuda_available=lambda: False)


@pytest.fixture(scope="module")
def service(tiny_llava: Path) -> VisionService:
    return make_service(tiny_llava)


@pytest.fixture
def picture() -> Image.Image:
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    image.paste((20, 20, 220), (24, 0, 48, 40))
    return image


def ask(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def generate_calls(service: VisionService, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Records the keyword arguments of every generate call the service makes on the loaded model."""
    calls: list[dict[str, Any]] = []
    with service._manager.acquire(service.load_spec()) as loaded:
        original = loaded.model.generate

        def spy(**kwargs: Any) -> Any:
            calls.append(kwargs)
            return original(**kwargs)

        monkeypatch.setattr(loaded.model, "generate", spy)
    yield calls


def prompt_of(service: VisionService, call: dict[str, Any]) -> str:
    with service._manager.acquire(service.load_spec()) as loaded:
        return loaded.processor.tokenizer.decode(call["input_ids"][0])


def image_tokens_in(service: VisionService, call: dict[str, Any]) -> int:
    with service._manager.acquire(service.load_spec()) as loaded:
        return int((call["input_ids"] == loaded.image_token_id).sum())


# ----------------------------------------------------------------------------
# Streaming and the prompt
# ----------------------------------------------------------------------------


def test_streams_an_answer_in_several_pieces(service: VisionService, picture: Image.Image) -> None:
    stream = service.stream(picture, ask("What is in this image?"), GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1, "the answer should arrive in several pieces"
    assert all(pieces)
    assert stream.finish_reason in ("stop", "length")
    assert stream.prompt_tokens > IMAGE_TOKENS
    assert 0 < stream.completion_tokens <= GREEDY.max_tokens
    assert stream.model_name == "tiny-llava"
    assert stream.seed == 1


def test_prompt_is_the_chat_template_with_the_image_on_the_first_user_turn(
    service: VisionService, picture: Image.Image, generate_calls: list[dict[str, Any]]
) -> None:
    conversation = [*ask("What is it?"), {"role": "assistant", "content": "A flag."}, *ask("Which colours?")]
    with service._manager.acquire(service.load_spec()) as loaded:
        prompt = loaded.prompt(None, conversation)
    assert prompt == TEMPLATED
    stream = service.stream(picture, conversation, GREEDY)
    stream.text()
    (call,) = generate_calls
    assert stream.prompt_tokens == call["input_ids"].shape[1]
    assert image_tokens_in(service, call) == IMAGE_TOKENS
    assert call["pixel_values"].shape == (1, 3, 32, 32)
    assert prompt_of(service, call).replace(IMAGE_TOKEN, "") == prompt.replace(IMAGE_TOKEN, "")


def test_a_follow_up_question_still_sees_the_image(
    service: VisionService, picture: Image.Image, generate_calls: list[dict[str, Any]]
) -> None:
    first = service.complete(picture, ask("What is it?"), GREEDY)
    follow_up = [*ask("What is it?"), {"role": "assistant", "content": first}, *ask("And the colours?")]
    service.complete(picture, follow_up, GREEDY)
    assert len(generate_calls) == 2
    second = generate_calls[1]
    assert image_tokens_in(service, second) == IMAGE_TOKENS
    assert "pixel_values" in second
    text = prompt_of(service, second)
    assert text.index(IMAGE_TOKEN) < text.index("What is it?") < text.index("And the colours?")


@pytest.mark.parametrize("messages", [[], ask("   ")], ids=["no-messages", "blank-question"])
def test_an_empty_question_asks_the_default_one(
    service: VisionService, picture: Image.Image, generate_calls: list[dict[str, Any]], messages: list[Message]
) -> None:
    service.complete(picture, messages, GREEDY.override(max_tokens=2))
    assert "USER: " in prompt_of(service, generate_calls[0])
    assert "Describe this image in detail." in prompt_of(service, generate_calls[0])


def test_a_system_message_comes_first(
    service: VisionService, picture: Image.Image, generate_calls: list[dict[str, Any]]
) -> None:
    service.complete(picture, [{"role": "system", "content": "Be brief."}, *ask("Hi")], GREEDY.override(max_tokens=2))
    assert prompt_of(service, generate_calls[0]).startswith("Be brief. USER: ")


def test_images_arrive_in_any_form_and_are_normalised(service: VisionService, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    Image.new("RGBA", (3000, 2000), (0, 255, 0, 128)).save(path)
    stream = service.stream(str(path), ask("What is it?"), GREEDY.override(max_tokens=3))
    stream.text()
    assert stream.completion_tokens > 0
    with pytest.raises(BadInputError, match="the file is empty"):
        service.stream(b"", ask("What is it?"))


# ----------------------------------------------------------------------------
# Seeds, stopping, cancelling
# ----------------------------------------------------------------------------


def test_fixed_seed_is_reproducible_when_sampling(service: VisionService, picture: Image.Image) -> None:
    first = service.complete(picture, ask("Tell me a story."), SAMPLED)
    second = service.complete(picture, ask("Tell me a story."), SAMPLED)
    other = service.complete(picture, ask("Tell me a story."), SAMPLED.override(seed=99))
    assert first == second
    assert first != other


def test_random_seed_is_reported(service: VisionService, picture: Image.Image) -> None:
    stream = service.stream(picture, ask("hi"), SAMPLED.override(seed=-1, max_tokens=2))
    stream.text()
    assert stream.seed >= 0


def test_concurrent_requests_take_turns_on_the_model(service: VisionService, picture: Image.Image) -> None:
    expected = service.complete(picture, ask("Tell me a story."), SAMPLED)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(service.complete(picture, ask("Tell me a story."), SAMPLED)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected, expected]


def test_max_tokens_ends_with_length(service: VisionService, picture: Image.Image) -> None:
    stream = service.stream(picture, ask("Go on."), GREEDY.override(max_tokens=5))
    stream.text()
    assert stream.completion_tokens <= 5
    assert stream.finish_reason == "length" or stream.completion_tokens < 5


def test_stop_strings_end_the_answer_before_them(service: VisionService, picture: Image.Image) -> None:
    full = service.complete(picture, ask("Go on."), GREEDY.override(max_tokens=40))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stream = service.stream(picture, ask("Go on."), GREEDY.override(max_tokens=40, stop=[stop]))
    assert stream.text() == full[: full.index(stop)]
    assert stream.finish_reason == "stop"


def test_release_text_holds_back_a_possible_stop_string() -> None:
    assert release_text("hello wor", ["world"]) == ("hello ", "wor", False)
    assert release_text("hello world and more", ["world"]) == ("hello ", "", True)
    assert release_text("abc", []) == ("abc", "", False)
    assert release_text("a STOP b END", ["END", "STOP"]) == ("a ", "", True)


def test_cancel_stops_early_and_releases_the_model(service: VisionService, picture: Image.Image) -> None:
    cancel = threading.Event()
    stream = service.stream(picture, ask("Count to a hundred."), GREEDY.override(max_tokens=300), cancel=cancel)
    received = []
    for piece in stream:
        received.append(piece)
        if len(received) == 2:
            cancel.set()
    assert stream.finish_reason == "cancelled"
    assert len(received) == 2
    assert stream.completion_tokens < 300
    assert all(not model.in_use for model in service._manager.status().resident)
    assert not any(thread.name == "vision-generate" for thread in threading.enumerate())


def test_a_request_cancelled_before_it_starts_generates_nothing(service: VisionService, picture: Image.Image) -> None:
    service._manager.unload_all()
    cancel = threading.Event()
    cancel.set()  # as if the user pressed stop while the request waited for the model
    stream = service.stream(picture, ask("Count to a hundred."), GREEDY.override(max_tokens=300), cancel=cancel)
    assert stream.text() == ""
    assert stream.finish_reason == "cancelled"
    assert stream.completion_tokens == 0
    assert service._manager.status().resident == ()  # the model was not even loaded for it


def test_closing_the_stream_early_stops_generation_and_releases_the_model(
    service: VisionService, picture: Image.Image
) -> None:
    stream = service.stream(picture, ask("Count to a hundred."), GREEDY.override(max_tokens=300))
    next(iter(stream))
    assert service._manager.status().resident[0].in_use
    stream.close()
    assert service._manager.status().resident[0].in_use is False
    assert not any(thread.name == "vision-generate" for thread in threading.enumerate())


# ----------------------------------------------------------------------------
# Bad input, checked before anything loads
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "assistant", "content": "hi"}], "last message must come from the user"),
        ([{"role": "robot", "content": "hi"}], "role"),
        ([{"role": "user", "content": ["parts"]}], "text content"),
    ],
)
def test_bad_messages_are_refused_up_front(
    tiny_llava: Path, picture: Image.Image, messages: list[Message], problem: str
) -> None:
    fresh = make_service(tiny_llava)
    with pytest.raises(BadInputError, match=problem):
        fresh.stream(picture, messages)
    assert fresh._manager.status().load_counts == {}


def test_a_question_over_the_limit_is_too_large(service: VisionService, picture: Image.Image) -> None:
    with pytest.raises(TooLargeError, match=r"8,001 characters; the limit .* is 8,000"):
        service.stream(picture, ask("x" * (MAX_QUESTION_CHARS + 1)))


def test_an_image_over_the_pixel_limit_is_too_large(tiny_llava: Path) -> None:
    strict = make_service(tiny_llava, refuse_image_pixels=10_000)
    with pytest.raises(TooLargeError, match=r"200×100 = 20,000 pixels; the limit is 10,000"):
        strict.stream(Image.new("RGB", (200, 100)), ask("hi"))


def test_bad_generation_parameters_are_refused(service: VisionService, picture: Image.Image) -> None:
    with pytest.raises(BadInputError, match="top_p"):
        service.stream(picture, ask("hi"), GenerationParams(top_p=0))


def test_a_long_conversation_drops_old_turns_but_keeps_the_image(
    service: VisionService, picture: Image.Image, generate_calls: list[dict[str, Any]]
) -> None:
    history: list[Message] = []
    for turn in range(10):
        history += [*ask(f"Question {turn}: " + "tell me about the sea " * 6), {"role": "assistant", "content": "ok"}]
    stream = service.stream(picture, [*history, *ask("Last one?")], GREEDY.override(max_tokens=32))
    stream.text()
    assert stream.dropped_messages > 0 and stream.dropped_messages % 2 == 0
    assert stream.prompt_tokens + 32 <= 512
    assert image_tokens_in(service, generate_calls[0]) == IMAGE_TOKENS


def test_a_question_longer_than_the_context_is_refused(service: VisionService, picture: Image.Image) -> None:
    with pytest.raises(BadInputError, match=r"tokens with the image, and the model's context holds 512"):
        service.stream(picture, ask("word " * 1500)).text()


# ----------------------------------------------------------------------------
# Precision, device, loading
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested, cuda, bnb, precision, device, notice",
    [
        ("auto", True, True, "4bit", "cuda", None),
        ("8bit", True, True, "8bit", "cuda", None),
        ("fp16", True, False, "fp16", "cuda", None),
        ("auto", True, False, "fp16", "cuda", "bitsandbytes is not installed"),
        ("auto", False, True, "fp32", "cpu", "No CUDA GPU: LLaVA runs on the CPU in full precision"),
        ("fp16", False, True, "fp32", "cpu", "fp16 needs a GPU"),
        ("8bit", False, True, "8bit", "cpu", "runs 8bit on the CPU through bitsandbytes"),
        ("4bit", False, False, "fp32", "cpu", "bitsandbytes is not installed"),
        ("bf16", False, False, "bf16", "cpu", "in bf16"),
    ],
)
def test_precision_and_device_are_chosen_with_a_notice_when_it_matters(
    requested: str, cuda: bool, bnb: bool, precision: str, device: str, notice: str | None
) -> None:
    placement = choose_placement(requested, cuda, bnb)
    assert (placement.precision, placement.device) == (precision, device)
    if notice is None:
        assert placement.notice is None
    else:
        assert placement.notice is not None and notice in placement.notice


def test_the_load_spec_names_precision_and_device(tiny_llava: Path) -> None:
    manager = ModelManager()
    on_gpu = VisionService(
        manager, VisionSettings(), tiny_llava, cuda_available=lambda: True, bitsandbytes_available=lambda: True
    )
    assert on_gpu.load_spec() == LoadSpec.of("vision", tiny_llava, precision="4bit", device="cuda")
    assert on_gpu.notice() is None
    on_cpu = make_service(tiny_llava)
    assert on_cpu.load_spec() == LoadSpec.of("vision", tiny_llava, precision="fp32", device="cpu")
    assert on_cpu.notice() == "No CUDA GPU: LLaVA runs on the CPU in full precision (slow)."


def test_estimates_scale_with_precision(tiny_llava: Path) -> None:
    def estimate(precision: str) -> int:
        return estimate_model_bytes(LoadSpec.of("vision", tiny_llava, precision=precision, device="cpu"))

    weights = sum(path.stat().st_size for path in tiny_llava.glob("*.safetensors"))
    assert estimate("fp32") == pytest.approx(weights, rel=0.01)  # saved in fp32
    assert estimate("4bit") < estimate("8bit") < estimate("fp16") == estimate("bf16") < estimate("fp32")
    assert estimate("4bit") == pytest.approx(0.3 * estimate("fp16"), rel=0.01)


@pytest.mark.parametrize("precision, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantised_loading_on_the_cpu_through_bitsandbytes(
    tiny_llava: Path, picture: Image.Image, precision: str, layer: str
) -> None:
    import bitsandbytes  # noqa: F401 - a requirement: failing to import it is a failure, not a skip

    quantised = make_service(tiny_llava, precision=precision)
    assert quantised.load_spec().option("precision") == precision
    assert quantised.notice() == f"No CUDA GPU: LLaVA runs {precision} on the CPU through bitsandbytes (slow)."
    stream = quantised.stream(picture, ask("What is it?"), GREEDY.override(max_tokens=6))
    assert stream.text() is not None and stream.completion_tokens > 0
    with quantised._manager.acquire(quantised.load_spec()) as loaded:
        assert type(loaded.model.model.language_model.layers[0].mlp.up_proj).__name__ == layer
    full_precision = sum(path.stat().st_size for path in tiny_llava.glob("*.safetensors"))
    assert quantised._manager.status().resident[0].reported_bytes < 0.5 * full_precision


# ----------------------------------------------------------------------------
# A missing or broken model folder
# ----------------------------------------------------------------------------


def test_availability_says_what_is_missing_and_where(tiny_llava: Path, tmp_path: Path) -> None:
    assert make_service(tiny_llava).availability() is None
    assert [(m.name, m.capability, m.present) for m in make_service(tiny_llava).models()] == [
        ("tiny-llava", "vision", True)
    ]
    absent = make_service(tmp_path / "llava-1.5-7b-hf")
    assert not absent.models()[0].present
    message = absent.availability()
    assert message is not None
    assert str(tmp_path / "llava-1.5-7b-hf") in message and "does not exist" in message
    for needed in ("config.json", "*.safetensors", "preprocessor_config.json", "vision.model"):
        assert needed in message
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_llava / "config.json", partial)
    message = make_service(partial).availability()
    assert message is not None and "lacks the weights (*.safetensors), the tokenizer" in message


def test_a_missing_folder_fails_when_used_naming_the_fix(tmp_path: Path, picture: Image.Image) -> None:
    absent = make_service(tmp_path / "llava-1.5-7b-hf")
    stream = absent.stream(picture, ask("hi"))
    with pytest.raises(ModelMissingError, match=r"llava-1\.5-7b-hf does not exist.*llava-hf/llava-1\.5-7b-hf"):
        stream.text()
    assert absent._manager.status().resident == ()


def copy_of(tiny_llava: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "broken-llava"
    shutil.copytree(tiny_llava, folder)
    return folder


def test_a_folder_without_a_chat_template_gets_llavas_own(tiny_llava: Path, tmp_path: Path) -> None:
    folder = copy_of(tiny_llava, tmp_path)
    (folder / "chat_template.jinja").unlink()
    plain = make_service(folder)
    conversation = [*ask("What is it?"), {"role": "assistant", "content": "A flag."}, *ask("Which colours?")]
    with plain._manager.acquire(plain.load_spec()) as loaded:
        assert not loaded.processor.chat_template
        assert loaded.prompt(None, conversation) == TEMPLATED


def test_a_broken_config_is_a_load_error_naming_the_file(
    tiny_llava: Path, tmp_path: Path, picture: Image.Image
) -> None:
    folder = copy_of(tiny_llava, tmp_path)
    (folder / "config.json").write_text("{ not json", encoding="utf-8")
    broken = make_service(folder)
    with pytest.raises(ModelLoadError, match=r"broken-llava/config\.json could not be read"):
        broken.stream(picture, ask("hi")).text()
    assert broken._manager.status().resident == ()


def test_a_folder_of_another_model_is_refused(tiny_llava: Path, tmp_path: Path, picture: Image.Image) -> None:
    folder = copy_of(tiny_llava, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="holds a llama model, not LLaVA"):
        make_service(folder).stream(picture, ask("hi")).text()


def test_truncated_weights_are_a_load_error_and_nothing_stays_loaded(
    tiny_llava: Path, tmp_path: Path, picture: Image.Image
) -> None:
    folder = copy_of(tiny_llava, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    broken = make_service(folder)
    with pytest.raises(ModelLoadError, match=r"could not be loaded from .*broken-llava.*download"):
        broken.stream(picture, ask("hi")).text()
    assert broken._manager.status().resident == ()


# ----------------------------------------------------------------------------
# Sharing the manager with the real chat model
# ----------------------------------------------------------------------------


def test_chat_and_vision_swap_one_at_a_time(tiny_llava: Path, embedded_model: Path, picture: Image.Image) -> None:
    manager = ModelManager(policy="one_at_a_time", keep_alive_s=-1)
    chat = ChatService(manager, ChatSettings(context_size=512, threads=1), embedded_model)
    vision = make_service(tiny_llava, manager)
    chat_label, vision_label = f"chat:{embedded_model.name}", "vision:tiny-llava"

    def resident() -> list[str]:
        return [model.label for model in manager.status().resident]

    assert chat.complete(ask("Say hi."), GREEDY.override(max_tokens=4))
    assert resident() == [chat_label]
    stream = iter(vision.stream(picture, ask("What is it?"), GREEDY))
    next(stream)
    assert resident() == [vision_label], "the chat model must be gone before LLaVA loads"
    list(stream)
    assert chat.complete(ask("Say bye."), GREEDY.override(max_tokens=4))
    assert resident() == [chat_label]

    status = manager.status()
    assert [(record.action, record.label) for record in status.history] == [
        ("load", chat_label),
        ("unload", chat_label),
        ("load", vision_label),
        ("unload", vision_label),
        ("load", chat_label),
    ]
    assert all(record.seconds > 0 for record in status.history)
    assert status.load_counts == {chat_label: 2, vision_label: 1}
    manager.close()
    assert manager.status().resident == ()


def test_loading_preprocessing_and_generating_run_on_the_devices_compute_thread(
    tiny_llava: Path, picture: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Torch work spread over threads keeps several OpenMP teams, which slowed decoding 2-3 times.
    from transformers import LlavaForConditionalGeneration

    seen: dict[str, set[str]] = {"load": set(), "generate": set()}
    load, generate = LlavaForConditionalGeneration.from_pretrained, LlavaForConditionalGeneration.generate

    def recorded_load(*args: Any, **kwargs: Any) -> Any:
        seen["load"].add(threading.current_thread().name)
        return load(*args, **kwargs)

    def recorded_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["generate"].add(threading.current_thread().name)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", recorded_load)
    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", recorded_generate)
    manager = ModelManager(keep_alive_s=-1)
    service = make_service(tiny_llava, manager)
    assert service.stream(picture, ask("What is in this image?"), GREEDY).text()
    compute = {manager.compute_thread(service.load_spec()).call(lambda: threading.current_thread().name)}
    assert seen["load"] == compute and seen["generate"] == compute
    assert threading.current_thread().name not in compute
    manager.close()
