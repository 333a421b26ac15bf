"""The OpenAI-compatible HTTP API: protocol models (protocol), typed errors as OpenAI error
bodies (errors), server-sent events (streaming), the /v1 routes (routes) and the app that
assembles them with the Gradio UI mounted (app)."""
