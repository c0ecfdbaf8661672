"""Serving storey: an OpenAI/DeepSeek-compatible HTTP API over the engine (FastAPI + uvicorn).

`create_app(load_model(...), ServeSettings(...))` builds the app; `pagoda serve` runs it.
Modules: settings (what can be configured), app (the app and its lifespan), routes (endpoints),
schemas (OpenAI bodies), generation (engine requests -> text),
errors (OpenAI error format), auth (keys, rate limit), metrics (Prometheus), logs (access log).
"""

from pagoda.serve.app import create_app
from pagoda.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
