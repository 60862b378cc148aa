"""The MiniGPTMedSlicer model service: one wire protocol (``MiniGPTMedSlicerLib.protocol``), several engines."""

__version__ = "0.1.0"
