"""``minigptmed-backend``: serve the API, or convert MiniGPT-Med weights.

minigptmed-backend serve [--engine auto|builtin|minigptmed|hf|openai] [--host HOST] [--port PORT]
minigptmed-backend convert --eva FILE --llama DIR --checkpoint FILE --out DIR [--merge-lora]
minigptmed-backend convert --for-vllm OUT --llama DIR --checkpoint FILE   (or --converted DIR)
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import replace

from MiniGPTMedSlicerLib.protocol import DEFAULT_HOST, DEFAULT_PORT

from . import __version__
from .setting_error import SettingError
from .settings import (
    LOOPBACK_HOSTS,
    TOKEN_ENV,
    ConvertSettings,
    EngineSettings,
    HFSettings,
    LlavaSettings,
    MiniGPTMedSettings,
    OpenAISettings,
    ServerSettings,
    XrayGPTSettings,
)

# Settings that may also come from the environment (a flag, when given, wins).
ENV = {
    "eva": "MINIGPTMED_EVA",
    "llama": "MINIGPTMED_LLAMA",
    "checkpoint": "MINIGPTMED_CHECKPOINT",
    "converted": "MINIGPTMED_CONVERTED",
    "model": "MINIGPTMED_MODEL",
    "url": "MINIGPTMED_OPENAI_URL",
    "api_key": "MINIGPTMED_OPENAI_API_KEY",
    "token": TOKEN_ENV,
    "static_decode": "MINIGPTMED_STATIC_DECODE",  # "1" turns it on
    "static_max_len": "MINIGPTMED_STATIC_MAX_LEN",
    "trust_checkpoints": "MINIGPTMED_TRUST_CHECKPOINTS",  # "1" turns it on
    "vllm": "MINIGPTMED_VLLM_URL",
}
# How a setting named in an error is written on this command line.
FLAGS = {
    "engine": "--engine",
    "eva": "--eva",
    "llama": "--llama",
    "checkpoint": "--checkpoint",
    "qformer": "--qformer",
    "converted": "--converted",
    "model_config": "--model-config",
    "vision_tower": "--vision-tower",
    "device": "--device",
    "dtype": "--dtype",
    "quantize": "--quantize",
    "sampling": "--sampling",
    "merge_lora": "--no-merge-lora",
    "static_decode": "--static-decode",
    "static_max_len": ENV["static_max_len"],
    "trust_checkpoints": f"--trust-checkpoints (or {ENV['trust_checkpoints']}=1)",
    "model": "--model",
    "family": "--family",
    "url": "--url",
    "api_key": "--api-key",
    "timeout_s": "--remote-timeout",
    "token": "--token",
    "out": "--out",
    "keep_lora": "--keep-lora",
    "vllm_url": "--vllm",
    "vllm_model": "--vllm-model",
    "for_vllm": "--for-vllm",
}


class StartupError(Exception):
    """A start-up failure that the command line reports in one line: the cause and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; each option's default shown (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def plain(doc: str | None) -> str:
    """A docstring as help text: no reStructuredText literals."""
    return (doc or "").replace("``", "")


ENV_HELP = "environment (a flag, when given, wins; --engine auto reads them to choose): " + ", ".join(
    f"{v} ({FLAGS[k].split()[0]})" if FLAGS.get(k, "").startswith("--") else f"{v} (no flag)" for k, v in ENV.items()
)


def flag_message(err: SettingError) -> str:
    """A setting error as this command line names it."""
    return err.render(FLAGS)


