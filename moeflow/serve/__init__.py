"""`moeflow serve`: an OpenAI-compatible HTTP server over the inference engine.

Files, in the order a request meets them: config.py (flags), loader.py (checkpoint -> model,
tokenizer, chat template), app.py (routes, body limit, draining), protocol.py (schemas and
validation), chat.py (chat templates), worker.py (the engine thread), metrics.py
(Prometheus), server.py (uvicorn, SIGTERM drain), bench.py (`moeflow bench-serve`, a load
generator). Streaming detokenization and stop strings are moeflow.infer.text's, shared with
`moeflow generate`; the tokenizer is moeflow.data.tokenizer's.
"""

from moeflow.serve.config import ServeConfig

__all__ = ["ServeConfig"]
