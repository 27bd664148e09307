"""The llmos daemon: the kernel behind HTTP (OpenAI- and Ollama-compatible APIs, the native process API,
sessions, metrics) and the web desktop. `llmos serve` runs it; `create_app` builds the ASGI app."""
