"""A stand-in for ``vllm serve DIR --enable-prompt-embeds`` (vLLM cannot run here: no GPU, no vLLM wheel for CPU):
vLLM's ``/v1/models`` and ``/v1/completions`` with ``prompt_embeds`` on a real socket.

It reads ``prompt_embeds`` the way vLLM's ``safe_load_prompt_embeds`` does (strict base64, ``torch.load`` with
``weights_only=True`` on the CPU, dense, a leading dim of 1 squeezed, 2-D, the model's hidden size; 400 with a message
otherwise), additionally insists on the served dtype, records every tensor it received, and answers with
transformers' greedy ``generate(inputs_embeds=...)`` on the folder ``convert --for-vllm`` wrote: ``token_ids`` (with
the EOS when it stopped there, as vLLM), ``text``, ``finish_reason``.

With ``"stream": true`` it answers as vLLM's ``completion_stream_generator`` does (v0.10.2 on): HTTP/1.1 chunked
``text/event-stream``, one ``text_completion`` event per generated token (``choices[0].text`` the new text,
``token_ids`` the new id when ``return_token_ids``, ``finish_reason`` on the last), a usage event (``choices: []``)
when ``stream_options.include_usage`` asks, then ``data: [DONE]``; the prompt embeddings are checked first as above.
``hold_after=N`` (set by the test, reset by :meth:`hold`) waits after N pieces until ``release`` is set, watching the
socket meanwhile: the client closing the connection sets ``disconnected`` and ends the stream (vLLM then aborts the
request); ``sent`` counts the pieces written by the last stream; ``fail_after=N`` sends N pieces then vLLM's
mid-stream error event.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from pathlib import Path

from loopback_http import DONE_EVENT, FAILED_MIDSTREAM, EventStreamHandler, LoopbackServer, event, wait_for_release


class VLLMStandIn(LoopbackServer):
    def __init__(self, folder: Path, served_name: str = "minigptmed-llm"):
        import sentencepiece as spm
        import torch
        from transformers import LlamaForCausalLM

        self.folder = Path(folder)
        self.served_name = served_name
        self.llm = LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
        self.dtype = self.llm.get_input_embeddings().weight.dtype
        self.hidden = int(self.llm.config.hidden_size)
        self.eos_id = int(self.llm.generation_config.eos_token_id)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.folder / "tokenizer.model"))
        self.received: list = []  # tensors as decoded
        self.bodies: list[dict] = []
        self.fail_with: tuple[int, dict] | None = None  # (status, body) to answer instead of generating
        self.script: str | None = None  # a text to answer instead of generating (the prompt is still checked)
        self.lock = threading.Lock()
        self._torch = torch
        self.hold(None)
        super().__init__(self._handler())

    def hold(self, after: int | None, fail_after: int | None = None) -> None:
        """Pause the next streams after ``after`` pieces until :attr:`release` is set (None: never); fail them after
        ``fail_after`` pieces."""
        self.hold_after, self.fail_after = after, fail_after
        self.release = threading.Event()
        self.disconnected = threading.Event()
        self.sent = 0

    def __exit__(self, *exc) -> None:
        self.release.set()
        super().__exit__(*exc)

    # -- what vLLM does with a request ---------------------------------------------------------------------------

    def load_prompt_embeds(self, embed: str):
        torch = self._torch
        try:
            raw = base64.b64decode(embed, validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise ValueError(f"prompt_embeds is not base64: {e}") from None
        try:
            t = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        except Exception as e:
            raise ValueError(f"prompt_embeds could not be loaded: {type(e).__name__}") from None
        if not isinstance(t, torch.Tensor):
            raise ValueError("`prompt_embeds` payload did not deserialize to a torch.Tensor.")
        t = t.to_dense()
        if t.dim() > 2:
            t = t.squeeze(0)
        if t.dim() != 2:
            raise ValueError(
                f"`prompt_embeds` must be a 2D tensor of shape (num_tokens, hidden_size); got {tuple(t.shape)}."
            )
        if t.shape[1] != self.hidden:
            raise ValueError(f"`prompt_embeds` hidden_size {t.shape[1]} does not match the model's {self.hidden}.")
        if t.dtype != self.dtype:
            raise ValueError(f"`prompt_embeds` dtype {t.dtype} is not the served dtype {self.dtype}")
        return t

    def complete(self, body: dict) -> tuple[int, dict] | tuple[object, list[int], str]:
        """A checked request -> (the prompt tensor, the generated ids with the EOS when it stopped there, the finish
        reason), or (status, error body)."""
        torch = self._torch
        if self.fail_with is not None:
            return self.fail_with
        if "prompt_embeds" not in body or not isinstance(body["prompt_embeds"], str):
            return 400, _error("Either prompt or prompt_embeds must be provided and non-empty.")
        if body.get("model") not in (None, self.served_name):
            return 404, _error(f"The model `{body.get('model')}` does not exist.")
        try:
            t = self.load_prompt_embeds(body["prompt_embeds"])
        except ValueError as e:
            return 400, _error(str(e))
        max_tokens = int(body.get("max_tokens", 16))
        if body.get("temperature") is None or float(body["temperature"]) != 0.0:
            return 400, _error("this stand-in only answers greedily (temperature 0)")
        with self.lock:
            self.received.append(t)
            self.bodies.append(body)
            if self.script is not None:
                return t, [*self.sp.encode(self.script), self.eos_id], "stop"
            with torch.inference_mode():
                out = self.llm.generate(
                    inputs_embeds=t[None],
                    attention_mask=torch.ones(1, t.shape[0], dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    eos_token_id=None if body.get("ignore_eos") else self.eos_id,
                    pad_token_id=self.eos_id,
                )
        ids = [int(i) for i in out[0].tolist()]
        if not body.get("ignore_eos") and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id) + 1]
        finish = "stop" if (ids and ids[-1] == self.eos_id and not body.get("ignore_eos")) else "length"
        return t, ids, finish

    def stream_events(self, t, ids: list[int], finish: str, body: dict, gone):
        """The events' bytes in the order they are written, one generated token each; ``gone()`` says whether the
        client closed the connection."""
        base = {"id": f"cmpl-{len(self.bodies)}", "object": "text_completion", "created": int(time.time())}
        base["model"] = self.served_name
        self.sent = 0
        text = ""
        for k, tok in enumerate(ids):
            if k == self.hold_after and wait_for_release(self.release, gone):
                self.disconnected.set()
                return
            if k == self.fail_after:
                yield from FAILED_MIDSTREAM
                return
            now = self.sp.decode([i for i in ids[: k + 1] if i != self.eos_id])
            choice: dict = {"index": 0, "text": now[len(text) :], "logprobs": None}
            choice["finish_reason"] = finish if k == len(ids) - 1 else None
            if body.get("return_token_ids"):
                choice["token_ids"] = [tok]
            text = now
            self.sent = k + 1  # counted before the write: the client may read it before this thread runs on
            yield event({**base, "choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": t.shape[0], "completion_tokens": len(ids), "total_tokens": t.shape[0] + len(ids)}
            yield event({**base, "choices": [], "usage": usage})
        yield DONE_EVENT

    def _answer(self, t, ids: list[int], finish: str, body: dict) -> dict:
        text = self.sp.decode([i for i in ids if i != self.eos_id])
        choice: dict = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        if body.get("return_token_ids"):
            choice["token_ids"] = ids
        return {
            "id": f"cmpl-{len(self.bodies)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": [choice],
            "usage": {
                "prompt_tokens": t.shape[0],
                "completion_tokens": len(ids),
                "total_tokens": t.shape[0] + len(ids),
            },
        }

    def _handler(self):
        standin = self

        class Handler(EventStreamHandler):
            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self.send_json(200, {"object": "list", "data": [{"id": standin.served_name, "object": "model"}]})
                else:
                    self.send_json(404, _error("not found"))

            def do_POST(self):
                try:
                    body = self.read_json()
                except ValueError:
                    self.send_json(400, _error("body is not JSON"))
                    return
                if self.path.rstrip("/") != "/v1/completions":
                    self.send_json(404, _error("not found"))
                    return
                out = standin.complete(body)
                if len(out) == 2:  # an error, or the scripted fail_with reply
                    self.send_json(*out)
                elif not body.get("stream"):
                    self.send_json(200, standin._answer(*out, body))
                else:
                    self.start_event_stream()
                    try:
                        for data in standin.stream_events(*out, body, self.client_gone):
                            self.write_chunk(data)
                        self.end_event_stream()
                    except (BrokenPipeError, ConnectionResetError):
                        standin.disconnected.set()
                        self.close_connection = True

        return Handler


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
