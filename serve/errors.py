"""The errors a request can meet, with the HTTP status and OpenAI error fields each maps to.
Kept free of heavy imports: `eve-serve` starts its engine process before importing torch."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the model cannot answer, with the HTTP status and OpenAI error fields it maps to."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def __reduce__(self):  # across the engine process's pipe with every field (a subclass as itself)
        return RequestError, (self.message, self.param, self.status, self.code)


def as_request_error(err: BaseException) -> RequestError:
    """What the client is told of a failure: a RequestError as it is, anything else as a 500."""
    if isinstance(err, RequestError):
        return err
    return RequestError(f"generation failed: {type(err).__name__}: {err}", status=500, code="generation_failed")


class QueueFull(RequestError):
    def __init__(self, limit: int):
        super().__init__(f"the server is busy ({limit} requests waiting); retry later", status=503, code="server_busy")
