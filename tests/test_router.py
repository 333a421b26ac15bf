"""router.py: routing by attachment, commands and rules (a labelled table), and the chat model's
part (classifying, writing Stable Diffusion prompts) with the real embedded SmolLM2 on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.routing import (
    FALLBACK_NEGATIVE_PROMPT,
    HINT_ATTACH,
    HINT_FORCE_DRAW,
    RouteDecision,
    classify_with_model,
    decide_route,
    image_prompt_by_rules,
    image_prompt_schema,
    interpret_image_request,
    route_message,
)
from chat import ChatService
from errors import BadInputError
from model_manager import ModelManager
from settings import ChatSettings

IMG = True  # an image is attached
# SmolLM2-135M writes most prompts itself; the rules catch the rest. Measured: see the test's output.
MIN_MODEL_REWRITES = 16

# (message, an image attached?, the route the product should take). About half English, half German.
# A message the rules leave undecided counts as what happens without the model: chat.
LABELLED: list[tuple[str, bool, str]] = [
    # English: requests to draw
    ("draw a lighthouse at dusk", False, "image"),
    ("Draw me a cat wearing a top hat", False, "image"),
    ("please paint a watercolor of a harbor at sunrise", False, "image"),
    ("Could you draw a dragon flying over a castle?", False, "image"),
    ("can you sketch a cozy cabin in the woods", False, "image"),
    ("I'd like a picture of a red sports car on a mountain road", False, "image"),
    ("Generate an image of a futuristic city at night", False, "image"),
    ("create a logo for my bakery called Sunny Buns", False, "image"),
    ("make me a wallpaper with purple galaxies", False, "image"),
    ("Illustrate a children's book page with a friendly bear", False, "image"),
    ("render a 3d scene of a cabin in the snow", False, "image"),
    ("a photo of a golden retriever playing in the snow", False, "image"),
    ("Hi! Could you please draw a penguin on a surfboard?", False, "image"),
    ("I want an oil painting of a stormy sea", False, "image"),
    ("show me a picture of a medieval market", False, "image"),
    ("Paint a portrait of an old fisherman, dramatic lighting", False, "image"),
    ("doodle a happy robot", False, "image"),
    ("I'm making a birthday card. Can you draw a cake with candles?", False, "image"),
    ("/draw a fox in the forest", False, "image"),
    ("/image cyberpunk street, neon, rain", False, "image"),
    ("a castle on a hill <lora:pixel_style:0.8>", False, "image"),
    # English: looks like drawing, is chat
    ("describe how to draw a cat", False, "chat"),
    ("how do I draw a circle in Python", False, "chat"),
    ("what is a drawing?", False, "chat"),
    ("draw conclusions from this data: sales rose 5% while costs fell", False, "chat"),
    ("paint me a picture of your weekend with words", False, "chat"),
    ("explain image generation", False, "chat"),
    ("what's in this picture?", False, "chat"),
    ("What is the capital of France?", False, "chat"),
    ("Write a poem about autumn", False, "chat"),
    ("Why do artists paint self-portraits?", False, "chat"),
    ("How does Stable Diffusion create images?", False, "chat"),
    ("draw a flowchart of the login process", False, "chat"),
    ("Can you draw?", False, "chat"),
    ("I love painting landscapes on weekends", False, "chat"),
    ("We need to draw the line somewhere on scope creep", False, "chat"),
    ("Tell me about the history of the Mona Lisa painting", False, "chat"),
    ("Give me tips for improving my sketches", False, "chat"),
    ("sketch out a plan for the product launch", False, "chat"),
    ("what's the best paint for a wooden fence?", False, "chat"),
    ("Picture this: a world without cars. What would change?", False, "chat"),
    ("Generate a list of names for my cat", False, "chat"),
    ("Create a Docker image for my Flask app", False, "chat"),
    ("Make the picture brighter", False, "chat"),
    ("/chat draw a cat", False, "chat"),
    ("/describe", False, "chat"),
    ("create a picture-perfect itinerary for Rome", False, "chat"),
    # English: an image is attached
    ("what's in this picture?", IMG, "vision"),
    ("draw a cat like this", IMG, "vision"),
    ("", IMG, "vision"),
    ("/describe what breed is this dog", IMG, "vision"),
    ("/draw a castle", IMG, "image"),
    # German: requests to draw
    ("Zeichne einen Leuchtturm in der Abenddämmerung", False, "image"),
    ("Male mir einen Drachen über einer Burg", False, "image"),
    ("Mal mir eine Katze mit Hut", False, "image"),
    ("Kannst du mir einen Hund mit Sonnenbrille zeichnen?", False, "image"),
    ("Könntest du bitte ein Segelboot im Sturm malen?", False, "image"),
    ("Erstelle ein Bild von einem Wald im Herbst", False, "image"),
    ("Generiere ein Foto von einer Stadt bei Nacht", False, "image"),
    ("Ich hätte gern ein Bild von einem roten Auto im Regen", False, "image"),
    ("Bild von einem Fuchs im Schnee", False, "image"),
    ("Bitte zeichne ein Einhorn auf einer Wiese", False, "image"),
    ("Mach mir ein Logo für meine Bäckerei", False, "image"),
    ("Ich möchte ein Ölgemälde von einem Hafen", False, "image"),
    ("Skizziere ein kleines Haus am See", False, "image"),
    ("Zeig mir ein Bild von einem Marktplatz im Mittelalter", False, "image"),
    ("Hallo! Kannst du eine Katze im Weltraum zeichnen?", False, "image"),
    ("Würdest du mir ein Hintergrundbild mit Bergen erstellen?", False, "image"),
    ("Ein Aquarell von einer Blumenwiese", False, "image"),
    ("Erzeuge ein Porträt einer alten Frau", False, "image"),
    ("Könnten Sie bitte ein Plakat für unser Sommerfest gestalten?", False, "image"),
    ("/draw ein Leuchtturm im Sturm", False, "image"),
    ("Kannst du ein Logo für meinen Sportverein entwerfen?", False, "image"),
    # German: looks like drawing, is chat
    ("wie zeichnet man einen Hund?", False, "chat"),
    ("Was ist eine Zeichnung?", False, "chat"),
    ("Was ist auf diesem Bild?", False, "chat"),
    ("Erkläre mir, wie Bildgenerierung funktioniert", False, "chat"),
    ("Beschreibe, wie man eine Katze zeichnet", False, "chat"),
    ("Kannst du zeichnen?", False, "chat"),
    ("Ich zeichne gern in meiner Freizeit", False, "chat"),
    ("Warum malen Menschen Bilder?", False, "chat"),
    ("Wie kann ich mein Zeichnen verbessern?", False, "chat"),
    ("Zeichne ein Diagramm der Verkaufszahlen", False, "chat"),
    ("Was ist die Hauptstadt von Frankreich?", False, "chat"),
    ("Schreibe ein Gedicht über den Herbst", False, "chat"),
    ("Gib mir Tipps zum Malen mit Acrylfarben", False, "chat"),
    ("Welche Farben passen zu einem Sonnenuntergang?", False, "chat"),
    ("Wie unterzeichne ich ein PDF?", False, "chat"),
    ("Die Farbe an meiner Wand blättert ab, was tun?", False, "chat"),
    ("Kannst du mir erklären, wie man ein Porträt malt?", False, "chat"),
    ("Fotos von meinem Urlaub sind weg, was kann ich tun?", False, "chat"),
    ("Erstelle ein Docker-Image für meine App", False, "chat"),
    ("Beschreibe das Foto", False, "chat"),
    ("Welcher Maler hat die Sternennacht gemalt?", False, "chat"),
    # German: an image is attached
    ("Was ist auf diesem Bild?", IMG, "vision"),
    ("Zeichne so etwas", IMG, "vision"),
    ("/chat Erzähl mir einen Witz", IMG, "chat"),
]


# Written after the rules and never used to change them: what a rule-writer did not see. Its
# accuracy is the honest estimate of how well the rules generalise; LABELLED above is what they
# were written against (their training accuracy). Add to this table, but never tune rules on it.
HELD_OUT: list[tuple[str, bool, str]] = [
    ("could you create an image of a snowy village at night", False, "image"),
    ("paint a portrait of an old fisherman", False, "image"),
    ("I need an icon for my weather app, a sun behind a cloud", False, "image"),
    ("give me a wallpaper with purple mountains", False, "image"),
    ("draw two cats playing chess", False, "image"),
    ("render a futuristic car in a showroom", False, "image"),
    ("make a poster for a jazz concert", False, "image"),
    ("can you illustrate a children's book page with a bear in a forest", False, "image"),
    ("a red apple on a wooden table, studio lighting, 8k", False, "image"),
    ("what's the capital of Australia?", False, "chat"),
    ("how do I paint a wall without streaks?", False, "chat"),
    ("write a haiku about autumn", False, "chat"),
    ("explain the difference between TCP and UDP", False, "chat"),
    ("draw a flowchart of the login process", False, "chat"),
    ("who painted the Mona Lisa?", False, "chat"),
    ("let's draw up a plan for the migration", False, "chat"),
    ("give me tips for sketching faces", False, "chat"),
    ("summarise this article for me: the economy grew by 2 percent", False, "chat"),
    ("what colors go well with navy blue?", False, "chat"),
    ("describe this photo", False, "chat"),
    ("what breed is the dog in the picture?", IMG, "vision"),
    ("read the text on this sign", IMG, "vision"),
    ("is this mushroom edible?", IMG, "vision"),
    ("/draw a lighthouse", IMG, "image"),
    # German
    ("erstelle mir ein Bild von einem Segelboot bei Sonnenuntergang", False, "image"),
    ("zeichne eine Katze auf einem Sofa", False, "image"),
    ("male einen Wald im Nebel", False, "image"),
    ("kannst du mir ein Logo für meine Bäckerei machen?", False, "image"),
    ("generiere ein Foto von einem Hund am Strand", False, "image"),
    ("ich möchte ein Bild von einer Burg im Winter", False, "image"),
    ("wie spät ist es in Tokio?", False, "chat"),
    ("wie malt man Wolken mit Aquarell?", False, "chat"),
    ("schreib mir eine kurze E-Mail an meinen Chef", False, "chat"),
    ("erkläre mir Photosynthese", False, "chat"),
    ("zeichne ein Diagramm der Umsätze", False, "chat"),
    ("wer hat den Schrei gemalt?", False, "chat"),
    ("was siehst du auf dem Bild?", IMG, "vision"),
    ("welche Pflanze ist das?", IMG, "vision"),
    ("beschreibe das Bild genau", IMG, "vision"),
    ("/chat wie geht es dir?", IMG, "chat"),
]


def rules_accuracy(table: list[tuple[str, bool, str]]) -> tuple[float, list[str]]:
    wrong = []
    for text, has_image, expected in table:
        decision = route_message(text, has_image=has_image)
        got = decision.route if decision is not None else "chat"  # undecided, no model: chat
        if got != expected:
            wrong.append(f"  {text!r} (image attached: {has_image}): expected {expected}, got {got}")
    return 1 - len(wrong) / len(table), wrong


def test_the_rules_route_at_least_95_percent_of_the_labelled_messages() -> None:
    assert len(LABELLED) >= 60
    accuracy, wrong = rules_accuracy(LABELLED)
    print(f"\nrouter rules accuracy on the table they were written from: {accuracy:.1%} ({len(LABELLED)} messages)")
    if wrong:
        print("misrouted:\n" + "\n".join(wrong))
    assert accuracy >= 0.95, "\n".join(wrong)


def test_the_rules_generalise_to_messages_they_were_not_written_from() -> None:
    assert len(HELD_OUT) >= 40
    accuracy, wrong = rules_accuracy(HELD_OUT)
    print(f"\nrouter rules accuracy on held-out messages: {accuracy:.1%} ({len(HELD_OUT)} messages)")
    if wrong:
        print("misrouted:\n" + "\n".join(wrong))
    assert accuracy >= 0.85, "\n".join(wrong)


# ----------------------------------------------------------------------------
# Commands, attachments, hints
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, route, prompt",
    [
        ("/draw a lighthouse at dusk", "image", "a lighthouse at dusk"),
        ("/DRAW   a lighthouse", "image", "a lighthouse"),
        ("/image: neon street", "image", "neon street"),
        ("/Image\na fox", "image", "a fox"),
        ("/chat draw a cat", "chat", "draw a cat"),
        ("/describe what is it?", "chat", ""),  # no image: only the hint, nothing for a model to invent
    ],
)
def test_commands_are_case_insensitive_and_stripped_from_the_prompt(text: str, route: str, prompt: str) -> None:
    decision = route_message(text, has_image=False)
    assert decision is not None
    assert (decision.route, decision.prompt, decision.by) == (route, prompt, "command")


def test_a_command_needs_a_word_boundary() -> None:
    decision = route_message("/drawing tips please", has_image=False)
    assert decision is None or decision.by != "command"


@pytest.mark.parametrize("command", ["/draw", "/image", "/draw   ", "/draw <lora:pixel:0.7>"])
def test_draw_without_a_subject_asks_what_to_draw(command: str) -> None:
    decision = route_message(command, has_image=False)
    assert decision is not None
    assert decision.route == "chat" and decision.prompt == ""
    assert decision.hint is not None and "Say what to draw after /" in decision.hint


def test_an_attachment_goes_to_vision_unless_a_command_says_otherwise() -> None:
    assert route_message("what breed is this?", has_image=True) == RouteDecision(
        "vision", "an image is attached", "what breed is this?", None, "attachment"
    )
    drawing = route_message("/draw a castle", has_image=True)
    assert drawing is not None and drawing.route == "image" and drawing.prompt == "a castle"
    assert drawing.hint is not None and "not used" in drawing.hint
    chatting = route_message("/chat tell me a joke", has_image=True)
    assert chatting is not None and (chatting.route, chatting.prompt) == ("chat", "tell me a joke")
    describe = route_message("/describe", has_image=True)
    assert describe is not None and (describe.route, describe.prompt) == ("vision", "")


def test_a_drawing_request_with_an_attachment_goes_to_vision_with_a_hint() -> None:
    decision = route_message("draw a cat in this style", has_image=True)
    assert decision is not None and decision.route == "vision"
    assert decision.hint is not None and "/draw" in decision.hint


@pytest.mark.parametrize(
    "text",
    ["what's in this picture?", "Describe this image", "Was ist auf diesem Bild?", "/describe", "Beschreibe das Foto"],
)
def test_asking_about_an_image_that_is_not_attached_gets_a_hint(text: str) -> None:
    decision = route_message(text, has_image=False)
    assert decision is not None and decision.route == "chat"
    assert decision.hint == HINT_ATTACH


def test_asking_whether_it_can_draw_explains_how_to_ask() -> None:
    for text in ("Can you draw?", "kannst du auch zeichnen?", "could you make pictures?"):
        decision = route_message(text, has_image=False)
        assert decision is not None and decision.route == "chat", text
        assert decision.hint is not None and "draw" in decision.hint


def test_natural_requests_keep_the_whole_message_and_say_why() -> None:
    decision = route_message("  Please draw a lighthouse at dusk  ", has_image=False)
    assert decision == RouteDecision("image", "asked to draw", "Please draw a lighthouse at dusk", None, "rules")
    decision = route_message("Ich hätte gern ein Bild von einem Fuchs", has_image=False)
    assert decision is not None and (decision.route, decision.reason) == ("image", "asked for a picture")


def test_plain_chat_is_the_default_and_an_empty_message_gets_a_hint() -> None:
    decision = route_message("What is the capital of France?", has_image=False)
    assert decision == RouteDecision("chat", "no request to draw", "What is the capital of France?", None, "default")
    empty = route_message("   ", has_image=False)
    assert empty is not None and empty.route == "chat" and empty.prompt == "" and empty.hint


@pytest.mark.parametrize("text", ["I love painting landscapes", "Ich zeichne gern", "the drawing room was cold"])
def test_drawing_words_without_a_clear_request_are_undecided(text: str) -> None:
    assert route_message(text, has_image=False) is None


def test_an_undecided_message_without_a_resident_model_is_chat_with_a_hint() -> None:
    decision = decide_route("I love painting landscapes", has_image=False, model=NotLoaded())
    assert (decision.route, decision.by, decision.hint) == ("chat", "default", HINT_FORCE_DRAW)
    decision = decide_route("I love painting landscapes", has_image=False)
    assert (decision.route, decision.by) == ("chat", "default")


# ----------------------------------------------------------------------------
# The rule-based image prompt
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, prompt",
    [
        ("draw a lighthouse at dusk", "a lighthouse at dusk"),
        ("Could you please draw me a penguin on a surfboard?", "a penguin on a surfboard"),
        ("Hi! Can you paint a red barn, please?", "a red barn"),
        ("Generate an image of a futuristic city at night", "a futuristic city at night"),
        ("I'd like a photo of a golden retriever", "a photo of a golden retriever"),
        ("/draw a fox in the forest", "a fox in the forest"),
        ("Zeichne einen Leuchtturm in der Abenddämmerung", "einen Leuchtturm in der Abenddämmerung"),
        ("Kannst du mir bitte einen Hund mit Sonnenbrille zeichnen?", "einen Hund mit Sonnenbrille"),
        ("Draw a cat. Make it orange.", "a cat. Make it orange"),
        ("draw a cat <lora:pixel_style:0.8>", "a cat <lora:pixel_style:0.8>"),
        ("a castle", "a castle"),
    ],
)
def test_the_rules_strip_the_drawing_phrase(text: str, prompt: str) -> None:
    result = image_prompt_by_rules(text)
    assert result.prompt == prompt
    assert result.by == "rules" and result.negative_prompt == FALLBACK_NEGATIVE_PROMPT


def test_the_prompt_schema_is_bounded_so_the_json_closes_within_max_tokens() -> None:
    schema = image_prompt_schema(200)
    assert schema["properties"]["prompt"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 300,
    }  # CLIP reads about 300 characters
    assert schema["properties"]["negative_prompt"]["maxLength"] == 100
    assert image_prompt_schema(60)["properties"]["prompt"]["maxLength"] == 120


# ----------------------------------------------------------------------------
# With the real embedded SmolLM2
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> ChatService:
    absent = tmp_path_factory.mktemp("models") / "absent.gguf"  # falls back to the embedded model
    return ChatService(ModelManager(keep_alive_s=-1), ChatSettings(context_size=1024), absent)


class RecordingChat:
    """The real service; keeps each raw reply so the test can check that it parses by itself."""

    def __init__(self, chat: ChatService) -> None:
        self._chat = chat
        self.replies: list[str] = []

    def complete_if_idle(self, *args: object, **kwargs: object) -> str | None:
        reply = self._chat.complete_if_idle(*args, **kwargs)
        assert reply is not None, "the chat model should be loaded and idle here"
        self.replies.append(reply)
        return reply


def load(chat: ChatService) -> None:
    """Make the chat model resident, as a chat turn before a drawing request would."""
    chat.complete([{"role": "user", "content": "hi"}], chat.defaults.override(max_tokens=1))


WISHES = [
    "draw a lighthouse at dusk",
    "could you paint my cat as a pirate please",
    "make me a logo for a bakery called Sunny Buns",
    "generate a cyberpunk city street at night with neon signs",
    "I'd like a picture of an astronaut riding a horse on the moon",
    "sketch a cozy reading nook with a cat",
    "paint a stormy sea with a small sailing boat, oil painting",
    "a watercolor of a Japanese garden in spring",
    "draw a cute robot watering plants <lora:pixel_style:0.8>",
    "Illustrate a dragon sleeping on a pile of gold",
    "Zeichne einen Leuchtturm in der Abenddämmerung",
    "Mal mir einen Drachen über einer Burg",
    "Kannst du einen Hund mit Sonnenbrille zeichnen?",
    "Ich hätte gern ein Bild von einem roten Auto im Regen",
    "Erstelle ein Bild von einem Wald im Herbst",
    "Generiere ein Foto von einer Stadt bei Nacht",
    "Male ein Porträt einer alten Frau mit Hut",
    "Bild von einem Fuchs im Schnee",
    "Skizziere ein kleines Haus am See",
    "/draw ein Segelboot im Sturm, Ölgemälde",
]


def test_the_model_writes_parseable_image_prompts_every_time(chat: ChatService) -> None:
    load(chat)
    recording = RecordingChat(chat)
    results = [interpret_image_request(wish, recording, max_tokens=120) for wish in WISHES]
    assert len(recording.replies) == len(WISHES)
    for wish, reply, result in zip(WISHES, recording.replies, results, strict=True):
        answer = json.loads(reply)  # the grammar guarantees it
        assert isinstance(answer["prompt"], str) and answer["prompt"].strip(), (wish, reply)
        assert isinstance(answer["negative_prompt"], str)
        assert result.prompt.strip(), wish
    by_model = sum(r.by == "model" for r in results)
    print(f"\nimage prompts written by the model: {by_model}/{len(WISHES)} (the rest by rules)")
    for wish, result in zip(WISHES, results, strict=True):
        print(f"  {wish!r} -> {result.prompt!r} [{result.by}]")
    # The rule fallback makes every result usable; the model itself must still succeed most of the time.
    assert by_model >= MIN_MODEL_REWRITES, f"only {by_model}/{len(WISHES)} prompts were the model's own"
    lora = results[WISHES.index("draw a cute robot watering plants <lora:pixel_style:0.8>")]
    assert lora.prompt.endswith("<lora:pixel_style:0.8>") and lora.prompt.count("<lora:") == 1


def test_a_failing_model_falls_back_to_the_rules() -> None:
    result = interpret_image_request("please draw a red barn", Canned('{"prompt": "unterminated'))
    assert result.by == "rules" and result.prompt == "a red barn"


class Canned:
    """A chat model, loaded and idle, that answers every request with the same text."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def complete_if_idle(self, *args: object, **kwargs: object) -> str | None:
        return self.reply


