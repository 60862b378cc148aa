"""Typed settings: the server's and one dataclass per engine. ``backend.cli`` builds them once from the command line
and the environment; nothing below it reads ``os.environ`` or an argparse namespace."""

from __future__ import annotations

from dataclasses import dataclass, field

from MiniGPTMedSlicerLib.protocol import DEFAULT_HOST, DEFAULT_PORT

from .images import ImageLimits

TOKEN_ENV = "MINIGPTMED_TOKEN"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None  # when set, every endpoint but /health needs "Authorization: Bearer <token>"
    max_body_bytes: int = 32 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    max_new_tokens_cap: int = 1024
    request_timeout_s: float = 300.0
    queue_size: int = 16  # requests waiting for the engine; beyond this the server answers 503 + Retry-After
    batch_window_s: float = 0.002  # an idle engine waits this long for requests sent together (dynamic batching)
    max_batch_items: int = 64
    max_question_chars: int = 2000
    max_prompt_chars: int = 8000
    max_history_turns: int = 32  # earlier turns a request may carry (400 beyond)
    max_history_chars: int = 32000  # their questions and answers together (413 beyond)
    image_store_entries: int = 64  # images kept for image_id (POST /v1/images; LRU)
    image_store_bytes: int = 1024 * 1024 * 1024  # and their decoded size
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


@dataclass(frozen=True)
class BuiltinSettings:
    """The built-in engine's limits (its thresholds are documented constants in backend/ct_analysis)."""

    max_nodule_candidates: int = 8  # per slice, strongest first
    max_lesion_candidates: int = 4
    workers: int = 0  # slices of one batch analysed at once, one ITK thread each (0: one per CPU core)


@dataclass(frozen=True)
class MiniGPTMedSettings:
    eva: str | None = None  # eva_vit_g.pth
    llama: str | None = None  # Llama-2-7b-chat-hf folder
    checkpoint: str | None = None  # MiniGPT-Med checkpoint .pth
    converted: str | None = None  # a folder written by ``minigptmed-backend convert`` (instead of the three files)
    model_config: str | None = None  # JSON with model dimensions (tiny test models); None: the real 7B preset
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # none / 8bit / 4bit
    sampling: str = "greedy"  # greedy / demo
    merge_lora: bool = True
    static_decode: bool = False  # static KV cache (+ CUDA graphs on CUDA)
    static_max_len: int = 1024  # longer requests fall back to the dynamic cache
    trust_checkpoints: bool = False  # allow torch.load(weights_only=False) for checkpoints that need it
    max_batch: int = 8
    cache_size: int = 32  # images whose EVA + projector embeddings are kept (LRU)
    cache_bytes: int = 256 * 1024 * 1024  # and their total size (a real 7B embedding is 256 x 4096 fp16 = 2 MiB)
    seed: int | None = None
    vllm_url: str | None = None  # the LLM runs on this vLLM server (prompt embeddings); only vision + embeddings here
    vllm_model: str | None = None  # its served model name; None: the first it lists
    vllm_api_key: str | None = None
    vllm_timeout_s: float = 120.0


@dataclass(frozen=True)
class HFSettings:
    model: str | None = None  # a local model folder
    family: str = "generic"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    default_max_tokens: int = 512
    max_batch: int = 4
    cache_size: int = 32  # MedGemma, Qwen families: images whose processed pixel values are kept (LRU)
    cache_bytes: int = 256 * 1024 * 1024  # and their total size


@dataclass(frozen=True)
class OpenAISettings:
    url: str | None = None  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # served model name; None: the first the server lists
    family: str = "generic"
    api_key: str | None = None
    timeout_s: float = 120.0
    max_concurrency: int = 8
    default_max_tokens: int = 512


@dataclass(frozen=True)
class XrayGPTSettings:
    """XrayGPT (MiniGPT-4 v1): its four released files."""

    eva: str | None = None  # eva_vit_g.pth (the same file as MiniGPT-Med's)
    qformer: str | None = None  # blip2_pretrained_flant5xxl.pth (LAVIS): Q-Former, query tokens, ln_vision
    llama: str | None = None  # the Vicuna radiology folder
    checkpoint: str | None = None  # the XrayGPT checkpoint .pth (llama_proj)
    converted: str | None = None  # a folder written by ``convert --qformer ...`` (instead of the four files)
    model_config: str | None = None  # JSON with model dimensions (tiny test models); None: the real model
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"  # none / 8bit / 4bit (the LLM, bitsandbytes)
    trust_checkpoints: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class LlavaSettings:
    """The LLaVA family (``--engine llava``): LLaVA-Rad from its released folder and its base LLM, or BiMediX2
    from its merged folder (and, optionally, a local copy of its CLIP tower)."""

    model: str | None = (
        None  # llava_rad: microsoft/llava-rad (config.json, LoRA, projector, tower); bimedix2: the folder
    )
    llama: str | None = None  # llava_rad: the base LLM folder (lmsys/vicuna-7b-v1.5)
    family: str = "llava_rad"  # llava_rad / bimedix2
    vision_tower: str | None = None  # bimedix2: a local copy of the CLIP checkpoint config.json's mm_vision_tower names
    model_config: str | None = None  # JSON overriding the tower's dimensions (tiny test models)
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    trust_checkpoints: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class EngineSettings:
    """Which engine (``auto`` resolves with ``backend.engines.choose_engine``) and every engine's settings."""

    engine: str = "auto"
    builtin: BuiltinSettings = field(default_factory=BuiltinSettings)
    minigptmed: MiniGPTMedSettings = field(default_factory=MiniGPTMedSettings)
    hf: HFSettings = field(default_factory=HFSettings)
    openai: OpenAISettings = field(default_factory=OpenAISettings)
    xraygpt: XrayGPTSettings = field(default_factory=XrayGPTSettings)
    llava: LlavaSettings = field(default_factory=LlavaSettings)


@dataclass(frozen=True)
class ConvertSettings:
    """``minigptmed-backend convert``: the three original files -> one folder."""

    eva: str | None = None
    llama: str | None = None
    checkpoint: str | None = None
    out: str = ""
    model_config: str | None = None
    dtype: str = "auto"
    keep_lora: bool = False
    trust_checkpoints: bool = False
    for_vllm: str | None = None  # write the LoRA-merged LLM as a plain HF LLaMA folder here (for vLLM) instead
    converted: str | None = None  # for_vllm from a converted folder instead of the original files
    qformer: str | None = None  # set: convert XrayGPT's four files (eva, qformer, llama = Vicuna, checkpoint)
    bimedix2: str | None = None  # set: BiMediX2's folder -> a transformers LlavaForConditionalGeneration folder (out)
    vision_tower: str | None = None  # bimedix2: a local copy of its CLIP tower (else the shards' copy)
