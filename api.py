"""The HTTP server: a FastAPI app with the Gradio UI mounted at "/".

One process and one port serve the browser UI and the JSON endpoints, over the
same model manager and services.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gradio as gr
from fastapi import FastAPI

from ui import Services


def create_app(services: Services, demo: gr.Blocks) -> FastAPI:
    app = FastAPI(title="Enclave", docs_url="/api/docs", redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return dataclasses.asdict(services.manager.status())

    return gr.mount_gradio_app(app, demo, path="/", footer_links=["settings"])
