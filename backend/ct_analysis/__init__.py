"""Classical CT analysis on Hounsfield units: pure functions over (H, W) float arrays of one slice.

Used by the built-in engine. Arrays are top row first (the request image's own pixel grid); the pixel spacing is
``(row, col)`` in mm. Every threshold is a named, documented constant in the module that uses it:

* :mod:`.tissue`: the tissue map (body, air, lung fields, fat, fluid, soft tissue, enhanced/bone).
* :mod:`.nodules`: lung nodule candidates inside the lung fields (multiscale LoG blobs + Hessian objectness).
* :mod:`.lesions`: focal hypo/hyperdense lesion candidates inside solid soft-tissue organs.
* :mod:`.measure`: region measurements (HU statistics, composition, area, long/short axis).
* :mod:`.vocabulary`: what ``ground`` can locate and the phrases (synonyms) that name it.

Rule-based candidates, not a diagnosis.
"""
