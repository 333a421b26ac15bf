"""Answer questions about an image with LLaVA-1.5 through transformers.

The service picks the precision and device (4-bit on a CUDA GPU, full precision on
the CPU, with a visible notice), borrows the model from the model manager (kind
"vision"), builds the prompt with the processor's chat template, the image attached
to the first user turn, and streams the answer while ``generate`` runs on the device's compute
thread (the model manager's ``ComputeThread``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import (
    BadInputError,
    ModelLoadError,
    ModelMissingError,
    OutOfMemoryError,
    RequestCancelledError,
    TooLargeError,
)
from media.images import ImageSource, load_image
from model_manager import CatalogEntry, ComputeThread, LoadedModel, Loader, LoadSpec, ModelManager
from model_memory.torch_parking import park_modules, release_pinned_memory, unpark_modules
from settings import VisionSettings
from text_generation.context import fit_to_context
from text_generation.conversation import SYSTEM_ROLES, accepts_system_role, normalise
from text_generation.detokenizer import IncrementalDetokenizer, TokenHandOff
from text_generation.stream import GenerationParams, Message, TextStream

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 8000
ROLES = ("system", "user", "assistant")
DOWNLOAD_HINT = "download llava-hf/llava-1.5-7b-hf (transformers layout) into it (see README)"
# Bytes a parameter takes in memory; 4-bit NF4 is about 0.3 of fp16 once its scales are counted.
BYTES_PER_PARAMETER = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "8bit": 1.1, "4bit": 0.6}
STORED_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# llava-hf/llava-1.5-7b-hf's template, for model folders saved without one.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# ----------------------------------------------------------------------------
# Precision and device
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    precision: str  # what actually loads: 4bit, 8bit, fp16, bf16 or fp32
    device: str  # "cuda" or "cpu"
    notice: str | None = None  # set when the user should know it is not what they might expect


def choose_placement(requested: str, cuda: bool, bitsandbytes: bool) -> Placement:
    """The precision and device for ``vision.precision``; without CUDA, what still works on the CPU."""
    if cuda:
        wanted = "4bit" if requested == "auto" else requested
        if wanted in ("4bit", "8bit") and not bitsandbytes:
            return Placement(
                "fp16", "cuda", f"bitsandbytes is not installed: LLaVA runs in fp16 instead of {wanted} (more memory)."
            )
        return Placement(wanted, "cuda")
    if requested in ("4bit", "8bit") and bitsandbytes:
        return Placement(
            requested, "cpu", f"No CUDA GPU: LLaVA runs {requested} on the CPU through bitsandbytes (slow)."
        )
    if requested == "bf16":
        return Placement("bf16", "cpu", "No CUDA GPU: LLaVA runs on the CPU in bf16 (slow).")
    if requested in ("auto", "fp32"):
        return Placement("fp32", "cpu", "No CUDA GPU: LLaVA runs on the CPU in full precision (slow).")
    reason = "bitsandbytes is not installed" if requested in ("4bit", "8bit") else f"{requested} needs a GPU"
    return Placement("fp32", "cpu", f"No CUDA GPU ({reason}): LLaVA runs on the CPU in full precision (slow).")


def cuda_is_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# ----------------------------------------------------------------------------
# The model folder
# ----------------------------------------------------------------------------


def missing_files(folder: Path) -> list[str]:
    """What a LLaVA folder in the transformers layout lacks, in words; empty when complete."""
    if not folder.is_dir():
        return ["the folder itself"]
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("the weights (*.safetensors)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("the tokenizer (tokenizer.json or tokenizer.model)")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        missing.append("the image processor (preprocessor_config.json)")
    return missing


def describe_missing(folder: Path) -> str | None:
    missing = missing_files(folder)
    if not missing:
        return None
    where = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}"
    return (
        f"The vision model is not installed: {folder} {where}. It needs config.json, the weights "
        f"(*.safetensors), the tokenizer files and preprocessor_config.json: {DOWNLOAD_HINT}, "
        "or set vision.model in config.yaml to where it is."
    )


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path} could not be read ({error}); {DOWNLOAD_HINT} again") from None
    if not isinstance(config, dict) or config.get("model_type") != "llava":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise ModelLoadError(
            f"{folder} holds a {kind or 'unknown'} model, not LLaVA (config.json model_type is not 'llava'); "
            "set vision.model in config.yaml to a LLaVA-1.5 folder"
        )
    return config


def check_model_folder(folder: Path) -> dict[str, Any]:
    """The folder's config, or a ModelMissingError/ModelLoadError naming the folder and the fix."""
    problem = describe_missing(folder)
    if problem:
        raise ModelMissingError(problem)
    return read_config(folder)


