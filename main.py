"""Enclave: the composition root.

It reads the settings, builds the model manager and the services once, and hands
them to the front end the command asks for: the web UI with its HTTP API
(``serve``, the default) or a headless command.
"""

import offline  # noqa: F401, I001 - must come first: keeps every library offline

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.dispatch import Assistant
from chat import ChatService
from generator import ImageService
from cli import EXIT_ERROR, Console, build_parser, run_command
from errors import AppError
from model_manager import GIB, ModelManager, detect_devices, warm_tier_budget
from settings import Settings, load_settings, require_safe_exposure
from vision import VisionService
from speech_to_text import TranscriptionService
from text_to_speech import SpeechService
from services import Services
from stable_diffusion.metadata import remove_partial_files

if TYPE_CHECKING:
    from fastapi import FastAPI

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
SHUTDOWN_GRACE_S = 3
log = logging.getLogger("enclave")


def build_services(settings: Settings) -> Services:
    budgets = settings.manager
    cpu_budget = None if budgets.cpu_memory_budget_gb == "auto" else int(budgets.cpu_memory_budget_gb * GIB)
    devices = detect_devices(int(budgets.gpu_memory_budget_gb * GIB), cpu_budget)
    manager = ModelManager(
        policy=budgets.policy,
        devices=devices,
        keep_alive_s=budgets.keep_alive_s,
        wait_timeout_s=budgets.wait_timeout_s,
        max_queue=budgets.max_queue,
        warm_tier_bytes=warm_tier_budget(budgets.warm_tier_gb, devices),
    )
    return Services(
        manager=manager,
        chat=ChatService(
            manager, settings.chat, settings.model_path(settings.chat.model), models_dir=settings.models_dir
        ),
        vision=VisionService(manager, settings.vision, settings.model_path(settings.vision.model)),
        images=ImageService(manager, settings.image, settings.models_dir),
        transcriber=TranscriptionService(manager, settings.speech, settings.models_dir),
        speaker=SpeechService(manager, settings.speech, settings.models_dir),
    )


def build_app(services: Services, settings: Settings) -> "FastAPI":
    """The app ``serve`` runs: the API (behind settings.server's key), the assistant for model
    "auto", and the web UI at /. Benchmarks build the same one."""
    from api.app import create_app
    from conversations.store import ConversationStore
    from webui.app import UI_CSS, build_ui

    require_safe_exposure(settings.server)
    assistant = Assistant(services, settings.assistant)
    store = ConversationStore(settings.data_dir / "conversations")
    exports_dir = settings.data_dir / "exports"
    demo = build_ui(services, settings, assistant, store, exports_dir)
    return create_app(
        services,
        settings.server,
        settings.image.outputs_dir,
        demo,
        assistant,
        settings.audit,
        ui_folders=[store.files_dir, exports_dir],
        css=UI_CSS,
    )


def serve(services: Services, settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from media.ffmpeg import ensure_ffmpeg

    server = settings.server.model_copy(update={"host": host, "port": port})
    app = build_app(services, settings.model_copy(update={"server": server}))
    removed = remove_partial_files(settings.image.outputs_dir)
    if removed:
        log.info("removed %d unfinished image file(s) left by an earlier crash", removed)
    ensure_ffmpeg(settings.data_dir / "bin")  # Gradio streams spoken replies through it
    services.manager.start_reaper()
    log.info("serving on http://%s:%d (device: %s)", host, port, services.manager.device)
    try:
        # On SIGTERM or Ctrl-C, requests still running after a few seconds are cancelled, and a
        # cancelled request stops its generation at the next token or step.
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        services.manager.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    default_config = Path(os.environ.get("ENCLAVE_CONFIG", DEFAULT_CONFIG))
    args = build_parser(default_config).parse_args(argv)
    command = args.command or "serve"
    serving = command == "serve"
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if serving else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if serving else "%(levelname)s: %(message)s",
    )
    try:
        settings = load_settings(args.config, os.environ)
        services = build_services(settings)
    except AppError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if command == "serve":
        host = getattr(args, "host", None) or settings.server.host
        port = getattr(args, "port", None) or settings.server.port
        try:
            return serve(services, settings, host, port)
        except AppError as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_ERROR
    try:
        return run_command(args, services, Console())
    finally:
        services.manager.close()


if __name__ == "__main__":
    sys.exit(main())
