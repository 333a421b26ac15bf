"""Conversations that cannot break: text_generation.conversation.normalise, and the chat and
vision prompts built on it, through real chat templates that raise on what they do not expect."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import ChatService, chat_renderer
from errors import BadInputError
from model_manager import ModelManager
from settings import ChatSettings, VisionSettings
from text_generation.conversation import normalise
from text_generation.stream import GenerationParams, Message
from vision import LoadedVisionModel, VisionService

# ----------------------------------------------------------------------------
# Published chat templates (tokenizer_config.json "chat_template"), as test data
# ----------------------------------------------------------------------------

# mistralai/Mistral-7B-Instruct-v0.2: no system role, strict alternation.
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct: any role, contents trimmed.
LLAMA_3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# ChatML (teknium/OpenHermes-2.5-Mistral-7B and many others): any role.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# google/gemma-7b-it: no system role, strict alternation, contents trimmed.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@dataclass(frozen=True)
class Template:
    name: str
    jinja: str
    eos: str
    bos: str
    tail: str  # what follows the last user message: the end of its turn and the generation prompt
    # (what opens a turn, what ends its role name, the assistant's role name); None: no role names
    turn: tuple[str, str, str] | None = None


TEMPLATES = [
    Template("mistral-v0.2", MISTRAL_V02, "</s>", "<s>", " [/INST]"),
    Template(
        "llama-3",
        LLAMA_3,
        "<|eot_id|>",
        "<|begin_of_text|>",
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "assistant"),
    ),
    Template(
        "chatml", CHATML, "<|im_end|>", "", "<|im_end|>\n<|im_start|>assistant\n", ("<|im_start|>", "\n", "assistant")
    ),
    Template(
        "gemma", GEMMA, "<eos>", "<bos>", "<end_of_turn>\n<start_of_turn>model\n", ("<start_of_turn>", "\n", "model")
    ),
]


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def system(text: str) -> Message:
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------
# normalise, case by case
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "system_text, turns, system_role, expected",
    [
        pytest.param(
            "Be brief.",
            [user("Hi"), assistant("Hello"), user("Bye")],
            False,
            [user("Be brief.\n\nHi"), assistant("Hello"), user("Bye")],
            id="system-folded-into-the-first-user-turn",
        ),
        pytest.param(
            None,
            [user("Look at this."), assistant("Nice."), user(""), user("Which colours?")],
            True,
            [user("Look at this."), assistant("Nice."), user("Which colours?")],
            id="image-only-turn-leaves-an-empty-user-turn",
        ),
        pytest.param(
            None,
            [user("one"), assistant(" \n\t "), user("two")],
            True,
            [user("one\n\ntwo")],
            id="whitespace-only-assistant-turn-then-merge",
        ),
        pytest.param(
            None,
            [user("route note dropped after this"), user("and this")],
            True,
            [user("route note dropped after this\n\nand this")],
            id="two-user-turns-merge",
        ),
        pytest.param(
            None,
            [user("q"), assistant("a1"), assistant("a2"), user("r")],
            True,
            [user("q"), assistant("a1\n\na2"), user("r")],
            id="two-assistant-turns-merge",
        ),
        pytest.param(
            "Be brief.",
            [assistant("How can I help?"), user("Say hi.")],
            False,
            [user("Be brief.\n\nSay hi.")],
            id="leading-assistant-dropped-system-kept",
        ),
        pytest.param(
            "Be brief.",
            [assistant("How can I help?"), assistant("Anything?"), user("Say hi.")],
            True,
            [system("Be brief."), user("Say hi.")],
            id="leading-assistant-turns-dropped-system-role",
        ),
        pytest.param(
            "Be brief.",
            [{"role": "developer", "content": "Use French."}, user("Hi")],
            True,
            [system("Be brief.\n\nUse French."), user("Hi")],
            id="developer-joins-the-system-prompt",
        ),
        pytest.param(
            None,
            [user("a"), system("Now be formal."), assistant("b"), user("c")],
            False,
            [user("Now be formal.\n\na"), assistant("b"), user("c")],
            id="system-mid-conversation-is-not-lost",
        ),
        pytest.param(
            "  \n",
            [system(""), assistant("x"), user("Hi")],
            False,
            [user("Hi")],
            id="blank-system-prompts-vanish",
        ),
        pytest.param(
            "Describe it.",
            [user("What is it?"), assistant("A flag."), user("")],
            False,
            [user("Describe it.\n\nWhat is it?"), assistant("A flag."), user("")],
            id="an-empty-last-user-turn-stays-last",
        ),
        pytest.param(
            "Describe it.",
            [user(" ")],
            False,
            [user("Describe it.")],
            id="only-an-empty-user-turn-takes-the-system-prompt",
        ),
    ],
)
def test_normalise_cases(
    system_text: str | None, turns: list[Message], system_role: bool, expected: list[Message]
) -> None:
    before = [dict(turn) for turn in turns]
    assert normalise(system_text, turns, system_role=system_role) == expected
    assert turns == before, "the caller's turns are left as they were"


# ----------------------------------------------------------------------------
# Random conversations through the real render path and real templates
# ----------------------------------------------------------------------------

WORDS = ["sea", "sky", "red", "naïve", "日本語", "line\nbreak", "tab\there", "{{ not jinja }}", "'quote\""]
SYSTEM_PROMPT = "SYSTEM-PROMPT answer briefly"


@st.composite
def conversations(draw: st.DrawFn) -> list[Message]:
    """[optional system prompt] + turns of any role, some empty or whitespace-only (an image-only
    turn arrives as an empty user turn), ending in a non-empty user turn. Every non-blank content
    carries a marker naming its position, so the tests can find it in the prompt."""
    messages = [system(SYSTEM_PROMPT)] if draw(st.booleans()) else []
    count = draw(st.integers(min_value=0, max_value=10))
    for index in range(count):
        role = draw(st.sampled_from(["user", "assistant", "system", "developer"]))
        kind = draw(st.sampled_from(["text", "text", "empty", "whitespace"]))
        if kind == "empty":
            content = ""
        elif kind == "whitespace":
            content = draw(st.text(alphabet=" \t\n", min_size=1, max_size=4))
        else:
            content = " ".join([f"{role}#{index}#", *draw(st.lists(st.sampled_from(WORDS), max_size=3))])
        messages.append({"role": role, "content": content})
    messages.append(user(" ".join([f"question#{count}#", *draw(st.lists(st.sampled_from(WORDS), max_size=3))])))
    return messages


def assert_rendered(prompt: str, template: Template, messages: list[Message]) -> None:
    """Every system and user text is in the prompt, the last user message comes last, and the
    model sees one system turn at most, then user and assistant turns in turn."""
    for message in messages:
        if message["role"] != "assistant" and message["content"].strip():
            assert message["content"] in prompt, f"{message['role']} text {message['content']!r} is lost"
    assert prompt.endswith(messages[-1]["content"] + template.tail)
    if template.turn is not None:
        opener, role_end, answer = template.turn
        roles = [piece.split(role_end, 1)[0] for piece in prompt.split(opener)[1:]]
        if roles[:1] == ["system"]:
            roles = roles[1:]
        assert roles == ["user", answer] * (len(roles) // 2), roles


EXAMPLES = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
@EXAMPLES
@given(messages=conversations())
def test_any_conversation_renders_with_the_system_prompt_and_the_last_question_last(
    template: Template, messages: list[Message]
) -> None:
    render = chat_renderer(template.jinja, template.eos, template.bos)
    prompt, stop = render(messages)
    assert_rendered(prompt, template, messages)
    assert stop == [template.eos]


@pytest.mark.parametrize("template", TEMPLATES, ids=[t.name for t in TEMPLATES])
@EXAMPLES
@given(messages=conversations())
def test_every_slice_fit_to_context_may_try_renders(template: Template, messages: list[Message]) -> None:
    # fit_to_context renders [system prompt] + the turns from some point on: the slice may start
    # with an assistant turn, an empty turn or a second user turn.
    render = chat_renderer(template.jinja, template.eos, template.bos)
    head = messages[:1] if messages[0]["content"] == SYSTEM_PROMPT else []
    turns = messages[len(head) :]
    for start in range(len(turns)):
        prompt, _ = render(head + turns[start:])
        assert_rendered(prompt, template, [*head, turns[-1]])


@settings(max_examples=300, deadline=None, database=None)
@given(messages=conversations(), system_role=st.booleans())
def test_normalised_conversations_alternate_from_user_to_user(messages: list[Message], system_role: bool) -> None:
    normalised = normalise(None, messages, system_role=system_role)
    dialogue = normalised[1:] if normalised[0]["role"] == "system" else normalised
    assert [turn["role"] for turn in dialogue] == ["user", "assistant"] * (len(dialogue) // 2) + ["user"]
    assert all(turn["content"].strip() for turn in dialogue)
    has_system = any(m["role"] in ("system", "developer") and m["content"].strip() for m in messages)
    assert (normalised[0]["role"] == "system") == (system_role and has_system)
    assert normalise(None, normalised, system_role=system_role) == normalised


def test_a_template_that_drops_the_system_turn_silently_gets_it_in_the_first_user_turn() -> None:
    drops_system = (
        "{% for m in messages %}{% if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}{% endif %}"
        "{% endfor %}<assistant>"
    )
    render = chat_renderer(drops_system, "", "")
    prompt, _ = render([system("Be brief."), assistant("Hi"), user("a"), user("b")])
    assert prompt == "<user>Be brief.\n\na\n\nb<assistant>"


def test_a_template_that_still_refuses_names_the_remaining_problem() -> None:
    # Mistral's template, then a rule about content that no tidying can satisfy.
    picky = "{% if 'forbidden' in messages[-1]['content'] %}{{ raise_exception('no forbidden words') }}{% endif %}"
    render = chat_renderer(MISTRAL_V02 + picky, "</s>", "<s>")
    with pytest.raises(BadInputError, match=r"^the model's chat template refuses .*\(no forbidden words\)") as error:
        render([system("Be brief."), assistant("Hi"), user("a"), user("a forbidden word")])
    assert "alternate" not in str(error.value)


# ----------------------------------------------------------------------------
# The real app with strict templates: the embedded model with its template replaced
# ----------------------------------------------------------------------------

# Mistral's rules (no system role, strict alternation) in the ChatML markup SmolLM2 was trained on,
# so the tiny model answers rather than ending at once as it does after "[/INST]".
STRICT_CHATML = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] not in ('user', 'assistant') %}{{ raise_exception('Only user and assistant roles') }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEQUENCES_THAT_USED_TO_FAIL = {
    "leading-assistant": [assistant("Hello! How can I help?"), user("Say hello.")],
    "two-user-turns": [user("Hello there."), user("Say hello.")],
    "system-then-assistant": [system("Answer in one word."), assistant("Hi."), user("Say hello.")],
    "empty-user-turn-in-the-middle": [user("Look at this picture."), assistant("Nice."), user(""), user("Say hello.")],
}
# What each becomes in the prompt (the default system prompt, folded, where none is given).
MISTRAL_PROMPTS = {
    "leading-assistant": "<|im_start|>[INST] You are a helpful assistant.\n\nSay hello. [/INST]",
    "two-user-turns": "<|im_start|>[INST] You are a helpful assistant.\n\nHello there.\n\nSay hello. [/INST]",
    "system-then-assistant": "<|im_start|>[INST] Answer in one word.\n\nSay hello. [/INST]",
    "empty-user-turn-in-the-middle": (
        "<|im_start|>[INST] You are a helpful assistant.\n\nLook at this picture. [/INST]"
        "Nice.<|im_end|>[INST] Say hello. [/INST]"
    ),
}
STRICT_CHATML_PROMPTS = {
    "leading-assistant": (
        "<|im_start|>user\nYou are a helpful assistant.\n\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    ),
    "two-user-turns": (
        "<|im_start|>user\nYou are a helpful assistant.\n\nHello there.\n\nSay hello.<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "system-then-assistant": "<|im_start|>user\nAnswer in one word.\n\nSay hello.<|im_end|>\n<|im_start|>assistant\n",
    "empty-user-turn-in-the-middle": (
        "<|im_start|>user\nYou are a helpful assistant.\n\nLook at this picture.<|im_end|>\n"
        "<|im_start|>assistant\nNice.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    ),
}


def with_template(embedded_model: Path, target: Path, template: str) -> Path:
    """A copy of the embedded SmolLM2 GGUF whose tokenizer.chat_template is ``template``."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(embedded_model, "r")
    architecture = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(target, arch=architecture, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    details = MetadataDetails(gguf.GGUFValueType.STRING, template)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: details}, [])
    return target


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("strict-templates")


