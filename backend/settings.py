"""Server settings: one typed dataclass, filled from the command line (``backend.cli``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .images import ImageLimits

TOKEN_ENV = "MINIGPTMED_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <token>"
    max_body_bytes: int = 32 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_new_tokens_cap: int = 1024
    default_max_new_tokens: int = 300
    request_timeout_s: float = 300.0
    queue_size: int = 16  # requests waiting for the engine; beyond this the server answers 503 + Retry-After
    max_batch_items: int = 64
    max_question_chars: int = 2000
    max_prompt_chars: int = 8000
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
