"""Stable Diffusion helpers for the image generator: model files (models), loading them into
diffusers (pipeline), LoRA files and prompt tags (lora), request checks (request) and the
AUTOMATIC1111-style PNG parameters text (metadata)."""