def check_prompts(service: ChatService, model_path: Path, template: str, expected: dict[str, str]) -> None:
    """The template as written refuses each sequence; the app's own path renders each as expected."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    raw = Jinja2ChatFormatter(template=template, eos_token="</s>", bos_token="<s>")
    with service._manager.acquire(service.load_spec(model_path)) as model:
        assert model.llama.metadata["tokenizer.chat_template"] == template
        for name, messages in SEQUENCES_THAT_USED_TO_FAIL.items():
            with pytest.raises(ValueError, match="roles"):
                raw(messages=messages)
                pytest.fail(f"{name} renders without normalising")
            system_message, turns = service._check_messages(messages, None)
            prompt, _ = model.render([system_message, *turns] if system_message else turns)
            assert prompt == expected[name], name


GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=6, seed=1)


def test_the_real_app_answers_through_mistrals_template(embedded_model: Path, models_dir: Path) -> None:
    path = with_template(embedded_model, models_dir / "smollm2-mistral-v0.2.gguf", MISTRAL_V02)
    service = ChatService(ModelManager(keep_alive_s=-1), ChatSettings(), path)
    check_prompts(service, path, MISTRAL_V02, MISTRAL_PROMPTS)
    for name, messages in SEQUENCES_THAT_USED_TO_FAIL.items():
        stream = service.stream(messages, GREEDY)
        stream.text()  # SmolLM2 was not trained on [INST]: it mostly ends its reply at once
        assert stream.finish_reason == "stop" and stream.prompt_tokens > 0, name


def test_the_real_app_replies_through_a_strict_template(embedded_model: Path, models_dir: Path) -> None:
    path = with_template(embedded_model, models_dir / "smollm2-strict-chatml.gguf", STRICT_CHATML)
    service = ChatService(ModelManager(keep_alive_s=-1), ChatSettings(), path)
    check_prompts(service, path, STRICT_CHATML, STRICT_CHATML_PROMPTS)
    for name, messages in SEQUENCES_THAT_USED_TO_FAIL.items():
        stream = service.stream(messages, GREEDY)
        reply = stream.text()
        assert reply.strip() and stream.completion_tokens > 0, f"{name}: no reply"
        assert stream.finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------
# Vision: the LLaVA conversation is normalised the same way
# ----------------------------------------------------------------------------


def llava_processor(chat_template: str):  # -> LlavaProcessor
    from tiny_llava import CHAT_TEMPLATE, IMAGE_SIZE, PATCH_SIZE, build_tokenizer
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template or CHAT_TEMPLATE,
    )


# A LLaVA template in Mistral's manner: content parts, no system role, strict alternation.
STRICT_LLAVA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'][0]['text'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
VISION_CONVERSATION = [
    system("Be brief."),
    assistant("Send me a picture."),
    user(""),  # the image alone
    user("What is it?"),
    assistant("A flag."),
    user("Which colours?"),
]


@pytest.mark.parametrize(
    "chat_template, expected",
    [
        pytest.param(
            "",
            "Be brief. USER: <image>\nWhat is it? ASSISTANT: A flag. USER: Which colours? ASSISTANT:",
            id="llava-1.5",
        ),
        pytest.param(
            STRICT_LLAVA,
            "<s>[INST] <image>\nBe brief.\n\nWhat is it? [/INST]A flag.</s>[INST] Which colours? [/INST]",
            id="strict",
        ),
    ],
)
def test_the_llava_prompt_is_normalised_with_the_image_on_the_first_user_turn(
    chat_template: str, expected: str
) -> None:
    service = VisionService(
        ModelManager(keep_alive_s=-1),
        VisionSettings(),
        Path("absent-llava"),
        cuda_available=lambda: False,
    )
    system_message, turns = service._check_messages(VISION_CONVERSATION)
    loaded = LoadedVisionModel(model=None, processor=llava_processor(chat_template))
    assert loaded.prompt(system_message, turns) == expected
    # fit_to_context's slices, each starting wherever it drops to, render too
    for start in range(len(turns)):
        assert loaded.prompt(system_message, turns[start:]).endswith("Which colours? " + expected.rsplit(" ", 1)[1])
