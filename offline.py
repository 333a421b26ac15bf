"""Make every ML library stay offline.

Importing this module sets the environment variables that keep Hugging Face,
Gradio and friends from reaching the network. It must be imported before any
of those libraries; ``main.py`` imports it first.
"""

import os

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
}

for _name, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)