def estimate_model_bytes(spec: LoadSpec) -> int:
    """Weights on disk, rescaled from the stored precision to the one that loads."""
    folder = Path(spec.path)
    config = check_model_folder(folder)
    stored = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    on_disk = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    parameters = on_disk / STORED_BYTES.get(str(stored), 2)
    return int(parameters * BYTES_PER_PARAMETER[spec.option("precision", "fp32")])


# ----------------------------------------------------------------------------
# The loaded model
# ----------------------------------------------------------------------------


@dataclass
class LoadedVisionModel:
    model: Any  # transformers LlavaForConditionalGeneration
    processor: Any  # transformers LlavaProcessor

    @property
    def context_size(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_index)

    def prompt(self, system: Message | None, turns: Sequence[Message]) -> str:
        """The conversation through the chat template, normalised first (see text_generation.conversation),
        the image on the first user turn."""
        from jinja2 import TemplateError

        template = None if self.processor.chat_template else FALLBACK_TEMPLATE

        def render(messages: Sequence[Message]) -> str:
            conversation = []
            image_placed = False
            for message in messages:
                parts: list[dict[str, str]] = [{"type": "text", "text": message["content"]}]
                if message["role"] == "user" and not image_placed:
                    parts.insert(0, {"type": "image"})
                    image_placed = True
                conversation.append({"role": message["role"], "content": parts})
            return self.processor.apply_chat_template(
                conversation, chat_template=template, add_generation_prompt=True, tokenize=False
            )

        system_text = system["content"] if system else None
        messages = normalise(system_text, turns, system_role=accepts_system_role(render))
        try:
            return render(messages)
        except (TemplateError, ValueError, TypeError) as error:
            raise BadInputError(
                f"the vision model's chat template refuses this conversation ({error}); send alternating user "
                "and assistant messages ending with a user message"
            ) from None

    def inputs(self, image: Any, system: Message | None, turns: Sequence[Message]) -> Any:
        """Token ids, attention mask and pixel values (a BatchFeature) on the model's device."""
        features = self.processor(images=image, text=self.prompt(system, turns), return_tensors="pt")
        return features.to(self.model.device, dtype=self.model.dtype)


def load_vision_model(spec: LoadSpec) -> LoadedModel:
    """The manager's loader for kind "vision": LLaVA and its processor from a local folder."""
    folder = Path(spec.path)
    check_model_folder(folder)
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    precision, device = spec.option("precision", "fp32"), spec.device
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = LlavaForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, device_map={"": device}, **precision_arguments(precision, device)
        )
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the manager reports it as out of memory, with the fix
    except Exception as error:
        raise ModelLoadError(
            f"LLaVA could not be loaded from {folder} in {precision} on {device} ({error}). The files may be "
            f"incomplete or not in the transformers layout: {DOWNLOAD_HINT} again, or try vision.precision: fp32"
        ) from error
    model.eval()
    loaded = LoadedVisionModel(model, processor)
    # Closing after a stay in the warm tier gives the pinned RAM back.
    return LoadedModel(model=loaded, reported_bytes=int(model.get_memory_footprint()), close=release_pinned_memory)


def park_vision_model(loaded: LoadedVisionModel, spec: LoadSpec) -> LoadedVisionModel | None:
    """The warm tier: the weights into CPU RAM. A 4/8-bit model cannot be moved (bitsandbytes lays its
    packed weights and scales out for the GPU): None, so the manager unloads it and it loads again."""
    if spec.option("precision", "fp32") in ("4bit", "8bit"):
        return None
    if spec.device != "cpu":
        park_modules([loaded.model])
    return loaded


def unpark_vision_model(loaded: LoadedVisionModel, spec: LoadSpec) -> LoadedVisionModel:
    if spec.device != "cpu":
        unpark_modules([loaded.model], spec.device)
    return loaded


