"""LoRA adapters served next to the base model, hot-swapped per request.

A request names an adapter with `"model": "BASE:ADAPTER"` (BASE: the served model id or an
alias); its tokens then run with that adapter's low-rank deltas while requests for other
adapters, or none, decode in the same continuous batch. Adapters are PEFT folders
(adapter_config.json + adapter_model.safetensors): loaded at start (`--adapter NAME=PATH`) or
at run time through vLLM's admin endpoints, which only `admin_keys` may call when auth is on:

    POST /v1/load_lora_adapter    {"lora_name": "contracts", "lora_path": "runs/contracts"}
    POST /v1/unload_lora_adapter  {"lora_name": "contracts"}
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from pagoda.errors import ConfigError, InvalidRequestError, ModelNotFoundError, PagodaError
from pagoda.model.lora import load_adapter
from pagoda.serve.errors import with_param
from pagoda.serve.settings import check_adapter_name


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str


class Adapters:
    """The adapters the engine holds (name -> folder), loaded and unloaded between steps."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def load(self, engine: Any, name: str, path: str) -> None:
        """Read the adapter (off the event loop), then attach it on the engine thread."""
        try:
            check_adapter_name(name)
        except ConfigError as exc:
            raise with_param(exc, "lora_name") from None
        async with self._lock:
            if name in self.paths:
                raise with_param(InvalidRequestError(
                    f"an adapter named '{name}' is already loaded; unload it first"), "lora_name")
            try:
                adapter = await asyncio.to_thread(load_adapter, path)
            except PagodaError as exc:  # a bad folder is the request's fault: 400, not 500
                raise with_param(InvalidRequestError(str(exc)), "lora_path") from None
            await engine.call(lambda e: e.add_adapter(name, adapter))
            self.paths[name] = path

    async def unload(self, engine: Any, name: str) -> None:
        async with self._lock:
            if name not in self.paths:
                raise with_param(ModelNotFoundError(f"no LoRA adapter named '{name}' is loaded"),
                                 "lora_name")
            await engine.call(lambda e: e.remove_adapter(name))
            del self.paths[name]


def build_adapter_router(state: Any) -> APIRouter:
    """vLLM's runtime adapter endpoints, for admin keys only."""
    router = APIRouter(prefix="/v1")

    @router.post("/load_lora_adapter")
    async def load(body: LoadAdapter, request: Request) -> dict[str, Any]:
        """Load a PEFT LoRA adapter folder; requests then use it as "model": "BASE:NAME"."""
        await state.guard(request)
        state.guard.require_admin(request)
        await state.adapters.load(state.engine, body.lora_name, body.lora_path)
        return {"object": "lora_adapter", "id": f"{state.model_id}:{body.lora_name}",
                "loaded": True}

    @router.post("/unload_lora_adapter")
    async def unload(body: UnloadAdapter, request: Request) -> dict[str, Any]:
        """Unload an adapter no running or queued request uses (409 while one does)."""
        await state.guard(request)
        state.guard.require_admin(request)
        await state.adapters.unload(state.engine, body.lora_name)
        return {"object": "lora_adapter", "id": f"{state.model_id}:{body.lora_name}",
                "loaded": False}

    return router
