"""OpenAI-style API errors: every failure the server reports is an APIError,
answered as {"error": {"message", "type", "param", "code"}} with its status."""
from __future__ import annotations

__all__ = ["APIError", "bad_request", "error_body"]


class APIError(Exception):
    """An error answered to the client; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 naming the field: "messages[1].content: must be a string ..."."""
    text = f"{param}: {message}" if param else message
    return APIError(400, text, "invalid_request_error", param, code)
