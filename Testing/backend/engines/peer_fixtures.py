"""Tiny random peer VLMs built offline and saved as local folders, loaded by the hf engine exactly as real folders:
a MedGemma-like Gemma 3 (tiny SigLIP) with its Gemma3Processor, a Qwen2.5-VL and a Qwen3-VL (tokenizer + PIL
image processor)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TEXTS = [
    'The CT scan shows a hypodense lesion in the liver. Final Answer: ```json [{"box_2d": [100, 200, 300, 400], '
    '"label": "lesion"}] ```',
    "Describe this medical image in detail and list the findings. The lungs are clear. No acute abnormality.",
    "Locate every abnormality in the image. Output the result as a JSON list of objects, each with a bbox_2d.",
    'user model assistant system image nodule mass effusion pneumothorax 0 1 2 3 4 5 6 7 8 9 [ ] { } " : ,',
] * 4

GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in "
    "message['content'] %}{% if item['type'] == 'image' %}<start_of_image>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}"
    "<start_of_turn>model\n{% endif %}"
)

QWEN_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return tk


def build_medgemma(folder: Path) -> Path:
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    specials = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(specials),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )
    ip = Gemma3ImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA_CHAT)
    text_cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=32,
        max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vis_cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8
    )
    cfg = Gemma3Config(
        text_config=text_cfg,
        vision_config=vis_cfg,
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def _qwen_tokenizer():
    """A Qwen-style BPE with Qwen's special tokens and chat template; returns (tokenizer, special token ids)."""
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_bpe(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.chat_template = QWEN_CHAT
    return tok, {s: tok.convert_tokens_to_ids(s) for s in specials}


def build_qwen2_5_vl(folder: Path) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tok, ids = _qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(folder)
    return folder


def build_qwen3_vl(folder: Path) -> Path:
    """Qwen3-VL: 16 px patches, 2x2 merge, deepstack vision features, interleaved M-RoPE; same PIL processor path."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(0)
    tok, ids = _qwen_tokenizer()
    cfg = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1024,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
            bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=32 * 32 * 4,
        max_pixels=32 * 32 * 16,
    ).save_pretrained(folder)
    return folder


_CACHE: dict[str, Path] = {}


def peer_model(family: str) -> Path:
    """Built once per process in a temp folder."""
    if family not in _CACHE:
        root = Path(tempfile.mkdtemp(prefix=f"peer-{family}-"))
        os.makedirs(root, exist_ok=True)
        builders = {"medgemma": build_medgemma, "qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl}
        _CACHE[family] = builders[family](root)
    return _CACHE[family]


_SCRIPTED: dict[tuple[str, str, str], Path] = {}


def scripted_peer(family: str, answer: str, name: str | None = None) -> Path:
    """A copy of the tiny ``family`` folder (``name`` as its folder name) whose ``generation_config.json`` carries a
    transformers ``sequence_bias`` that makes greedy decoding write ``answer`` to any prompt: the real engine,
    processor, ``generate()`` and decoder run, and the answer is the one given. Built once per process."""
    key = (family, answer, name or family)
    if key not in _SCRIPTED:
        import shutil

        from scripted_answers import script_bias
        from transformers import AutoTokenizer, GenerationConfig

        dst = Path(tempfile.mkdtemp(prefix=f"scripted-{family}-")) / (name or family)
        shutil.copytree(peer_model(family), dst)
        tok = AutoTokenizer.from_pretrained(dst, local_files_only=True)
        ids = tok(answer, add_special_tokens=False).input_ids
        assert tok.decode(ids, skip_special_tokens=True) == answer
        gc = GenerationConfig.from_pretrained(dst, local_files_only=True)
        gc.sequence_bias = script_bias(ids, tok.eos_token_id)
        gc.save_pretrained(dst)
        _SCRIPTED[key] = dst
    return _SCRIPTED[key]
