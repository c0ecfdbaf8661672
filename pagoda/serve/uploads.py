"""Size limits on what clients send (document uploads, webhook bodies): 413 beyond
`max_upload_mb`, found out without reading more than the limit into memory."""

from __future__ import annotations

from fastapi import Request, UploadFile

from pagoda.errors import PagodaError

MULTIPART_OVERHEAD = 65536  # boundaries and part headers of a multipart body


class PayloadTooLargeError(PagodaError):
    """An upload over the size limit."""

    http_status = 413
    code = "payload_too_large"


def too_large(limit: int, what: str = "an uploaded file") -> PayloadTooLargeError:
    return PayloadTooLargeError(f"{what} is larger than the limit of {limit // 2**20} MB "
                                "(setting max_upload_mb)")


def check_declared_size(request: Request, files: int, limit: int) -> None:
    """Refuse a multipart request whose Content-Length already says a file must be too large."""
    if declared_size(request) > limit * files + MULTIPART_OVERHEAD:
        raise too_large(limit)


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """An uploaded file's bytes (413 when it has more than `limit`)."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    return data


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read in chunks and refused (413) once it passes `limit` bytes."""
    if declared_size(request) > limit:
        raise too_large(limit, "the request body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(limit, "the request body")
    return bytes(body)


def declared_size(request: Request) -> int:
    """The body size the client announced (0 when it sent no Content-Length)."""
    return int(request.headers.get("content-length") or 0)
