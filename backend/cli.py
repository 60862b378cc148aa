"""``minigptmed-backend``: serve the API, or convert MiniGPT-Med weights.

minigptmed-backend serve [--engine auto|builtin|minigptmed|hf|openai] [--host 127.0.0.1] [--port 8765]
minigptmed-backend convert --eva FILE --llama DIR --checkpoint FILE --out DIR [--merge-lora]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .settings import LOOPBACK_HOSTS, TOKEN_ENV, ServerSettings


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("MiniGPT-Med engine (--engine minigptmed)")
    g.add_argument("--eva", default=_env("MINIGPTMED_EVA"), help="eva_vit_g.pth (EVA ViT-g/14 weights)")
    g.add_argument("--llama", default=_env("MINIGPTMED_LLAMA"), help="Llama-2-7b-chat-hf folder")
    g.add_argument("--checkpoint", default=_env("MINIGPTMED_CHECKPOINT"), help="MiniGPT-Med checkpoint .pth")
    g.add_argument(
        "--converted",
        default=_env("MINIGPTMED_CONVERTED"),
        help="a folder written by 'minigptmed-backend convert' (instead of the three files)",
    )
    g.add_argument(
        "--model-config",
        default=None,
        help="JSON with model dimensions (tiny test models); default: the real 7B preset",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp16 on CUDA, fp32 on CPU)")
    g.add_argument(
        "--quantize",
        choices=["none", "8bit", "4bit"],
        default="none",
        help="bitsandbytes quantisation of the LLM (CUDA)",
    )
    g.add_argument(
        "--sampling",
        choices=["greedy", "demo"],
        default="greedy",
        help="greedy (the benchmark settings, default) or the original demo's sampling settings",
    )
    g.add_argument(
        "--no-merge-lora", action="store_true", help="keep the LoRA adapters unmerged (slower; for checking)"
    )
    g.add_argument(
        "--static-decode",
        action="store_true",
        help="static KV cache + CUDA-graph decode step (about 3.5x faster decode on a GPU; compiles at start)",
    )
    h = p.add_argument_group("transformers VLMs (--engine hf) and OpenAI-compatible servers (--engine openai)")
    h.add_argument(
        "--model", default=_env("MINIGPTMED_MODEL"), help="hf: local model folder; openai: served model name"
    )
    h.add_argument(
        "--family",
        default="generic",
        choices=["medgemma", "qwen2_5_vl", "qwen3_vl", "generic"],
        help="prompt format and box decoder of the model family",
    )
    h.add_argument(
        "--url", default=_env("MINIGPTMED_OPENAI_URL"), help="openai: base URL, e.g. http://127.0.0.1:8000/v1"
    )
    h.add_argument(
        "--api-key", default=_env("MINIGPTMED_OPENAI_API_KEY"), help="openai: API key of that server, if any"
    )
    h.add_argument("--remote-timeout", type=float, default=120.0, help="openai: seconds to wait for the remote server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigptmed-backend", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP API")
    s.add_argument("--engine", default="auto", choices=["auto", "builtin", "minigptmed", "hf", "openai"])
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs a token)")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--token", default=None, help=f"access token (or set {TOKEN_ENV})")
    s.add_argument("--ssl-certfile", default=None)
    s.add_argument("--ssl-keyfile", default=None)
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request before 504")
    s.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the engine before 503")
    s.add_argument("--max-body-mb", type=float, default=32.0)
    s.add_argument("--max-image-side", type=int, default=8192)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_model_arguments(s)
    c = sub.add_parser("convert", help="write MiniGPT-Med weights as a safetensors folder that loads fast")
    add_model_arguments(c)
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--keep-lora", action="store_true", help="keep LoRA adapters separate instead of merging them")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from .images import ImageLimits

    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.host not in LOOPBACK_HOSTS and not token:
        raise SystemExit(
            f"refusing to listen on {args.host} without an access token: anyone who can reach this "
            f"address could send images. Pass --token or set {TOKEN_ENV}, or bind to 127.0.0.1."
        )
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise SystemExit("--ssl-certfile and --ssl-keyfile go together")
    return ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        request_timeout_s=args.request_timeout,
        queue_size=args.queue_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        image_limits=ImageLimits(max_side=args.max_image_side),
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .engines import build_engine

    settings = settings_from_args(args)
    engine = build_engine(args)
    app = create_app(engine, settings)
    logging.getLogger("minigptmed").info(
        "listening on %s://%s:%d", "https" if settings.ssl_certfile else "http", settings.host, settings.port
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        timeout_graceful_shutdown=5,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return serve(args)
    if args.command == "convert":
        from .minigpt.convert import convert_main

        return convert_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
