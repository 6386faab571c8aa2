"""serve: the inference engine (KV cache, sampling, continuous batching), the OpenAI-compatible HTTP API and
the web chat page. Run it with `python -m serve --checkpoint PATH`."""
