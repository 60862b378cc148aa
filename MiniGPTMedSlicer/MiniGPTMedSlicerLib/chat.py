"""The panel's conversation about the image in a view: which image it is about, and how it is kept with its analysis.

A conversation belongs to one view showing one volume on one slice plane (:func:`view_key`); when any of those
changes, the next question starts a new conversation. Its turns are saved on the analysis' text node
(``MiniGPTMed.conversation``: :meth:`.conversation.Conversation.to_json`, with the view key beside it, and the
server's ``image_id`` of the image with its client-side digest), so a scene saved as ``.mrb`` and opened again gives
the conversation back (:func:`saved_conversation`) and its next question reuses the stored image when the view still
shows the same pixels (an id the server no longer knows costs one upload). No Qt, no Slicer app.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from . import protocol
from .conversation import Conversation

if TYPE_CHECKING:  # Slicer's MRML classes (the app's or slicer-core's); without stubs, mypy sees them as Any
    from slicer import vtkMRMLScene, vtkMRMLSliceLogic

    from .capture import CapturedSlice

#: The text node attributes (under markups.ATTR) that hold the conversation and the image it is about.
CONVERSATION_ATTR = "conversation"
CONVERSATION_KEY_ATTR = "conversation_key"
IMAGE_ID_ATTR = "image_id"  # the server's id of the image (a content hash of pixels and values)
IMAGE_DIGEST_ATTR = "image_digest"  # Conversation.digest() of that image: the image captured again must match it


#: The question box's one-line hint when the connected engine lists no free questions (Ask) among its tasks.
NO_FREE_QUESTIONS = "This engine answers no free questions; start a VLM engine (see docs/slicer-module.md)"


def ask_unavailable(tasks: Optional[Sequence[str]]) -> Optional[str]:
    """Why the question box (it sends Ask) cannot be used with an engine listing ``tasks`` (its health answer), or
    None when it can; ``tasks`` None: not known (not connected yet, or another URL since), the box stays usable."""
    if tasks is None or protocol.VQA.id in tasks:
        return None
    return NO_FREE_QUESTIONS


@dataclass
class ChatState:
    """The conversation going on in the panel."""

    view: str  # the slice view it is about
    key: str  # view_key() of that view when the image was captured
    conversation: Conversation
    captured: Optional[CapturedSlice]  # the image sent (None when restored from a scene: captured again when asked)
    folder_item: Optional[int]  # the analysis its answers (text, boxes) go under
    image_digest: str = ""  # restored from a scene: the digest of the image its conversation's image_id names


def _num(v: float, digits: int) -> str:
    s = f"{v:.{digits}f}"
    return "0" if float(s) == 0 else s  # -0.00 and 0.00 read the same


def view_key(view: str, slice_logic: vtkMRMLSliceLogic) -> str:
    """What the image of a view depends on for a conversation: the view, its volume, its slice plane (normal and
    offset). Panning and zooming keep the conversation (the answers are about the image that was sent, and its
    boxes are placed with that image's own geometry)."""
    from .scene import volume_of

    volume = volume_of(slice_logic)
    node = slice_logic.GetSliceNode()
    m = node.GetSliceToRAS()
    normal = [m.GetElement(i, 2) for i in range(3)]
    return "|".join(
        [
            view,
            volume.GetID() if volume is not None else "",
            " ".join(_num(v, 4) for v in normal),
            _num(float(slice_logic.GetSliceOffset()), 3),
        ]
    )


def text_attributes(state: ChatState) -> dict:
    """What is saved on the analysis' text node (markups.ATTR is prefixed there)."""
    conv = state.conversation
    return {
        CONVERSATION_ATTR: conv.to_json(),
        CONVERSATION_KEY_ATTR: state.key,
        IMAGE_ID_ATTR: conv.image_id or "",
        IMAGE_DIGEST_ATTR: conv.digest() if conv.image_id and conv.image else "",
    }


def saved_conversation(scene: vtkMRMLScene) -> Optional[ChatState]:
    """The newest conversation saved in the scene (e.g. one opened from a ``.mrb``), or None. A saved conversation
    that cannot be read is logged and skipped (the scene is left as it is)."""
    from . import markups as M

    for folder in reversed(M.list_results(scene)):
        node: Any = M.text_node_of(scene, folder)
        raw = node.GetAttribute(M.ATTR + CONVERSATION_ATTR) if node is not None else None
        if not raw:
            continue
        try:
            turns = Conversation.turns_from_json(raw)
        except (ValueError, TypeError, protocol.ProtocolError) as e:
            logging.warning(f"MiniGPT-Med: the conversation saved in {node.GetName()!r} cannot be read ({e})")
            continue
        key = node.GetAttribute(M.ATTR + CONVERSATION_KEY_ATTR) or ""
        volume_id = node.GetNodeReferenceID(M.VOLUME_ROLE)
        parts = key.split("|")
        if volume_id and len(parts) == 4:  # the volume's ID now (an added scene may have renumbered it)
            key = "|".join([parts[0], volume_id, *parts[2:]])
        view = key.split("|", 1)[0] if key else (node.GetAttribute(M.ATTR + "view") or "")
        image_id = node.GetAttribute(M.ATTR + IMAGE_ID_ATTR) or None
        digest = node.GetAttribute(M.ATTR + IMAGE_DIGEST_ATTR) or ""
        conv = Conversation(image="", image_id=image_id if digest else None, turns=turns)
        return ChatState(view, key, conv, None, folder, digest)
    return None
