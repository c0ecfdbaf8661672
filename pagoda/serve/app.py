"""`create_app(loaded, settings)`: the FastAPI app of `pagoda serve`.

The app's lifespan builds the engine (`infer.Engine` behind `infer.AsyncEngine`, which steps it
on a background thread) and shuts it down on exit; until then /ready answers 503. The web UI's
static files (`pagoda/serve/static/`) are served at `/` when that folder exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match, Mount

from pagoda import __version__
from pagoda.client import LocalChat
from pagoda.errors import ModelNotFoundError
from pagoda.hub.loader import LoadedModel
from pagoda.infer.constrained import ConstraintFactory
from pagoda.infer.scoring import PromptScorer
from pagoda.rag.rerank import ChatReranker
from pagoda.serve.adapter_routes import Adapters, build_adapter_router
from pagoda.serve.auth import Guard
from pagoda.serve.data_routes import build_data_router
from pagoda.serve.embeddings import EmbedderSlot, build_embeddings_router
from pagoda.serve.errors import install_error_handlers, with_param
from pagoda.serve.generation import TokenStrings
from pagoda.serve.kb_routes import KnowledgeBaseService, build_kb_router
from pagoda.serve.logs import AccessLogMiddleware
from pagoda.serve.metrics import ServeMetrics
from pagoda.serve.routes import build_router
from pagoda.serve.settings import ServeSettings

log = logging.getLogger("pagoda.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"


def display_name(name: str) -> str:
    """The model id to report: a registry name as is, a path by its file or folder name."""
    if "/" in name or "\\" in name or name.endswith(".gguf"):
        path = Path(name)
        return path.stem if path.suffix == ".gguf" else path.name
    return name


class ServeState:
    """What the routes of one app share: model, tokenizer, engine, settings, metrics."""

    def __init__(self, loaded: LoadedModel, settings: ServeSettings, engine: Any = None) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.settings = settings
        self.engine = engine
        self.ready = False
        self.metrics = ServeMetrics()
        self.guard = Guard(settings)
        self.token_strings = TokenStrings(loaded.tokenizer)
        self.scorer = PromptScorer(loaded.model)
        self.embedder = EmbedderSlot(settings.embedding_model, settings.embedding_aliases)
        self.knowledge = KnowledgeBaseService(self.embedder, settings.vector_store_uri,
                                              settings.kb_dir, settings.max_upload_mb * 2**20)
        self.constraints = ConstraintFactory.for_tokenizer(loaded.tokenizer,
                                                           loaded.model.cfg.vocab_size)
        self.context = loaded.model.cfg.max_seq_len
        self.vocab_size = min(loaded.model.cfg.vocab_size, loaded.tokenizer.vocab_size)
        self.model_id = settings.served_model_name or display_name(loaded.name)
        self.listed_models = list(dict.fromkeys([self.model_id, *settings.model_aliases]))
        self.accepted = {self.model_id, loaded.name, *settings.model_aliases}
        self.created = int(time.time())
        self.fingerprint = f"pagoda-{__version__}"
        self.adapters = Adapters()

    def resolve_model(self, name: str) -> str:
        """The model id to answer with (a loaded "BASE:ADAPTER" too), or a 404 naming what is
        served."""
        if name in self.accepted:
            return name
        base, _, adapter = name.rpartition(":")
        if base in self.accepted:
            if adapter in self.adapters.paths:
                return name
            raise with_param(ModelNotFoundError(
                f"The model '{name}' does not exist: no LoRA adapter named '{adapter}' is "
                f"loaded (loaded: {', '.join(self.adapters.paths) or 'none'})."), "model")
        aliases = [a for a in self.listed_models if a != self.model_id]
        also = f" (also as {', '.join(aliases)})" if aliases else ""
        raise with_param(ModelNotFoundError(
            f"The model '{name}' does not exist. This server serves '{self.model_id}'{also}; "
            "see GET /v1/models."), "model")

    def adapter_of(self, model: str) -> str | None:
        """The adapter a resolved model name asks for (None: the base model)."""
        return None if model in self.accepted else model.rpartition(":")[2]

    @property
    def adapter_models(self) -> list[str]:
        """The "BASE:ADAPTER" ids of the loaded adapters, for /v1/models."""
        return [f"{self.model_id}:{name}" for name in self.adapters.paths]

    def reranker(self) -> ChatReranker:
        """Reranking of knowledge-base passages by the served chat model, through its engine."""
        return ChatReranker(LocalChat(self.engine, self.tokenizer, self.model_id))

    def model_card(self, name: str) -> dict[str, Any]:
        """The /v1/models entry of one model id (an adapter's names its base, as vLLM does)."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "pagoda"}
        adapter = self.adapter_of(name)
        if adapter is not None:
            card.update(parent=self.model_id, root=self.adapters.paths[adapter])
        return card


class _UIMount(Mount):
    """The web UI at / for every path except the API's (so POST-only routes still answer 405
    to a GET, and unknown /v1/ paths a JSON 404)."""

    def matches(self, scope: dict) -> tuple[Match, dict]:
        if scope["type"] == "http" and (scope["path"] == "/v1" or
                                        scope["path"].startswith("/v1/")):
            return Match.NONE, {}
        return super().matches(scope)


class JsonBodies:
    """ASGI shim: POST bodies under /v1/ are JSON whatever Content-Type says (curl -d sends
    form-encoded), so a malformed body answers "could not parse the JSON", not a type error."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and \
                scope["path"].startswith("/v1/"):
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            sent = dict(scope.get("headers", ())).get(b"content-type", b"")
            if not sent.startswith(b"multipart/form-data"):  # document uploads stay multipart
                scope["headers"] = [*headers, (b"content-type", b"application/json")]
        await self.app(scope, receive, send)


def build_engine(loaded: LoadedModel, settings: ServeSettings) -> Any:
    """The AsyncEngine serving `loaded` with the settings' EngineConfig."""
    from pagoda.infer.engine import AsyncEngine, Engine

    engine = Engine(loaded.model, loaded.tokenizer.eos_ids, settings.engine_config())
    return AsyncEngine(engine)


def create_app(loaded: LoadedModel, settings: ServeSettings | None = None, *,
               engine: Any = None) -> FastAPI:
    """The API app; pass `engine` (an AsyncEngine) to share one, else the lifespan builds it."""
    settings = settings or ServeSettings()
    state = ServeState(loaded, settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state.engine is None
        if owned:
            state.engine = build_engine(loaded, settings)
        for name, path in settings.adapters.items():
            await state.adapters.load(state.engine, name, path)
        state.ready = True
        log.info("serving %s (context %d tokens)", state.model_id, state.context)
        try:
            yield
        finally:
            state.ready = False
            if owned:
                state.engine.shutdown()
            state.scorer.shutdown()
            await state.knowledge.close()
            await state.embedder.close()

    app = FastAPI(title="Pagoda", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API over the Pagoda engine.")
    app.state.pagoda = state
    install_error_handlers(app)
    app.include_router(build_router(state))
    app.include_router(build_adapter_router(state))
    app.include_router(build_embeddings_router(state.embedder, [Depends(state.guard)]))
    app.include_router(build_kb_router(state.knowledge, state.guard, [Depends(state.guard)],
                                       state.reranker))
    app.include_router(build_data_router([Depends(state.guard)], settings.max_upload_mb * 2**20,
                                         settings.webhook_secret))
    if STATIC_DIR.is_dir():
        app.router.routes.append(
            _UIMount("/", app=StaticFiles(directory=STATIC_DIR, html=True), name="ui"))
    app.add_middleware(JsonBodies)
    app.add_middleware(AccessLogMiddleware, metrics=state.metrics,
                       log_prompts=settings.log_prompts)
    return app