def add_model_arguments(p: argparse.ArgumentParser, convert: bool = False) -> None:
    """The engines' options; ``convert`` gets only the weight files, the model config, the dtype and the trust flag."""
    g = p.add_argument_group("MiniGPT-Med weights" if convert else "MiniGPT-Med engine (--engine minigptmed)")
    g.add_argument("--eva", help=f"eva_vit_g.pth (EVA ViT-g/14 weights; or set {ENV['eva']})")
    g.add_argument("--llama", help=f"Llama-2-7b-chat-hf folder (or set {ENV['llama']})")
    g.add_argument("--checkpoint", help=f"MiniGPT-Med checkpoint .pth (or set {ENV['checkpoint']})")
    g.add_argument(
        "--converted",
        help=f"a folder written by 'minigptmed-backend convert' (instead of the three files; or set {ENV['converted']})",
    )
    g.add_argument(
        "--model-config",
        default=None,
        help="JSON with model dimensions (tiny test models; a file with only 'vision' takes the LLM size from "
        "the LLaMA folder); default: the real 7B preset",
    )
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp16 on CUDA, fp32 on CPU)")
    g.add_argument(
        "--trust-checkpoints",
        action="store_true",
        help=f"allow .pth files that hold Python objects (only files you trust; or set {ENV['trust_checkpoints']}=1)",
    )
    if convert:
        g.add_argument(
            "--qformer",
            help="XrayGPT instead: blip2_pretrained_flant5xxl.pth; with --eva, --llama (the Vicuna folder), "
            "--checkpoint (XrayGPT's) and --out, writes a folder that the XrayGPT engine serves with --converted",
        )
        g.add_argument(
            "--bimedix2",
            metavar="DIR",
            help="BiMediX2 instead: its folder (MBZUAI/BiMediX2-8B) -> --out, a transformers "
            "LlavaForConditionalGeneration folder with its conv_llama3 chat template, for the hf engine or vLLM",
        )
        g.add_argument("--vision-tower", metavar="DIR", help="--bimedix2: a local copy of its CLIP tower")
        return
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
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
        help="preallocated KV cache with batch buckets 1, 2, 4, 8 and one CUDA graph per bucket, captured and warmed "
        f"at start (faster decode on a GPU; or set {ENV['static_decode']}=1)",
    )
    g.add_argument(
        "--image-cache-entries",
        type=int,
        default=32,
        help="images whose vision embeddings (minigptmed) or processed pixel values (hf: MedGemma, Qwen) are kept "
        "for follow-up questions (LRU; default 32; 0 = none)",
    )
    g.add_argument(
        "--image-cache-mb",
        type=int,
        default=256,
        help="total size of those embeddings in MiB (default 256; a 7B model's are 2 MiB an image)",
    )
    g.add_argument(
        "--vllm",
        metavar="URL",
        help="run the LLM on this vLLM server (vllm serve DIR --enable-prompt-embeds, DIR from convert --for-vllm): "
        f"only EVA, the projector and the embedding table load here; --api-key and --remote-timeout apply "
        f"(or set {ENV['vllm']})",
    )
    g.add_argument("--vllm-model", help="--vllm: the served model name (default: the first the server lists)")
    x = p.add_argument_group("XrayGPT engine (--engine xraygpt; also --eva, --llama = the Vicuna folder, --checkpoint)")
    x.add_argument("--qformer", help="blip2_pretrained_flant5xxl.pth (the BLIP-2 Q-Former, LAVIS release)")
    lv = p.add_argument_group(
        "LLaVA family (--engine llava): --family llava_rad: --model = the LLaVA-Rad folder (microsoft/llava-rad), "
        "--llama = its base LLM (lmsys/vicuna-7b-v1.5); --family bimedix2: --model = the BiMediX2 folder "
        "(MBZUAI/BiMediX2-8B); also --model-config, --device, --dtype"
    )
    lv.add_argument(
        "--vision-tower",
        metavar="DIR",
        help="bimedix2: a local copy of the CLIP tower its config.json names (openai/clip-vit-large-patch14-336), "
        "read as the authors' loader does; without it the tower saved in the folder's shards is used",
    )
    h = p.add_argument_group("transformers VLMs (--engine hf) and OpenAI-compatible servers (--engine openai)")
    h.add_argument("--model", help=f"hf: local model folder; openai: served model name (or set {ENV['model']})")
    h.add_argument(
        "--family",
        default="generic",
        choices=["medgemma", "qwen2_5_vl", "qwen3_vl", "medmo", "generic", "llava_rad", "bimedix2"],
        help="prompt format and box decoder of the model family (llava_rad, bimedix2: --engine llava only)",
    )
    h.add_argument("--url", help=f"openai: base URL, e.g. http://127.0.0.1:8000/v1 (or set {ENV['url']})")
    h.add_argument("--api-key", help=f"openai: API key of that server, if any (or set {ENV['api_key']})")
    h.add_argument("--remote-timeout", type=float, default=120.0, help="openai: seconds to wait for the remote server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minigptmed-backend", description=plain(__doc__), formatter_class=HelpFormatter, epilog=ENV_HELP
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the HTTP API", formatter_class=HelpFormatter, epilog=ENV_HELP)
    s.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "builtin", "minigptmed", "xraygpt", "llava", "hf", "openai"],
        help="auto: a configured VLM whose weights exist here, else builtin ('engines' lists what auto would pick)",
    )
    s.add_argument(
        "--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST}; any other needs a token)"
    )
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    s.add_argument("--token", default=None, help=f"access token (or set {TOKEN_ENV})")
    s.add_argument("--ssl-certfile", default=None)
    s.add_argument("--ssl-keyfile", default=None)
    s.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request before 504")
    s.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the engine before 503")
    s.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body before 413")
    s.add_argument("--max-image-side", type=int, default=8192, help="largest image side in pixels")
    s.add_argument(
        "--image-store-entries", type=int, default=64, help="uploaded images kept for image_id (LRU; then 410)"
    )
    s.add_argument("--image-store-mb", type=int, default=1024, help="their total decoded size in MiB (LRU)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_model_arguments(s)
    s.add_argument("--debug", action="store_true", help="show the traceback of a start-up failure")
    e = sub.add_parser(
        "engines",
        help="list the engines, whether each is usable here, and what auto would pick and why",
        formatter_class=HelpFormatter,
        epilog=ENV_HELP,
    )
    add_model_arguments(e)
    e.set_defaults(engine="auto", debug=False)
    c = sub.add_parser(
        "convert",
        help="write MiniGPT-Med weights as a safetensors folder that loads fast",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(c, convert=True)
    c.add_argument("--out", help="output folder")
    c.add_argument(
        "--for-vllm",
        metavar="OUT",
        help="instead: write the LoRA-merged LLaMA-2-7B-chat as a plain Hugging Face folder for vLLM "
        "(needs --llama and --checkpoint, or --converted)",
    )
    c.add_argument("--keep-lora", action="store_true", help="keep LoRA adapters separate instead of merging them")
    c.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return parser


def _value(args: argparse.Namespace, env: Mapping[str, str], name: str) -> str | None:
    """The flag's value when given, else the environment's."""
    v = getattr(args, name, None)
    return v if v is not None else env.get(ENV[name])


def _switch(args: argparse.Namespace, env: Mapping[str, str], name: str) -> bool:
    return bool(getattr(args, name, False)) or env.get(ENV[name]) == "1"


def engine_settings(args: argparse.Namespace, env: Mapping[str, str]) -> EngineSettings:
    model = _value(args, env, "model")
    return EngineSettings(
        engine=args.engine,
        minigptmed=MiniGPTMedSettings(
            eva=_value(args, env, "eva"),
            llama=_value(args, env, "llama"),
            checkpoint=_value(args, env, "checkpoint"),
            converted=_value(args, env, "converted"),
            model_config=args.model_config,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            sampling=args.sampling,
            merge_lora=not args.no_merge_lora,
            static_decode=_switch(args, env, "static_decode"),
            static_max_len=int(env.get(ENV["static_max_len"], "1024")),
            trust_checkpoints=_switch(args, env, "trust_checkpoints"),
            vllm_url=_value(args, env, "vllm"),
            vllm_model=args.vllm_model,
            vllm_api_key=_value(args, env, "api_key"),
            vllm_timeout_s=args.remote_timeout,
            cache_size=args.image_cache_entries,
            cache_bytes=args.image_cache_mb * 1024 * 1024,
        ),
        xraygpt=XrayGPTSettings(
            eva=_value(args, env, "eva"),
            qformer=args.qformer,
            llama=_value(args, env, "llama"),
            checkpoint=_value(args, env, "checkpoint"),
            converted=_value(args, env, "converted"),
            model_config=args.model_config,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            trust_checkpoints=_switch(args, env, "trust_checkpoints"),
        ),
        llava=LlavaSettings(
            model=model,
            llama=_value(args, env, "llama"),
            family="llava_rad" if args.family == "generic" else args.family,
            vision_tower=getattr(args, "vision_tower", None),
            model_config=args.model_config,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            trust_checkpoints=_switch(args, env, "trust_checkpoints"),
        ),
        hf=HFSettings(
            model=model,
            family=args.family,
            device=args.device,
            dtype=args.dtype,
            quantize=args.quantize,
            cache_size=args.image_cache_entries,
            cache_bytes=args.image_cache_mb * 1024 * 1024,
        ),
        openai=OpenAISettings(
            url=_value(args, env, "url"),
            model=model,
            family=args.family,
            api_key=_value(args, env, "api_key"),
            timeout_s=args.remote_timeout,
        ),
    )


def server_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ServerSettings:
    from .images import ImageLimits

    token = _value(args, env, "token") or None
    if args.host not in LOOPBACK_HOSTS and not token:
        raise StartupError(
            f"refusing to listen on {args.host} without an access token: anyone who can reach this "
            f"address could send images. Pass --token or set {TOKEN_ENV}, or bind to 127.0.0.1."
        )
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise StartupError("--ssl-certfile and --ssl-keyfile go together: pass both or neither")
    if not 0 <= args.port <= 65535:
        raise StartupError(f"--port {args.port} is out of range: use 1-65535 (0 picks a free port)")
    return ServerSettings(
        host=args.host,
        port=args.port,
        token=token,
        request_timeout_s=args.request_timeout,
        queue_size=args.queue_size,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        image_limits=ImageLimits(max_side=args.max_image_side),
        image_store_entries=args.image_store_entries,
        image_store_bytes=args.image_store_mb * 1024 * 1024,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


def convert_settings(args: argparse.Namespace, env: Mapping[str, str]) -> ConvertSettings:
    return ConvertSettings(
        eva=_value(args, env, "eva"),
        llama=_value(args, env, "llama"),
        checkpoint=_value(args, env, "checkpoint"),
        out=args.out or "",
        model_config=args.model_config,
        dtype=args.dtype,
        keep_lora=args.keep_lora,
        trust_checkpoints=_switch(args, env, "trust_checkpoints"),
        for_vllm=args.for_vllm,
        converted=_value(args, env, "converted"),
        qformer=args.qformer,
        bimedix2=args.bimedix2,
        vision_tower=args.vision_tower,
    )


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen before anything slow happens, so that a taken port fails at once, not after the engine loads."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise StartupError(f"--host {host}: not a known address ({e.strerror}); pass --host {DEFAULT_HOST}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use (another backend running?): stop it or pass --port N"
            ) from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"--host {host} is not an address of this machine; pass --host {DEFAULT_HOST}") from None
        if e.errno == errno.EACCES:
            raise StartupError(
                f"port {port} needs privileges on this machine; pass --port {DEFAULT_PORT} (or above 1023)"
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(server: ServerSettings, engines: EngineSettings, log_level: str = "info") -> int:
    import uvicorn

    from .app import create_app
    from .engines import build_engine

    log = logging.getLogger("minigptmed")
    sock = listen_socket(server.host, server.port)
    port = int(sock.getsockname()[1])
    scheme = "https" if server.ssl_certfile else "http"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info("listening on %s://%s:%d", scheme, server.host, port)

    try:
        engine = build_engine(engines)
        app = create_app(engine, server)
        app.state.service.start()  # loads the engine here, so a failure is ours to report (the lifespan skips it)
        config = uvicorn.Config(
            app,
            host=server.host,
            port=port,
            log_level=log_level,
            access_log=False,
            ssl_certfile=server.ssl_certfile,
            ssl_keyfile=server.ssl_keyfile,
            timeout_graceful_shutdown=5,
        )
        uv = Server(config)
        uv.run(sockets=[sock])
    finally:
        sock.close()
    err = getattr(app.state, "start_error", None)
    if isinstance(err, SettingError):
        raise err
    return 0 if uv.started else 3  # 3: uvicorn's start-up failure


def list_engines(settings: EngineSettings) -> int:
    """What each engine needs, whether it is usable on this machine, and what auto would pick."""
    import importlib.util

    from .engines import choose_engine

    def have(*mods: str) -> list[str]:
        return [m for m in mods if importlib.util.find_spec(m) is None]

    m, x, hf, oa = settings.minigptmed, settings.xraygpt, settings.hf, settings.openai
    lv = settings.llava
    three = [f for f in (m.eva, m.llama, m.checkpoint) if f]
    weights = (
        f"converted folder {m.converted}" + ("" if os.path.isdir(m.converted) else " (missing)")
        if m.converted
        else f"{len(three)} of 3 weight files set"
        + (f", missing: {[f for f in three if not os.path.exists(f)]}" if three else "")
    )
    ok_m = bool(m.converted and os.path.isdir(m.converted)) or (
        len(three) == 3 and all(os.path.exists(f) for f in three)
    )
    xfiles = [f for f in (x.eva, x.qformer, x.llama, x.checkpoint) if f]
    rows = [
        ("builtin", True, "rule-based, no weights; always usable"),
        ("minigptmed", ok_m and not have("torch"), f"{weights}; packages missing: {have('torch') or 'none'}"),
        (
            "xraygpt",
            (
                bool(x.converted and os.path.isdir(x.converted))
                or (len(xfiles) == 4 and all(map(os.path.exists, xfiles)))
            )
            and not have("torch"),
            f"converted folder {x.converted}"
            if x.converted
            else f"{len(xfiles)} of 4 weight files set (--eva, --qformer, --llama, --checkpoint)",
        ),
        (
            "llava",
            bool(
                lv.model
                and os.path.isdir(lv.model)
                and (lv.family == "bimedix2" or (lv.llama and os.path.isdir(lv.llama)))
            )
            and not have("torch"),
            f"--family {lv.family}: --model (the BiMediX2 folder) " + ("set" if lv.model else "not set")
            if lv.family == "bimedix2"
            else f"--family {lv.family}: --model (the LLaVA-Rad folder) and --llama (its base LLM) "
            + ("set" if lv.model and lv.llama else "not both set"),
        ),
        (
            "hf",
            bool(hf.model and os.path.isdir(hf.model)) and not have("torch", "transformers"),
            f"model folder {hf.model or 'not set'}"
            + (" (missing)" if hf.model and not os.path.isdir(hf.model) else "")
            + f"; packages missing: {have('torch', 'transformers') or 'none'}",
        ),
        (
            "openai",
            bool(oa.url and oa.model),
            f"url {oa.url or 'not set'}, model {oa.model or 'not set'} (not contacted)",
        ),
    ]
    for name, usable, why in rows:
        print(f"{name:<11} {'usable' if usable else 'not usable':<11} {why}")
    pick, reason = choose_engine(replace(settings, engine="auto"))
    print(f"auto picks: {pick} ({reason})")
    return 0


def convert(s: ConvertSettings) -> int:
    from .minigpt.config import MiniGPTMedConfig
    from .minigpt.convert import convert as convert_files
    from .minigpt.weights import WeightsError
    from .torch_utils import parse_dtype

    if s.for_vllm:
        return convert_for_vllm(s)
    if s.qformer:
        return convert_xraygpt(s)
    if s.bimedix2:
        return convert_bimedix2(s)
    if not s.out:
        raise SettingError("convert needs {out} (or {for_vllm})", "out", "for_vllm")
    missing = [k for k in ("eva", "llama", "checkpoint") if not getattr(s, k)]
    if missing:
        raise SettingError("convert needs " + ", ".join("{" + k + "}" for k in missing), *missing)
    cfg = MiniGPTMedConfig.from_json(s.model_config)
    dtype = parse_dtype(s.dtype)
    try:
        res = convert_files(
            s.eva or "",
            s.llama or "",
            s.checkpoint or "",
            s.out,
            cfg,
            keep_lora=s.keep_lora,
            dtype=dtype,
            trust_checkpoints=s.trust_checkpoints,
        )
    except SettingError:
        raise
    except WeightsError as e:
        raise StartupError(f"convert failed: {e}") from None
    print(f"wrote {res['out']} in {res['seconds']:.1f} s (LoRA {res['lora']}, LLM {res['llm_dtype']})")
    return 0


def convert_bimedix2(s: ConvertSettings) -> int:
    from .llava.bimedix2_config import read_bimedix2_config
    from .llava.bimedix2_convert import convert_to_llava_hf
    from .llava.config import LlavaConfigError
    from .minigpt.weights import WeightsError
    from .torch_utils import parse_dtype

    if not s.out:
        raise SettingError("convert --bimedix2 needs {out}", "out")
    try:
        cfg = read_bimedix2_config(s.bimedix2 or "", s.model_config, s.vision_tower)
        res = convert_to_llava_hf(s.bimedix2 or "", s.out, cfg, parse_dtype(s.dtype) or _bf16())
    except (LlavaConfigError, WeightsError, FileNotFoundError) as e:
        raise StartupError(f"convert failed: {e}") from None
    print(
        f"wrote {res['out']} in {res['seconds']:.1f} s (LlavaForConditionalGeneration, {res['tensors']} tensors, "
        f"image placeholder {res['image_token']})"
    )
    return 0


def _bf16():
    import torch

    return torch.bfloat16


def convert_xraygpt(s: ConvertSettings) -> int:
    from .minigpt.weights import WeightsError
    from .torch_utils import parse_dtype
    from .xraygpt.config import XrayGPTConfig
    from .xraygpt.convert import convert as convert_files

    missing = [k for k in ("eva", "llama", "checkpoint", "out") if not getattr(s, k)]
    if missing:
        raise SettingError("convert --qformer (XrayGPT) needs " + ", ".join("{" + k + "}" for k in missing), *missing)
    try:
        cfg = XrayGPTConfig.from_json(s.model_config)
    except (OSError, ValueError) as e:
        raise SettingError("{model_config} " + f"{s.model_config}: {e}", "model_config") from e
    try:
        res = convert_files(
            s.eva or "",
            s.qformer or "",
            s.llama or "",
            s.checkpoint or "",
            s.out,
            cfg,
            dtype=parse_dtype(s.dtype),
            trust_checkpoints=s.trust_checkpoints,
        )
    except SettingError:
        raise
    except WeightsError as e:
        raise StartupError(f"convert failed: {e}") from None
    print(f"wrote {res['out']} in {res['seconds']:.1f} s (XrayGPT, LLM {res['llm_dtype']})")
    return 0


def convert_for_vllm(s: ConvertSettings) -> int:
    from .minigpt.config import MiniGPTMedConfig
    from .minigpt.vllm_export import export_for_vllm
    from .minigpt.weights import WeightsError
    from .torch_utils import parse_dtype

    if not s.converted and not (s.llama and s.checkpoint):
        missing = [k for k in ("llama", "checkpoint") if not getattr(s, k)]
        raise SettingError(
            "convert {for_vllm} needs " + " and ".join("{" + k + "}" for k in missing) + " (or {converted})",
            *missing,
            "converted",
        )
    try:
        res = export_for_vllm(
            str(s.for_vllm),
            llama=s.llama,
            checkpoint=s.checkpoint,
            converted=s.converted,
            cfg=None if s.converted else MiniGPTMedConfig.from_json(s.model_config),
            dtype=parse_dtype(s.dtype),
            trust_checkpoints=s.trust_checkpoints,
        )
    except WeightsError as e:
        print(f"minigptmed-backend: convert --for-vllm failed: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {res['out']} in {res['seconds']:.1f} s (LLaMA {res['dtype']}, LoRA merged into "
        f"{res['lora_merged']} projections); serve it with: vllm serve {res['out']} --enable-prompt-embeds"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    env = os.environ
    try:
        if args.command == "serve":
            return serve(server_settings(args, env), engine_settings(args, env), args.log_level)
        if args.command == "convert":
            return convert(convert_settings(args, env))
        if args.command == "engines":
            return list_engines(engine_settings(args, env))
    except SettingError as e:
        if args.debug:
            raise
        print(f"minigptmed-backend: {flag_message(e)}", file=sys.stderr)
        return 2
    except StartupError as e:
        if args.debug:
            raise
        print(f"minigptmed-backend: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # any other start-up failure: one line, the traceback behind --debug
        if args.debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"minigptmed-backend: {args.command} failed: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