class NotLoaded:
    """A chat model that is not resident: every auxiliary use is declined."""

    def complete_if_idle(self, *args: object, **kwargs: object) -> str | None:
        return None


def test_a_chat_model_that_is_not_loaded_leaves_the_prompt_to_the_rules() -> None:
    result = interpret_image_request("please draw a red barn", NotLoaded())
    assert (result.prompt, result.by) == ("a red barn", "rules")


def test_a_model_prompt_that_loses_an_english_subject_falls_back_to_the_rules() -> None:
    elsewhere = Canned(json.dumps({"prompt": "a beautiful woman in a red dress", "negative_prompt": "blurry"}))
    result = interpret_image_request("could you draw a lighthouse at dusk?", elsewhere)
    assert (result.prompt, result.by) == ("a lighthouse at dusk", "rules")
    # German is translated, so its words cannot be compared: the model's prompt is kept.
    result = interpret_image_request("Zeichne einen Leuchtturm", elsewhere)
    assert (result.prompt, result.negative_prompt, result.by) == ("a beautiful woman in a red dress", "blurry", "model")


def test_the_models_prompt_keeps_only_the_users_lora_tags() -> None:
    model = Canned(json.dumps({"prompt": "a lighthouse, dusk <lora:invented:1>", "negative_prompt": "text"}))
    result = interpret_image_request("draw a lighthouse <lora:pixel:0.5> <lora:film:1>", model)
    assert result.prompt == "a lighthouse, dusk <lora:pixel:0.5> <lora:film:1>"


