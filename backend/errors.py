"""Errors the service answers with, in the protocol's one error shape."""

from __future__ import annotations

from MiniGPTMedSlicerLib.protocol import ERROR_STATUS


class ApiError(Exception):
    """An error with an HTTP status and a message fit for the user. Never carries a stack trace."""

    def __init__(self, code: str, message: str, status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else ERROR_STATUS[code]
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}