def precision_arguments(precision: str, device: str) -> dict[str, Any]:
    """from_pretrained arguments for a precision: a dtype, and a bitsandbytes config when quantised."""
    import torch
    from transformers import BitsAndBytesConfig

    if precision == "4bit":
        # NF4 computes in fp16 on a GPU; on the CPU fp16 is many times slower than fp32.
        compute = torch.float16 if device == "cuda" else torch.float32
        quantise = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        return {"dtype": compute, "quantization_config": quantise}
    if precision == "8bit":
        return {"dtype": torch.float16, "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"dtype": {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]}


# ----------------------------------------------------------------------------
# Streaming generate from a worker thread
# ----------------------------------------------------------------------------


def generation_arguments(params: GenerationParams, max_new_tokens: int) -> dict[str, Any]:
    """``generate`` keyword arguments for our sampling parameters (temperature 0: greedy)."""
    arguments: dict[str, Any] = {"max_new_tokens": max_new_tokens, "repetition_penalty": params.repeat_penalty}
    if params.temperature > 0:
        return {**arguments, "do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
    return {**arguments, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _stop_when_set(*events: threading.Event | None) -> Any:
    """A StoppingCriteria that ends generation once any of ``events`` is set."""
    import torch
    from transformers import StoppingCriteria

    watched = [event for event in events if event is not None]

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stop = any(event.is_set() for event in watched)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StopWhenSet()


def release_text(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split ``pending`` into (text safe to show, text held back, whether a stop string ended it).

    Text that could be the start of a stop string is held back until the next piece decides.
    """
    found = [index for index in (pending.find(stop) for stop in stops if stop) if index >= 0]
    if found:
        return pending[: min(found)], "", True
    held = max((size for stop in stops for size in range(1, len(stop)) if pending.endswith(stop[:size])), default=0)
    return pending[: len(pending) - held], pending[len(pending) - held :], False


@dataclass
class _Run:
    """What the worker thread leaves behind for the consumer."""

    sequences: Any = None
    error: BaseException | None = None
    prompt_length: int = 0
    max_new_tokens: int = 0


# ----------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------


class VisionService:
    def __init__(
        self,
        manager: ModelManager,
        settings: VisionSettings,
        model_path: Path,
        *,
        cuda_available: Callable[[], bool] = cuda_is_available,
        bitsandbytes_available: Callable[[], bool] = bitsandbytes_installed,
    ) -> None:
        self._manager = manager
        self._settings = settings
        self._model_path = model_path
        self._placement = choose_placement(settings.precision, cuda_available(), bitsandbytes_available())
        self.defaults = GenerationParams.from_defaults(settings.defaults)  # type: ignore[arg-type]
        manager.register_loader(
            "vision",
            Loader(
                load=load_vision_model,
                estimate_bytes=estimate_model_bytes,
                on_compute_thread=True,
                park=park_vision_model,
                unpark=unpark_vision_model,
            ),
        )
        if self._placement.notice:
            log.info(self._placement.notice)

    @property
    def model_name(self) -> str:
        return self._model_path.name

    def models(self) -> list[CatalogEntry]:
        return [CatalogEntry(self.model_name, "vision", str(self._model_path), self.availability() is None)]

    def notice(self) -> str | None:
        """What the UI should say about how the model runs (CPU, no quantisation), or None."""
        return self._placement.notice

    def availability(self) -> str | None:
        """None when the model folder looks installed; else what is missing, where, and the fix."""
        return describe_missing(self._model_path)

    def require_installed(self) -> None:
        """Fail now, naming the files and the fix, when the model is missing (front ends call this
        before reading an image, so the fix for the model comes first)."""
        missing = self.availability()
        if missing:
            raise ModelMissingError(missing)

    def load_spec(self) -> LoadSpec:
        return LoadSpec.of(
            "vision", self._model_path, precision=self._placement.precision, device=self._placement.device
        )

    # -- asking -------------------------------------------------------------

    def stream(
        self,
        image: ImageSource,
        messages: Sequence[Message],
        params: GenerationParams | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> TextStream:
        """Stream the answer to the last user message in a conversation about ``image``.

        Inputs are checked now (an empty last question asks vision.default_question);
        the model loads when iteration starts.
        """
        params = params or self.defaults
        params.check()
        system, turns = self._check_messages(messages)
        picture = load_image(
            image, max_pixels=self._settings.max_image_pixels, refuse_pixels=self._settings.refuse_image_pixels
        )
        seed = params.seed if params.seed >= 0 else random.randrange(2**31)

        def pieces(stream: TextStream) -> Iterator[str]:
            stream.model_name = self.model_name
            stream.seed = seed
            spec = self.load_spec()
            try:
                with self._manager.acquire(spec, cancel=cancel) as model:
                    compute = self._manager.compute_thread(spec)

                    def prepare() -> tuple[Any, int]:
                        return self._fit(model, picture, system, turns, params, stream)

                    yield from self._generate(model, compute, prepare, params, seed, cancel, stream)
            except RequestCancelledError:  # stopped while waiting for the model: nothing was generated
                stream.finish_reason = "cancelled"

        return TextStream(pieces)

    def complete(self, image: ImageSource, messages: Sequence[Message], params: GenerationParams | None = None) -> str:
        return self.stream(image, messages, params).text()

    def _check_messages(self, messages: Sequence[Message]) -> tuple[Message | None, list[Message]]:
        known = (*ROLES, *SYSTEM_ROLES)
        bad = next(
            (n for n, m in enumerate(messages) if m.get("role") not in known or not isinstance(m.get("content"), str)),
            None,
        )
        if bad is not None:
            raise BadInputError(f"message {bad + 1} needs a role of system, user or assistant and text content")
        systems = [m["content"] for m in messages if m["role"] in SYSTEM_ROLES]
        turns = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] not in SYSTEM_ROLES]
        if not turns:
            turns = [{"role": "user", "content": ""}]
        if turns[-1]["role"] != "user":
            raise BadInputError("the last message must come from the user: it is the question about the image")
        if not turns[-1]["content"].strip():
            turns[-1] = {"role": "user", "content": self._settings.default_question}
        question = turns[-1]["content"]
        if len(question) > MAX_QUESTION_CHARS:
            raise TooLargeError(
                f"the question is {len(question):,} characters; the limit for a question about an image "
                f"is {MAX_QUESTION_CHARS:,}. Shorten it."
            )
        system_text = "\n\n".join(text for text in systems if text.strip())
        system = {"role": "system", "content": system_text} if system_text else None
        # empty turns (an image-only one), two of one role in a row, a leading assistant turn: tidied here
        return system, normalise(None, turns, system_role=True)

    def _fit(
        self,
        model: LoadedVisionModel,
        image: Any,
        system: Message | None,
        turns: list[Message],
        params: GenerationParams,
        stream: TextStream,
    ) -> tuple[Any, int]:
        """Model inputs and reply length, dropping the oldest turns (the image moves along) to fit the context."""
        built: dict[int, Any] = {}

        def tokens_for(messages: Sequence[Message]) -> tuple[list[int], list[str]]:
            kept = [m for m in messages if m["role"] != "system"]
            built[len(kept)] = model.inputs(image, system, kept)
            return built[len(kept)]["input_ids"][0].tolist(), []

        try:
            fitted = fit_to_context(tokens_for, system, turns, model.context_size, params.max_tokens)
        except BadInputError:
            raise BadInputError(
                f"the question is {built[1]['input_ids'].shape[1]:,} tokens with the image, and the model's "
                f"context holds {model.context_size:,}; shorten the question"
            ) from None
        inputs = built[len(turns) - fitted.dropped_messages]
        stream.prompt_tokens = int(inputs["input_ids"].shape[1])
        stream.dropped_messages = fitted.dropped_messages
        return inputs, fitted.max_tokens

    def _generate(
        self,
        model: LoadedVisionModel,
        compute: ComputeThread,
        prepare: Callable[[], tuple[Any, int]],
        params: GenerationParams,
        seed: int,
        cancel: threading.Event | None,
        stream: TextStream,
    ) -> Iterator[str]:
        """Prepare the inputs and run ``generate`` on the device's compute thread; this thread
        decodes the new tokens as they pile up and yields the text."""
        import torch
        from transformers import StoppingCriteriaList

        stop = threading.Event()  # set when the consumer leaves or a stop string shows up
        hand_off = TokenHandOff()
        criteria = StoppingCriteriaList([_stop_when_set(stop, cancel)])
        run = _Run()

        def work() -> None:
            try:
                torch.manual_seed(seed)  # the manager lends a model to one request at a time
                inputs, max_new_tokens = prepare()
                run.prompt_length, run.max_new_tokens = int(inputs["input_ids"].shape[1]), max_new_tokens
                arguments = generation_arguments(params, max_new_tokens)
                run.sequences = model.model.generate(
                    **inputs, **arguments, streamer=hand_off, stopping_criteria=criteria
                )
            except BaseException as error:
                run.error = error
            finally:
                hand_off.end()  # wake the consumer

        working = compute.submit(work)
        text = IncrementalDetokenizer(model.processor.tokenizer)
        pending = ""
        try:
            for batch in hand_off.batches():
                if cancel is not None and cancel.is_set():
                    stream.finish_reason = "cancelled"
                    break
                shown, pending, stopped = release_text(pending + text.add(batch), params.stop)
                if shown:
                    yield shown
                if stopped:
                    stream.finish_reason = "stop"
                    break
            else:
                if pending and run.error is None:
                    yield pending
        finally:
            stop.set()  # ends generate at the next token when the consumer stopped early
            if not working.cancel():  # not started yet: it never will; else wait for it to end
                working.result()
        if run.error is not None:
            if isinstance(run.error, MemoryError) or "out of memory" in str(run.error).lower():
                raise OutOfMemoryError(
                    "LLaVA ran out of memory while answering; lower max_tokens, "
                    "or set vision.precision to 4bit in config.yaml to free memory"
                ) from run.error
            raise run.error
        generated = run.sequences[0, run.prompt_length :].tolist()
        stream.completion_tokens = len(generated)
        if stream.finish_reason is None:
            stream.finish_reason = finish_reason(model, generated, run.max_new_tokens, cancel)


def finish_reason(
    model: LoadedVisionModel, generated: list[int], max_new_tokens: int, cancel: threading.Event | None
) -> str:
    if cancel is not None and cancel.is_set():
        return "cancelled"
    eos = model.model.generation_config.eos_token_id
    ended = bool(generated) and generated[-1] in (eos if isinstance(eos, list) else [eos])
    return "length" if len(generated) >= max_new_tokens and not ended else "stop"
