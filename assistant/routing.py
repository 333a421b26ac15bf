"""Decide who answers a chat message: the chat model, the vision model or the image generator.

Cheapest first:

1. The attachment and explicit commands. ``/draw`` and ``/image`` make a picture, ``/describe``
   asks the vision model about the attached image, ``/chat`` forces a plain reply. Otherwise an
   attached image goes to the vision model.
2. Rules: a few regular expressions for requests to draw, in English and German, and for the
   messages that look like them but are not (questions about drawing, "draw conclusions",
   "paint me a picture ... with words", diagrams and code, questions about an image that is not
   attached). Each message is cut into sentences; a request to draw in one of them wins. Only the
   start and the end of a long message are read (``MAX_ROUTED_CHARS``), in time linear in their length.
3. Only when the rules are undecided (drawing words, but no clear request) and the chat model is
   loaded and idle: the chat model itself, asked for grammar-constrained JSON. It is borrowed
   atomically (``complete_if_idle``): never a model swap or a wait just to classify; without it
   an undecided message is answered as chat, with a hint to /draw.

Judgement calls, made on purpose:
- "paint me a picture of your weekend with words" is chat: "with words" / "in words" marks a
  figure of speech. "paint me a picture of a cat" (no such marker) is a picture.
- A question about drawing ("how do I draw a cat?", "wie zeichnet man einen Hund?") is chat;
  a polite request ("could you draw a cat?", "kannst du einen Hund zeichnen?") is a picture.
- Diagrams, charts, tables, ASCII art and drawing "in Python" are text work for the chat model.
- "Can you draw?" asks about an ability: chat, with a hint on how to ask for a picture.

``interpret_image_request`` then lets the chat model, when it is loaded and idle, turn a casual
wish (any language) into an English Stable Diffusion prompt and a negative prompt; otherwise, or
when the model fails, the rules strip the wish down to its subject.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from errors import AppError, BadInputError
from text_generation.grammar import json_grammar
from text_generation.stream import GenerationParams, Message

log = logging.getLogger(__name__)

Route = Literal["chat", "vision", "image"]
DecidedBy = Literal["attachment", "command", "rules", "model", "default"]
Language = Literal["en", "de"] | None  # of the words that asked to draw, when a rule knows

HINT_ATTACH = "Attach an image to ask about it."
HINT_FORCE_DRAW = "To make a picture instead, start the message with /draw."
HINT_IMAGE_TO_VISION = "The attached image goes to the vision model; start with /draw to make a new picture instead."
HINT_IMAGE_UNUSED = "The attached image is not used with /{command}."
HINT_SAY_WHAT = "Say what to draw after /{command}, e.g. /{command} a lighthouse at dusk."
HINT_ASK_FOR_PICTURE = "Say what to draw, e.g. 'draw a lighthouse at dusk' or /draw a lighthouse at dusk."
HINT_EMPTY = "Type a message to send."

FALLBACK_NEGATIVE_PROMPT = "blurry, low quality, deformed, watermark, text"
MAX_WISH_CHARS = 600  # what the chat model reads of a wish: a prompt, not an essay
MAX_CLASSIFY_CHARS = 600
# The rules read at most this many characters at each end of a message, and judge at most
# MAX_SUBJECT_CLAUSES sentences (and the last) when they look for what to draw. A request to draw is
# a sentence or two at the start or the end; the rest of a long message cannot change where it goes,
# and reading all of it would let its length decide how long the server is busy.
MAX_ROUTED_CHARS = 2_000
MAX_SUBJECT_CLAUSES = 8


@dataclass(frozen=True)
class RouteDecision:
    route: Route
    reason: str  # short and human: "asked to draw", "an image is attached", "command /draw"
    prompt: str  # the message, a command prefix stripped; empty with a hint: show the hint, answer nothing
    hint: str | None = None  # something to tell the user, e.g. "Attach an image to ask about it."
    by: DecidedBy = "rules"


class IdleTextModel(Protocol):
    """A text model used only when it is already loaded and idle (``ChatService`` is one)."""

    def complete_if_idle(
        self, messages: Sequence[Message], params: GenerationParams, *, grammar: str | None = None
    ) -> str | None: ...


@dataclass(frozen=True)
class ImagePrompt:
    prompt: str  # English Stable Diffusion prompt, the user's <lora:...> tags kept at the end
    negative_prompt: str
    by: Literal["model", "rules"]


# ----------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------

_FLAGS = re.IGNORECASE | re.VERBOSE

# Every pattern here runs on user text, so each must take time linear in it. The per-sentence patterns
# see one sentence of at most 2 * MAX_ROUTED_CHARS characters with each whitespace run made one space
# (``_clause_text``); their repetitions are anchored, or start at a literal word, and can only give back
# characters within one word or one run of separators; the lazy gaps are bounded (``.{0,200}?``). The
# patterns that see the whole message (``_COMMAND``, ``_LORA_TAG``) are anchored or start at a literal.

# /draw, /image, /describe, /chat at the very start; "/drawing" is not a command.
_COMMAND = re.compile(r"^\s*/(draw|image|describe|chat)(?![\w-])[\s:]*(.*)$", re.IGNORECASE | re.DOTALL)

# AUTOMATIC1111 LoRA tags: only the image generator reads them.
_LORA_TAG = re.compile(r"<lora:[^<>]*>", re.IGNORECASE)

# Sentences: a request to draw may follow a greeting or come before a detail ("Hi! Draw a cat. Make it orange.").
# A run of whitespace ends a sentence after . ! ? ; or when it holds a line break. Found by one scan of the
# runs (``_sentences``), not by splitting on a pattern like ``\s*\n+\s*``, whose time grows with the
# square of a long run of whitespace.
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_STOPS = frozenset(".!?;")

# What may open a request without changing it: greetings, fillers, "please", "can you", "kannst du mir".
# ``en``/``de`` tell that a polite modal was used (German puts the verb at the end: "kannst du ... zeichnen?").
_OPENING = re.compile(
    r"""^(?:(?:hi|hello|hey|yo|ok|okay|so|now|and|then|also|alright|well|great|thanks|
              hallo|servus|moin|jetzt|nun|und|dann|na|danke|super|bitte|please|pls|plz|kindly)\b[\s,!.:]*)*
    (?:
        (?P<en>(?:(?:can|could|would|will)\s+you
               |(?:i['’]?d|i\s+would|i)\s+(?:like|love|want|need)\s+you\s+to
               |(?:is\s+it\s+possible|are\s+you\s+able)\s+(?:for\s+you\s+)?to
               |go\s+ahead\s+and|try\s+to|let['’]?s|let\s+us)
               (?:\s+(?:please|kindly|maybe|possibly|also|just|quickly|now))*)\s+
      | (?P<de>(?:(?:kannst|könntest|würdest|magst|willst|kannste)\s+du|(?:können|könnten|würden)\s+sie)
               (?:\s+(?:bitte|mal|mir|uns|vielleicht|noch|auch|eben|schnell|doch|dann))*)\s+
    )?
    (?:(?:please|pls|bitte)\s+)?""",
    _FLAGS,
)

# "can you draw?", "kannst du zeichnen?", "please draw.": nothing to draw (yet).
_ABILITY = re.compile(
    r"""^(?:draw|paint|sketch|(?:make|generate|create|do)\s+(?:images|pictures|drawings|art)
         |zeichnen|malen|bilder\s+(?:erstellen|generieren|erzeugen|machen|malen|zeichnen))\s*[?!.]*$""",
    _FLAGS,
)

# A question or a text task at the start of the sentence: about drawing, not a request to draw.
_QUESTION_OR_TASK = re.compile(
    r"""^(?:how|what|what['’]s|whats|why|when|where|who|whose|which|is|are|was|were|am|does|did|should|shall|has|have
         |do\s+(?:you|i|we|they|people|artists|painters|one)
         |(?:can|could|should|may|might|must)\s+(?:i|we|one|people)\b(?!\s+(?:get|have|see)\b)
         |explain|describe|define|tell\s+me|teach\s+me|show\s+me\s+how|help\s+me\s+understand|compare
         |summari[sz]e|list|write|translate|give\s+me\s+(?:tips|advice|ideas|feedback|some\s+tips)
         # German
         |wie|was|warum|wieso|weshalb|wozu|wann|wo|woher|wohin|womit|wer|wen|wem|wessen|welche[rsnm]?
         |ist|sind|war|waren|gibt\s+es|hast|hat|habe|haben
         |erklär(?:e|en)?|beschreib(?:e|en)?|definier(?:e|en)?|erzähl(?:e|en)?|sag(?:e|en)?\s+mir
         |zeig(?:e)?\s+mir,?\s+wie|schreib(?:e|en)?|übersetz(?:e|en)?|fass(?:e)?|vergleich(?:e|en)?|nenn(?:e|en)?|liste
    )\b""",
    _FLAGS,
)

# "how to" anywhere, learning and tips: the user wants to know, not to get a picture.
_HOW_TO = re.compile(
    r"""\b(?:how\s+(?:to|do|does|can|could|should|would|is|are|i|you|one|people)
         |learn(?:ing)?\s+(?:to|how)|tutorials?|lessons?\s+(?:on|in|about|for)|tips\s+(?:for|on|to|about)
         |wie\s+(?:man|ich|kann|könnte|sollte|\w+\s+man)|lernen|anleitung|tipps\s+(?:für|zum|zur|zu))\b""",
    _FLAGS,
)

# Figures of speech that use drawing words.
_FIGURE_OF_SPEECH = re.compile(
    r"""\bdraw(?:s|ing|n)?\s+(?:(?:a|the|any|some|your|my|our|their|no)\s+)?
           (?:conclusions?|inferences?|parallels?|comparisons?|distinctions?|attention|lessons?|breath|blood|lots
           |straws?|cards?|blanks?|inspiration|strength|support|criticism|fire|interest|near|closer|money|funds
           |water|power|salary|crowds?|the\s+line|a\s+line\s+(?:between|under)
           |up\s+(?:a|an|the)\s+(?:plan|contract|list|agreement|document|schedule|budget|proposal))\b
      | \bpaint\w*\b.{0,200}?\b(?:with|in|using)\s+words\b
      | \bpaint\s+(?:a|an)\s+(?:vivid|clear|bleak|rosy|grim|broad|accurate|different|realistic|full)\s+picture\b
      | \bpicture\s+(?:this|yourself|that)\b
      | \bsketch\s+out\b
      | \bsketch\s+(?:a|an|the|my|your)\s+(?:plan|idea|outline|proposal|strategy|roadmap|approach|solution|draft)\b
      | \billustrate\s+(?:(?:the|this|that|my|your|a|an)\s+)?(?:point|concept|idea|difference|principle|argument
           |example|problem|how|why|what)\b
      | \billustrate\b.{0,200}?\bwith\s+(?:an?\s+)?examples?\b
      | \b(?:mit|in)\s+worten\b""",
    _FLAGS,
)

# What a drawing verb may ask for that the image model cannot make: diagrams, code, tables, container images.
_NOT_A_PICTURE_JOB = re.compile(
    r"""\b(?:(?:flow\s*|pie\s+|bar\s+|org\s*)?charts?|diagrams?|graphs?|plots?|tables?|uml|mind\s*maps?
         |ascii(?:\s+art)?|svg|tikz|mermaid|graphviz|histograms?|spreadsheets?|wireframes?|circuits?
         |(?:in|using|with)\s+(?:python|javascript|js|css|html|svg|tikz|latex|mermaid|graphviz|turtle|matplotlib
             |ascii|unicode|emojis?|code|excel|canvas|opengl|pygame|tkinter|react|pytorch|tensorflow|opencv|java|rust)
         |(?:docker|container|disk|iso|vm|system|boot|base|os|cloud)[-\s]?images?
         |render\w*\s+(?:(?:the|this|that|my|a|an)\s+)?(?:[\w.-]+\s+)?(?:html|markdown|latex|templates?|pages?|components?|views?
             |json|text|equations?|formulas?|videos?|frames?|output|lists?)
         |\w*diagramm\w*|tabellen?|graphen|funktionsgraph\w*|schaubild\w*|kurven?|mindmaps?|organigramm\w*)\b""",
    _FLAGS,
)

# Questions about an image that is not there: "what's in this picture?", "was ist auf diesem Bild?".
_REFERS_TO_AN_IMAGE = re.compile(
    r"""\b(?:this|that|the|my|attached|above|following|uploaded|these)\s+(?:attached\s+|uploaded\s+|following\s+)?
           (?:image|picture|photo|photograph|pic|screenshot|scan|meme)s?\b
      | \b(?:diese[msnr]?|das|dem|den|im|mein(?:em|en|e)?|angehängte[nms]?|obige[nms]?|hochgeladene[nms]?)\s+
           (?:angehängte[nms]?\s+|hochgeladene[nms]?\s+)?(?:bild|foto|photo|screenshot|bildschirmfoto|scan)(?:e|s|es|er|ern)?\b""",
    _FLAGS,
)

# Building blocks of the requests below.
_EN_COUNT = r"(?:a|an|some|one|two|three|four|\d+|another|a\s+few|a\s+new|a\s+couple\s+of)"
_EN_ADJECTIVE = (  # a word before the noun, not a determiner ("make the picture brighter" edits, it does not ask)
    r"(?:(?!(?:of|that|which|to|for|about|from|in|on|with|and|or|how|what|the|this|these|those|my|your|our|his|her"
    r"|their|its|it)\b)[\w'’-]+\s+)"
)
_EN_NOUN = (
    r"(?:image|picture|pic|photo|photograph|drawing|painting|illustration|wallpaper|logo|icon|portrait|poster"
    r"|sketch|artwork|rendering|render|avatar|banner|sticker|cartoon|comic|watercolou?r|selfie|headshot|emblem"
    r"|mascot|thumbnail|postcard|(?:pixel|digital|concept|fan|line|clip|cover)\s*art|(?:album|book)\s+cover)(?:s|es)?\b"
    # "image caption", "picture book", "picture-perfect": compounds that are not pictures to make
    r"(?!-)(?!\s+(?:captions?|descriptions?|books?|frames?|files?|formats?|sizes?|quality|processing|recognition"
    r"|classifiers?|classification|generation|generator|models?|prompts?|editor|viewer|gallery|urls?|links?|tags?|alt"
    r"|dataset|upload|pipeline|api|loader|converter|search)\b)"
)
_DE_COUNT = r"(?:ein|eine|einen|einem|ein\s+paar|zwei|drei|vier|\d+|mehrere|einige|noch\s+ein(?:e|en)?)"
_DE_ADJECTIVE = (
    r"(?:(?!(?:von|vom|mit|für|über|in|im|auf|aus|der|die|das|dem|den|und|oder|zu|zum|zur|dass|wie|was|ist|sind"
    r"|dies\w*|mein\w*|dein\w*|unser\w*|euer\w*|ihr\w*|sein\w*)\b)"
    r"[\w'’-]+\s+)"
)
_DE_NOUN = (  # also compounds: Katzenbild, Hintergrundbild, Ölgemälde; not Vorbild, Weltbild
    r"\b(?!(?:vor|leit|welt|krankheits|berufs|menschen|selbst|feind|sinn|spiegel|erscheinungs|stadt|ab|eben|zerr"
    r"|schrift|trug|ideal|wunsch)bild)"
    r"\w*(?:bild|foto|photo|fotografie|zeichnung|gemälde|porträt|portrait|grafik|illustration|skizze|aquarell|logo"
    r"|icon|poster|plakat|wallpaper|avatar|comic|cartoon|sticker|banner|kunstwerk|motiv)(?:er|ern|e|s|es|n|en)?\b"
)

# Requests to draw, each capturing the subject: what the picture should show.
_IMAGE_REQUESTS: tuple[tuple[re.Pattern[str], str, Language], ...] = (
    # "draw (me) a lighthouse", "paint a watercolor of ...", "sketch a cabin"
    (
        re.compile(
            r"^(?:draw|paint|sketch|doodle|illustrate|render|depict|photograph)\s+(?:(?:me|us)\s+|for\s+(?:me|us)\s+)?"
            r"(?P<subject>\S.*)$",
            re.IGNORECASE,
        ),
        "asked to draw",
        "en",
    ),
    # "generate an image of ...", "make me a logo for ...", "show me a picture of ..."
    (
        re.compile(
            r"^(?:generate|create|make|produce|design|craft|whip\s+up|give|get|show|send|do|draw|paint|render)\s+"
            rf"(?:(?:me|us)\s+)?(?P<subject>(?:{_EN_COUNT}\s+)?{_EN_ADJECTIVE}{{0,3}}{_EN_NOUN}.*)$",
            re.IGNORECASE,
        ),
        "asked for a picture",
        "en",
    ),
    # "I'd like a picture of ...", "I want an oil painting of ...", "can I get a logo ..."
    (
        re.compile(
            r"^(?:(?:i['’]?d|i\s+would)\s+(?:like|love)|i\s+(?:want|need)|i['’]?m\s+looking\s+for"
            r"|(?:can|could|may)\s+i\s+(?:get|have|see)|let\s+me\s+see)\s+(?:to\s+(?:see|have|get)\s+)?"
            rf"(?P<subject>{_EN_COUNT}\s+{_EN_ADJECTIVE}{{0,3}}{_EN_NOUN}.*)$",
            re.IGNORECASE,
        ),
        "asked for a picture",
        "en",
    ),
    # "zeichne einen Leuchtturm", "male mir ...", "mal mir ..." ("male"/"mal" only before a German word:
    # "male nurses" and "mal sehen" are not requests)
    (
        re.compile(
            r"^(?:(?:zeichne|zeichnet|zeichnen\s+sie|skizziere|skizzieren\s+sie|illustriere|illustrieren\s+sie|rendere"
            r"|fotografiere)\b"
            r"|(?:male|malt|malen\s+sie)(?=\s+(?:mir|uns|bitte|doch|mal|ein|eine|einen|einem|einer|den|die|das|dem"
            r"|zwei|drei|\d|etwas)\b)|mal(?=\s+(?:mir|uns)\b))"
            r"\s+(?:(?:mir|uns|bitte|doch|mal)\s+)*(?P<subject>\S.*)$",
            re.IGNORECASE,
        ),
        "asked to draw",
        "de",
    ),
    # "erstelle ein Bild von ...", "mach mir ein Logo ...", "zeig mir ein Foto von ..."
    (
        re.compile(
            r"^(?:erstell(?:e|en\s+sie)?|erzeug(?:e|en\s+sie)?|generier(?:e|en\s+sie)?|mach(?:e|en\s+sie)?|gestalte"
            r"|entwirf|entwerfe|designe|gib|zeig(?:e)?|schick(?:e)?)\s+(?:(?:mir|uns|bitte|mal|doch)\s+)*"
            rf"(?P<subject>(?:{_DE_COUNT}\s+)?{_DE_ADJECTIVE}{{0,3}}{_DE_NOUN}.*)$",
            re.IGNORECASE,
        ),
        "asked for a picture",
        "de",
    ),
    # "ich hätte gern ein Bild von ...", "ich möchte ein Ölgemälde ...", "kann ich ein Foto ... haben?"
    (
        re.compile(
            r"^(?:(?:ich\s+)?hätte\s+gerne?|ich\s+(?:möchte|will|brauche|bräuchte|wünsche\s+mir|würde\s+gerne?)"
            r"(?:\s+gerne?)?|(?:kann|könnte|darf)\s+ich)\s+(?:(?:bitte|mal|noch)\s+)*"
            rf"(?P<subject>{_DE_COUNT}\s+{_DE_ADJECTIVE}{{0,3}}{_DE_NOUN}.*)$",
            re.IGNORECASE,
        ),
        "asked for a picture",
        "de",
    ),
)

# Only after "kannst du" / "könnten Sie": the verb comes last ("kannst du mir einen Hund zeichnen?").
# The subject ends in a non-space (``.*?\S``): with ``.+?`` the ``\s+`` after it was tried from every
# position inside a whitespace run, time growing with the square of the run.
_DE_VERB_LAST = re.compile(
    r"""^(?P<subject>.*?\S)(?<!\bzu)\s+(?:zeichnen|malen|skizzieren|illustrieren|rendern
         |(?P<generic>generieren|erstellen|erzeugen|machen|entwerfen|gestalten|zeigen|schicken|geben))
        (?:\s+(?:bitte|lassen))?\s*[?!.]*$""",
    _FLAGS,
)
_DE_NOUN_ANYWHERE = re.compile(_DE_NOUN, re.IGNORECASE)

# A bare noun phrase, the way image prompts are written: "a photo of a golden retriever", "Bild von einem Fuchs".
_NOUN_PHRASES: tuple[tuple[re.Pattern[str], Language], ...] = (
    (
        re.compile(
            rf"^(?P<subject>(?:{_EN_COUNT}\s+)?{_EN_ADJECTIVE}{{0,3}}{_EN_NOUN}\s+"
            r"(?:of|showing|with|depicting|featuring|for|in\s+the\s+style\s+of|where|in\s+which)\b.+)$",
            re.IGNORECASE,
        ),
        "en",
    ),
    (
        re.compile(
            rf"^(?P<subject>(?:{_DE_COUNT}\s+)?{_DE_ADJECTIVE}{{0,2}}{_DE_NOUN},?\s+"
            r"(?:von|vom|mit|eines|einer|zum|zur|für|im\s+stil|auf\s+d(?:em|er)|in\s+d(?:em|er)|wo)\b.+)$",
            re.IGNORECASE,
        ),
        "de",
    ),
)

# Written like an image prompt: "a lighthouse on a cliff, oil painting", "Burg im Nebel, Aquarell, fotorealistisch".
_STYLE_KEYWORDS = re.compile(
    r""",\s*(?:oil\s+painting|watercolou?r|digital\s+(?:art|painting)|concept\s+art|pixel\s+art|line\s+art
         |anime\s+style|photorealistic|hyperrealistic|highly\s+detailed|trending\s+on\s+artstation|unreal\s+engine
         |octane\s+render|cinematic\s+lighting|studio\s+lighting|volumetric\s+lighting|bokeh|8k\s+uhd|masterpiece
         |ölgemälde|aquarell|digitale\s+kunst|fotorealistisch|detailreich)\b""",
    _FLAGS,
)

# Drawing words with no clear rule: undecided, the model may judge.
_DRAWING_WORDS = re.compile(
    r"""\b(?:draw\w*|drew|paint\w*|sketch\w*|illustrat\w*|render\w*|doodl\w*|depict\w*|images?|pictures?|pics?
         |photos?|photograph\w*|artwork|wallpapers?|logos?|imagine|visuali[sz]e
         |stell\s+dir\b.{0,200}?\bvor|fotografiere
         |zeichn\w*|gezeichnet|male|malen|malst|gemalt|bild|bilder|bildern|fotos?|gemälde|skizz\w*|aquarell\w*)\b""",
    _FLAGS,
)

# Trimmed off the end of a subject for the rule-based prompt: "please", "for me", "bitte", the question mark,
# with the commas and spaces between them. Searched for from the front, such a pattern
# (``(?:[\s,]*(?:please|...)\b|[\s,]*[?!.;:]+)+\s*$``) restarted at every comma and space, and its
# repeated punctuation inside a repeated group took exponential time on "a cat??????????????????????x".
# So it is matched once, anchored, on the reversed subject: the words are spelled backwards, and the
# word boundary that followed a word in the subject comes before it.
_TAIL_WORDS = ("please", "pls", "for me", "thanks", "thank you", "bitte", "für mich", "danke")
_SUBJECT_TAIL_REVERSED = re.compile(
    r"\A\s*(?:(?:[?!.;:]|\b(?:"
    + "|".join(r"\s+".join(re.escape(word[::-1]) for word in reversed(words.split())) for words in _TAIL_WORDS)
    + r"))[\s,]*)+",
    re.IGNORECASE,
)
_SUBJECT_HEAD = re.compile(
    r"""^(?:(?:an?|one|some)\s+)?(?:image|picture|pic|drawing)s?\s+(?:of|showing|depicting)\s+
      | ^(?:(?:ein|eine)\s+)?(?:bild|bilder)\s+(?:von|mit)\s+""",
    _FLAGS,
)


@dataclass(frozen=True)
class _Verdict:
    route: Literal["chat", "image"] | None  # None: drawing words, no clear rule
    reason: str
    hint: str | None = None
    subject: str = ""  # what to draw, for an image verdict
    language: Language = None


def _sentences(text: str, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence of ``text[start:stop]``, without the whitespace around it.

    A run of whitespace ends a sentence after . ! ? ; or when it holds a line break. One pass over
    the runs: linear in the length, however long a run is.
    """
    stop = len(text) if stop is None else stop
    spans: list[tuple[int, int]] = []
    begin = start
    for run in _WHITESPACE.finditer(text, start, stop):
        run_start, run_end = run.span()
        if run_start == start:  # whitespace before the first sentence
            begin = run_end
        elif text[run_start - 1] in _SENTENCE_STOPS or text.find("\n", run_start, run_end) >= 0:
            spans.append((begin, run_start))
            begin = run_end
    if begin < stop:
        spans.append((begin, begin + len(text[begin:stop].rstrip())))  # a trailing run ends no sentence
    return [(a, b) for a, b in spans if b > a]


def _window_sentences(text: str) -> list[tuple[int, int]]:
    """The sentences of a message the rules may read: all of a short message; of a long one, those in
    its first MAX_ROUTED_CHARS characters and the last in its last MAX_ROUTED_CHARS (cut at those bounds)."""
    if len(text) <= 2 * MAX_ROUTED_CHARS:
        return _sentences(text)
    tail = _sentences(text, len(text) - MAX_ROUTED_CHARS)
    return _sentences(text, 0, MAX_ROUTED_CHARS) + tail[-1:]


def _clause_text(text: str, span: tuple[int, int]) -> str:
    """A sentence as the rules read it: every run of whitespace one space, so that no pattern meets a long run."""
    return " ".join(text[span[0] : span[1]].split())


def _clauses(text: str) -> list[str]:
    """The sentences worth judging: all of a short message, the first and last of a long one."""
    spans = _window_sentences(text)
    if len(spans) > 3 or (len(text) > 2 * MAX_ROUTED_CHARS and len(spans) > 1):
        spans = [spans[0], spans[-1]]
    return [_clause_text(text, span) for span in spans]


def _judge_clause(clause: str) -> _Verdict | None:
    """One sentence: a request to draw, a chat message with a reason, undecided, or None (nothing to say)."""
    opening = _OPENING.match(clause)
    rest = clause[opening.end() :] if opening else clause
    if _ABILITY.match(rest):
        return _Verdict("chat", "no subject to draw", HINT_ASK_FOR_PICTURE)
    if _QUESTION_OR_TASK.match(rest) or _HOW_TO.search(rest):
        if _REFERS_TO_AN_IMAGE.search(rest):
            return _Verdict("chat", "asks about an image that is not attached", HINT_ATTACH)
        if _DRAWING_WORDS.search(rest):
            return _Verdict("chat", "a question about drawing")
        return None
    if _FIGURE_OF_SPEECH.search(rest):
        return _Verdict("chat", "a figure of speech, not a request to draw")
    request = _image_request(rest, german_modal=bool(opening and opening.group("de")), question=clause.endswith("?"))
    if request is not None:
        reason, subject, language = request
        if _NOT_A_PICTURE_JOB.search(rest):
            return _Verdict("chat", "asks for a diagram, table or code: text work", HINT_FORCE_DRAW)
        return _Verdict("image", reason, subject=subject, language=language)
    if _REFERS_TO_AN_IMAGE.search(rest):
        return _Verdict("chat", "refers to an image that is not attached", HINT_ATTACH)
    if _DRAWING_WORDS.search(rest):
        return _Verdict(None, "mentions drawing, but not clearly a request")
    return None


def _image_request(rest: str, *, german_modal: bool, question: bool) -> tuple[str, str, Language] | None:
    """(reason, subject, language) when the sentence (its opening removed) asks for a picture."""
    for pattern, reason, language in _IMAGE_REQUESTS:
        match = pattern.match(rest)
        if match:
            return reason, match.group("subject"), language
    if german_modal:
        match = _DE_VERB_LAST.match(rest)
        if match and (not match.group("generic") or _DE_NOUN_ANYWHERE.search(match.group("subject"))):
            return "asked to draw", match.group("subject"), "de"
    if not question:  # "Fotos von meinem Urlaub sind weg, was tun?" is not a prompt
        for pattern, language in _NOUN_PHRASES:
            match = pattern.match(rest)
            if match:
                return "asked for a picture", match.group("subject"), language
        if _STYLE_KEYWORDS.search(rest):
            return "written like an image prompt", rest, None
    return None


def _split_command(text: str) -> tuple[str | None, str]:
    match = _COMMAND.match(text)
    if not match:
        return None, text.strip()
    return match.group(1).lower(), match.group(2).strip()


def route_message(text: str, *, has_image: bool = False) -> RouteDecision | None:
    """Where a chat message should go, by the attachment, commands and rules; None when undecided.

    Pure and fast: no model is touched. ``prompt`` is the message with a command prefix
    stripped; an empty prompt comes with a hint and means "show the hint, answer nothing".
    """
    command, rest = _split_command(text)
    if command in ("draw", "image"):
        if not _LORA_TAG.sub("", rest).strip():
            return RouteDecision(
                "chat", f"/{command} without a subject", "", HINT_SAY_WHAT.format(command=command), "command"
            )
        unused = HINT_IMAGE_UNUSED.format(command=command) if has_image else None
        return RouteDecision("image", f"command /{command}", rest, unused, "command")
    if command == "chat":
        if not rest:
            return RouteDecision("chat", "/chat without a message", "", HINT_EMPTY, "command")
        unused = HINT_IMAGE_UNUSED.format(command=command) if has_image else None
        return RouteDecision("chat", "command /chat", rest, unused, "command")
    if command == "describe":
        if has_image:
            return RouteDecision("vision", "command /describe", rest, None, "command")
        # Nothing to look at: only the hint. A chat model asked about a missing picture invents one.
        return RouteDecision("chat", "/describe without an image", "", HINT_ATTACH, "command")
    if has_image:
        drawing = _rules(rest)
        hint = HINT_IMAGE_TO_VISION if drawing is not None and drawing.route == "image" else None
        return RouteDecision("vision", "an image is attached", rest, hint, "attachment")
    if not rest:
        return RouteDecision("chat", "empty message", "", HINT_EMPTY, "default")
    return _rules(rest)


def _rules(text: str) -> RouteDecision | None:
    if _LORA_TAG.search(text):
        return RouteDecision("image", "has a LoRA tag", text, None, "rules")
    if "```" in text:
        return RouteDecision("chat", "contains code", text, None, "rules")
    verdicts = [v for v in map(_judge_clause, _clauses(text)) if v is not None]
    chosen = (
        next((v for v in verdicts if v.route == "image"), None)
        or next((v for v in verdicts if v.route == "chat" and v.hint), None)
        or next((v for v in verdicts if v.route == "chat"), None)
    )
    if chosen is not None and chosen.route is not None:
        return RouteDecision(chosen.route, chosen.reason, text, chosen.hint, "rules")
    if verdicts:
        return None
    return RouteDecision("chat", "no request to draw", text, None, "default")


# ----------------------------------------------------------------------------
# Asking the chat model when the rules are undecided
# ----------------------------------------------------------------------------

_ROUTE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "route": {"type": "string", "enum": ["chat", "image"]},
        "reason": {"type": "string", "maxLength": 60},
    },
    "required": ["route", "reason"],
    "additionalProperties": False,
}
_CLASSIFY_PARAMS = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=96, seed=0, repeat_penalty=1.0)
_CLASSIFY_SYSTEM = (
    "You sort messages for an assistant that can chat and can also generate pictures. "
    'Answer "image" only when the user asks you to create, draw, paint or generate a picture. '
    'Answer "chat" for everything else: questions (also questions about drawing, art or images), '
    "explanations, writing, code, diagrams. Give a short reason. Reply with JSON only.\n"
    'Examples: "draw a red fox in the snow" -> image; "how do I draw a fox?" -> chat; '
    '"a castle on a hill, oil painting" -> image; "I painted my room blue yesterday" -> chat.'
)


def classify_with_model(text: str, model: IdleTextModel) -> RouteDecision | None:
    """Ask the chat model whether ``text`` wants a picture, as grammar-constrained JSON.

    None when the model is not loaded and idle: classifying must never cost a swap or a wait.
    A model that fails answers "chat", by "default".
    """
    prompt = text.strip()
    messages: list[Message] = [
        {"role": "system", "content": _CLASSIFY_SYSTEM},
        {"role": "user", "content": prompt[:MAX_CLASSIFY_CHARS]},
    ]
    try:
        reply = model.complete_if_idle(messages, _CLASSIFY_PARAMS, grammar=json_grammar(_ROUTE_SCHEMA))
        if reply is None:
            return None
        answer = json.loads(reply)
        route, reason = answer["route"], " ".join(str(answer["reason"]).split())
    except (AppError, ValueError, KeyError, TypeError, RuntimeError) as error:
        log.warning("the chat model could not classify the message (%s); answering as chat", error)
        return RouteDecision("chat", "not clearly a drawing request", prompt, HINT_FORCE_DRAW, "default")
    if route not in ("chat", "image"):
        return RouteDecision("chat", "not clearly a drawing request", prompt, HINT_FORCE_DRAW, "default")
    hint = HINT_FORCE_DRAW if route == "chat" else None
    return RouteDecision(route, reason or f"the chat model chose {route}", prompt, hint, "model")


def decide_route(text: str, *, has_image: bool = False, model: IdleTextModel | None = None) -> RouteDecision:
    """The front ends' one call: rules first; when undecided, the chat model if it is loaded and idle; else chat."""
    decision = route_message(text, has_image=has_image)
    if decision is not None:
        return decision
    if model is not None:
        decision = classify_with_model(text, model)
        if decision is not None:
            return decision
    return RouteDecision("chat", "not clearly a drawing request", text.strip(), HINT_FORCE_DRAW, "default")


# ----------------------------------------------------------------------------
# From a casual wish to a Stable Diffusion prompt
# ----------------------------------------------------------------------------

_IMAGE_PROMPT_SYSTEM = (
    "You write prompts for the Stable Diffusion image generator. Rewrite the user's request, in any "
    "language, as one English image prompt: the subject first, then setting, style, lighting and quality "
    "keywords, comma-separated. Keep names and details the user gave. Then a short negative prompt: "
    "things to avoid in the picture. Reply with JSON only."
)
_IMAGE_PROMPT_EXAMPLES: tuple[tuple[str, dict[str, str]], ...] = (
    (
        "please draw me a red fox sleeping in the snow",
        {
            "prompt": "a red fox sleeping in fresh snow, winter forest, soft morning light, detailed fur, "
            "nature photography, sharp focus",
            "negative_prompt": "blurry, low quality, deformed, extra legs, watermark, text",
        },
    ),
    (
        "Male mir ein Schloss auf einem Berg im Sonnenuntergang",
        {
            "prompt": "a castle on a mountain at sunset, golden hour, dramatic clouds, fantasy landscape, "
            "digital painting, highly detailed",
            "negative_prompt": "blurry, low quality, distorted, watermark, text",
        },
    ),
)


def image_prompt_schema(max_tokens: int) -> dict[str, Any]:
    """The JSON the model must write. The lengths are bounded (about 4 characters a token)
    so that the JSON closes well within ``max_tokens`` and always parses; the prompt stays
    within what CLIP reads (77 tokens, about 300 characters)."""
    return {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": max(20, min(300, 2 * max_tokens))},
            "negative_prompt": {"type": "string", "maxLength": max(10, min(150, max_tokens // 2))},
        },
        "required": ["prompt", "negative_prompt"],
        "additionalProperties": False,
    }


def image_prompt_by_rules(text: str) -> ImagePrompt:
    """The wish with its command and drawing verb phrase stripped: "could you draw me a cat
    please?" -> "a cat". No model; the language stays the user's."""
    subject, _ = _rules_subject(text)
    tags = _LORA_TAG.findall(_split_command(text)[1])
    return ImagePrompt(_with_tags(subject, tags), FALLBACK_NEGATIVE_PROMPT, "rules")


def _rules_subject(text: str) -> tuple[str, Language]:
    """What to draw, by the rules, without LoRA tags; and the language of the request when known."""
    _, text = _split_command(text)
    wish = " ".join(_LORA_TAG.sub(" ", text).split())
    spans = _window_sentences(wish)
    if len(spans) > MAX_SUBJECT_CLAUSES + 1:
        spans = [*spans[:MAX_SUBJECT_CLAUSES], spans[-1]]
    subject, language = wish, None
    for start, end in spans:
        verdict = _judge_clause(wish[start:end])
        if verdict is not None and verdict.route == "image":
            # the subject, then the rest of the wish: the next sentences, or the rest of a sentence cut off
            subject, language = verdict.subject + wish[end:], verdict.language
            break
    return _trim_subject(subject) or wish, language


def _trim_subject(subject: str) -> str:
    """Without "a picture of" in front and "please", "bitte", "?" at the end."""
    subject = _SUBJECT_HEAD.sub("", subject.strip())
    tail = _SUBJECT_TAIL_REVERSED.match(subject[::-1])
    if tail is not None:
        subject = subject[: len(subject) - tail.end()]
    return subject.strip()


def interpret_image_request(text: str, model: IdleTextModel, *, max_tokens: int = 200) -> ImagePrompt:
    """Let the chat model turn a casual wish (any language) into an English Stable Diffusion prompt
    and a negative prompt, as grammar-constrained JSON; the user's ``<lora:...>`` tags are kept.

    Only when the model is loaded and idle (it is never loaded for this); otherwise, and when the
    model fails or writes nothing useful, ``image_prompt_by_rules``.
    """
    _, command_free = _split_command(text)
    tags = _LORA_TAG.findall(command_free)
    wish = " ".join(_LORA_TAG.sub(" ", command_free).split())
    if not wish:
        raise BadInputError("there is nothing to draw: say what the picture should show")
    if max_tokens < 16:
        raise BadInputError(f"max_tokens must be at least 16 to write an image prompt, got {max_tokens}")
    fallback = image_prompt_by_rules(text)
    messages: list[Message] = [{"role": "system", "content": _IMAGE_PROMPT_SYSTEM}]
    for example, answer in _IMAGE_PROMPT_EXAMPLES:
        messages += [{"role": "user", "content": example}, {"role": "assistant", "content": json.dumps(answer)}]
    messages.append({"role": "user", "content": wish[:MAX_WISH_CHARS]})
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0, repeat_penalty=1.1)
    try:
        reply = model.complete_if_idle(messages, params, grammar=json_grammar(image_prompt_schema(max_tokens)))
        if reply is None:
            return fallback
        answer = json.loads(reply)
        prompt, negative = _tidy(answer["prompt"]), _tidy(answer["negative_prompt"])
    except (AppError, ValueError, KeyError, TypeError, RuntimeError) as error:
        log.warning("the chat model could not write an image prompt (%s); using the wish as it is", error)
        return fallback
    if not prompt or _copies_an_example(prompt) or _loses_the_subject(prompt, *_rules_subject(text)):
        return fallback
    return ImagePrompt(_with_tags(prompt, tags), negative, "model")


def _tidy(value: object) -> str:
    """One line, no LoRA tags of the model's own (only the user's tags reach the generator)."""
    return " ".join(_LORA_TAG.sub(" ", str(value)).split()).strip(" ,")


def _copies_an_example(prompt: str) -> bool:
    """Small models sometimes answer with the worked example instead of the wish."""
    return any(prompt.lower().startswith(answer["prompt"][:40].lower()) for _, answer in _IMAGE_PROMPT_EXAMPLES)


_FUNCTION_WORDS = frozenset(
    ("a", "an", "the", "of", "with", "and", "or", "in", "on", "at", "to", "for", "from", "me", "my")
)


def _loses_the_subject(prompt: str, subject: str, language: Language) -> bool:
    """For an English request, the model's prompt must keep a word of the subject (its first four
    letters): small models sometimes describe something else entirely. Only a cheap check: one kept
    word passes. Other languages are translated, so they are not checked."""
    if language != "en":
        return False
    words = {w[:4] for w in re.findall(r"[a-z]{3,}", subject.lower()) if w not in _FUNCTION_WORDS}
    said = {w[:4] for w in re.findall(r"[a-z]{3,}", prompt.lower())}
    return bool(words) and not words & said


def _with_tags(prompt: str, tags: list[str]) -> str:
    return " ".join([prompt, *tags]) if tags else prompt
