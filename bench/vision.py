"""Vision throughput: vision.py against raw transformers generate on the same model, in one run.

Both sides answer the same questions about the same image with greedy decoding on the
same loaded weights, on the same thread (the app's compute thread for the device): the raw
side templates, preprocesses and calls ``generate`` itself; ours goes through VisionService
(manager, token hand-off to the caller's thread, incremental decoding, cancel check). Prints
tokens/s and the ratio (ours / raw), the median of several runs after a warm-up, the
order alternating, and the time ours adds per token, which carries across models: at t ms
per token the ratio is t / (t + overhead). Without --model it builds a random LLaVA with
tests/tiny_llava.py, 768 wide (about 5 ms a token on a laptop CPU); --hidden 64, the test
model, takes so little per token that the ratio shows mostly that fixed overhead.
On a machine shared with other work pass --threads 1: oversubscribed OpenMP threads made single
runs here swing tenfold.
Usage: python bench/vision.py [--model FOLDER] [--runs N] [--max-tokens N] [--precision P] [--hidden N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny_llava

import offline  # noqa: F401, I001 - keep libraries offline

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from chat import physical_cores
from model_manager import GIB, ModelManager, detect_devices
from settings import VisionSettings
from text_generation.stream import GenerationParams
from vision import VisionService, precision_arguments

from rows import Row, write_rows

QUESTIONS = [
    "What is in this image?",
    "Describe the colours in this picture.",
    "What could this image be used for?",
    "Is there any text in the image?",
    "Describe this image in detail.",
]


def test_image() -> Image.Image:
    """A 640×480 gradient with a few shapes: the same pixels every run."""
    image = Image.linear_gradient("L").resize((640, 480)).convert("RGB")
    for index, colour in enumerate([(220, 40, 40), (40, 160, 60), (40, 60, 220)]):
        image.paste(colour, (60 + 190 * index, 140, 200 + 190 * index, 340))
    return image


def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="LLaVA folder (default: build the tiny random one)")
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=["auto", "4bit", "8bit", "fp16", "bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=physical_cores(), help="torch CPU threads")
    parser.add_argument("--hidden", type=int, default=768, help="width of the random model built without --model")
    parser.add_argument("--json", type=Path, help="also write the figures here (for bench/run.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model
        if folder is None:
            from tiny_llava import build_tiny_llava

            folder = build_tiny_llava(Path(scratch) / "tiny-llava", hidden_size=args.hidden)
        run(folder, args)


def run(folder: Path, args: argparse.Namespace) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    manager = ModelManager(devices=detect_devices(24 * GIB), keep_alive_s=-1)
    vision = VisionService(manager, VisionSettings(precision=args.precision), folder)
    spec = vision.load_spec()
    precision, device = spec.option("precision"), spec.device
    params = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens, seed=1, repeat_penalty=1.0)
    image = test_image()

    # Raw load time, on its own copy, dropped before ours loads: one copy in memory at a time.
    def raw_load_here() -> tuple[float, Any]:
        started = time.perf_counter()
        raw_model = LlavaForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, device_map={"": device}, **precision_arguments(precision, device)
        )
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        synchronise()
        seconds = time.perf_counter() - started
        del raw_model
        gc.collect()
        return seconds, processor

    # Both loads find the files in the page cache (read once here), so the side that loads first does
    # not pay for the disk; cold loads against bytes / disk bandwidth are bench/swap.py's.
    for file in folder.iterdir():
        if file.is_file():
            with file.open("rb") as handle:
                while handle.read(8 << 20):
                    pass
    raw_load, processor = manager.compute_thread(spec).call(raw_load_here)

    ours_load, results = compare(vision, manager, processor, image, params, args.runs)
    raw_tps, ours_tps = (statistics.median(results[name]["tps"]) for name in ("raw", "ours"))
    print(f"model: {folder.name}  precision: {precision}  device: {device}  threads: {torch.get_num_threads()}")
    print(f"runs: {args.runs} (median, after 2 warm-ups, order alternating)  max_tokens: {args.max_tokens}")
    if device == "cpu":
        print("no CUDA GPU here: CPU numbers only")
    print(f"{'':18}{'raw generate':>14}{'vision.py':>12}{'ratio':>10}")
    print(f"{'load, cached (s)':18}{raw_load:14.3f}{ours_load:12.3f}{ours_load / raw_load:10.3f}")
    print(f"{'tokens per answer':18}{statistics.median(results['raw']['tokens']):14.0f}", end="")
    print(f"{statistics.median(results['ours']['tokens']):12.0f}")
    print(f"{'first piece (ms)':18}{'-':>14}{statistics.median(results['ours']['first']) * 1000:12.1f}")
    print(f"{'tokens/s':18}{raw_tps:14.1f}{ours_tps:12.1f}{ours_tps / raw_tps:10.3f}")
    print(f"{'overhead/token (ms)':18}{'':14}{(1 / ours_tps - 1 / raw_tps) * 1000:12.3f}")
    print(f"throughput ratio (target >= 0.97): {ours_tps / raw_tps:.3f}")
    label = f"{folder.name}, {precision}, {torch.get_num_threads()} threads"
    write_rows(args.json, [Row(f"vision tokens/s ({label})", "tokens/s", raw_tps, ours_tps, minimum=0.97)])
    manager.close()


def compare(
    vision: VisionService,
    manager: ModelManager,
    processor: Any,
    image: Image.Image,
    params: GenerationParams,
    runs: int,
) -> tuple[float, dict[str, dict[str, list[float]]]]:
    """Load time of ours, and the timed runs of both sides on the weights the manager loaded."""
    # Borrowed once to load; the raw side then uses the same weights (the manager keeps them: keep_alive -1),
    # while ours borrows them again through the service.
    with manager.acquire(vision.load_spec()) as loaded:
        model = loaded.model

    compute = manager.compute_thread(vision.load_spec())

    def raw(question: str) -> tuple[int, float, float]:
        # On the thread where the app runs its torch work: a second thread running torch would slow
        # both sides (each keeps its own OpenMP team; see model_manager.ComputeThread).
        return compute.call(lambda: raw_here(question))

    def raw_here(question: str) -> tuple[int, float, float]:
        started = time.perf_counter()
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device, dtype=model.dtype)
        output = model.generate(**inputs, max_new_tokens=params.max_tokens, do_sample=False, repetition_penalty=1.0)
        synchronise()
        return output.shape[1] - inputs["input_ids"].shape[1], 0.0, time.perf_counter() - started

    def ours(question: str) -> tuple[int, float, float]:
        started = time.perf_counter()
        first = 0.0
        stream = vision.stream(image, [{"role": "user", "content": question}], params)
        for _ in stream:
            first = first or time.perf_counter() - started
        synchronise()
        return stream.completion_tokens, first, time.perf_counter() - started

    return manager.status().resident[0].load_seconds, measure({"raw": raw, "ours": ours}, runs)


def measure(
    sides: dict[str, Callable[[str], tuple[int, float, float]]], runs: int
) -> dict[str, dict[str, list[float]]]:
    """Per side: tokens, seconds to the first piece and tokens/s of each timed run."""
    results: dict[str, dict[str, list[float]]] = {name: {"tokens": [], "first": [], "tps": []} for name in sides}
    for question in QUESTIONS[:2]:  # warm-up
        for side in sides.values():
            side(question)
    for index in range(runs):
        question = QUESTIONS[index % len(QUESTIONS)]
        order = list(sides.items())
        if index % 2:
            order.reverse()  # alternate who goes first so drift hits both sides alike
        for name, side in order:
            tokens, first, seconds = side(question)
            results[name]["tokens"].append(tokens)
            results[name]["first"].append(first)
            results[name]["tps"].append(tokens / seconds)
    return results


if __name__ == "__main__":
    main()