def test_a_copy_of_the_worked_example_falls_back_to_the_rules() -> None:
    from assistant.routing import _IMAGE_PROMPT_EXAMPLES

    copy = Canned(json.dumps(_IMAGE_PROMPT_EXAMPLES[0][1]))
    result = interpret_image_request("Mal mir eine Katze mit Hut", copy)
    assert (result.prompt, result.by) == ("eine Katze mit Hut", "rules")


def test_nothing_to_draw_is_refused() -> None:
    class Unused:
        def complete_if_idle(self, *args: object, **kwargs: object) -> str:
            raise AssertionError("no model call for an empty wish")

    with pytest.raises(BadInputError, match="nothing to draw"):
        interpret_image_request("/draw <lora:pixel:0.5>", Unused())


def test_the_model_classifies_undecided_messages(chat: ChatService) -> None:
    load(chat)
    for text in ("I love painting landscapes", "Ich zeichne gern", "sunset over the mountains, oil painting"):
        decision = classify_with_model(text, chat)
        assert decision is not None, "the model is loaded and idle: it must be asked"
        assert decision.route in ("chat", "image"), text
        assert decision.by == "model" and decision.reason and decision.prompt == text


def test_classification_is_only_asked_of_a_resident_chat_model(chat: ChatService) -> None:
    manager = chat._manager
    manager.unload_all()
    decision = decide_route("I love painting landscapes", model=chat)
    assert decision.by == "default" and manager.status().resident == ()  # nothing was loaded to classify
    assert classify_with_model("I love painting landscapes", chat) is None
    load(chat)
    loads = manager.status().load_counts
    decision = decide_route("I love painting landscapes", model=chat)
    assert decision.by == "model"
    assert manager.status().load_counts == loads  # asking the resident model loaded nothing


def test_a_failing_classification_answers_chat() -> None:
    decision = classify_with_model("I love painting", Canned("not json"))
    assert decision is not None and (decision.route, decision.by) == ("chat", "default")
