"""The Gradio web UI: one module per tab, assembled in webui.app."""
