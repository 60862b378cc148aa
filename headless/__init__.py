"""The headless tools: the ``minigptmed-slicer`` runner, ``make demo`` and the sweep driver, on Slicer's own MRML
(PyPI ``slicer-core``) without the Slicer app. They use the module's Qt-free core (``MiniGPTMedSlicerLib``) and may
start the backend's built-in engine behind a loopback server; nothing here ships in the Slicer extension."""
