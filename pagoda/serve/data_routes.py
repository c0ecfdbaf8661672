"""The data inbox over HTTP: documents queued for `pagoda data prepare` (see pagoda.data.inbox).

    POST /v1/data/{dataset}/uploads   multipart `files`, stored as sent
    POST /v1/data/{dataset}/webhook   {"text": ..., ...} or {"records": [{"text": ...}, ...]}
    GET  /v1/data/{dataset}/inbox     what is queued

They take the server's API keys like every /v1 route. With `webhook_secret` set, a webhook
delivery must also be signed as GitHub and Stripe sign theirs (`X-Pagoda-Signature:
sha256=<hex HMAC-SHA256 of the body>`), so that a leaked API key alone cannot feed a training
set. Files are named by their content: a retried delivery or a re-upload stores nothing new.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, UploadFile

from pagoda.data.inbox import QueuedItem, enqueue_files, enqueue_records, list_inbox
from pagoda.errors import InvalidRequestError
from pagoda.serve.errors import AuthenticationError
from pagoda.serve.uploads import check_declared_size, read_body, read_upload

SIGNATURE_HEADER = "X-Pagoda-Signature"


class SignatureError(AuthenticationError):
    """A webhook delivery without the signature the server's webhook_secret asks for, or with a
    wrong one."""

    code = "invalid_signature"


def build_data_router(deps: list[Any], max_upload_bytes: int,
                      webhook_secret: str | None) -> APIRouter:
    router = APIRouter(prefix="/v1/data", dependencies=deps)

    @router.post("/{dataset}/uploads")
    async def upload(dataset: str, request: Request, files: list[UploadFile]) -> dict[str, Any]:
        """Queue documents (multipart `files`); one unusable file queues none of them."""
        check_declared_size(request, len(files), max_upload_bytes)
        uploads = [(f.filename or "", await read_upload(f, max_upload_bytes)) for f in files]
        queued = await asyncio.to_thread(enqueue_files, dataset, uploads)
        return _enqueued(dataset, queued)

    @router.post("/{dataset}/webhook")
    async def webhook(dataset: str, request: Request) -> dict[str, Any]:
        """Queue one delivery of records as one JSONL file (the body is read raw: it is what
        the signature signs)."""
        body = await read_body(request, max_upload_bytes)
        if webhook_secret is not None:
            check_signature(body, request.headers.get(SIGNATURE_HEADER), webhook_secret)
        queued = await asyncio.to_thread(enqueue_records, dataset, records_of(body))
        return _enqueued(dataset, [queued])

    @router.get("/{dataset}/inbox")
    async def inbox(dataset: str) -> dict[str, Any]:
        """The dataset's queued files, in the order `pagoda data prepare` reads them."""
        items = await asyncio.to_thread(list_inbox, dataset)
        return {"object": "list", "dataset": dataset, "data": [_item(i) for i in items]}

    return router


def check_signature(body: bytes, sent: str | None, secret: str) -> None:
    """Accept `sha256=<hex>` of HMAC-SHA256(body, secret), compared in constant time."""
    if not sent:
        raise SignatureError(f"This webhook must be signed: send '{SIGNATURE_HEADER}: sha256=<hex "
                             "HMAC-SHA256 of the body>' made with the server's webhook_secret.")
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sent.strip().lower().encode(), expected.encode()):
        raise SignatureError(f"The {SIGNATURE_HEADER} header does not match the body: sign the "
                             "exact bytes sent, with the server's webhook_secret.")


def records_of(body: bytes) -> Any:
    """The records of a webhook body: its `records`, or the body itself as the one record
    (checked record by record when queued)."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise InvalidRequestError(f"We could not parse the JSON body of your request ({exc}). "
                                  "The body must be a JSON object.") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError('The body must be a JSON object: {"text": ...} or '
                                  '{"records": [{"text": ...}, ...]}.')
    return payload["records"] if "records" in payload else [payload]


def _enqueued(dataset: str, items: list[QueuedItem]) -> dict[str, Any]:
    return {"object": "data.inbox.enqueue", "dataset": dataset,
            "queued": [_item(i) for i in items]}


def _item(item: QueuedItem) -> dict[str, Any]:
    """An item's fields; `records` only for webhook files."""
    return {k: v for k, v in asdict(item).items() if v is not None}
