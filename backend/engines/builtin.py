"""The built-in engine: classical CT analysis on Hounsfield units, no weights. Rule-based candidates, not a diagnosis.

With HU (``AnalyzeRequest.values`` with unit "HU", which the module and the runner send for every CT slice), it
measures (:mod:`backend.ct_analysis`):

* **detect**: lung nodule candidates inside the lung fields (:mod:`~backend.ct_analysis.nodules`) and focal
  hypo/hyperdense lesion candidates inside solid organs (:mod:`~backend.ct_analysis.lesions`), labelled with what was
  measured, e.g. ``lung nodule candidate (solid, 8 mm, 35 HU)``; scores are the documented contrast measures.
* **ground**: only the targets of its vocabulary (:mod:`~backend.ct_analysis.vocabulary`); any other phrase gets no
  box (HTTP 200, ``findings: []``, a warning) and an answer naming what it can locate.
* **identify**: HU statistics, tissue composition, area, long/short axis of the region (:mod:`~backend.ct_analysis.measure`).
* **report**: a factual structured description of the tissue map and the candidates.

Without HU (MR, X-ray, an old client) it measures intensities for identify and report and answers detect/ground
with HTTP 501 (``not_supported``) naming the VLM engines, rather than flagging normal anatomy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, IDENTIFY, REPORT, Finding

from ..ct_analysis import vocabulary
from ..ct_analysis.lesions import detect_lesions
from ..ct_analysis.locate import locate
from ..ct_analysis.measure import measure_region
from ..ct_analysis.nodules import detect_nodules
from ..ct_analysis.tissue import LEFT_LUNG, RIGHT_LUNG, SIDE_NAMES, composition, tissue_map
from ..settings import BuiltinSettings
from .base import AnalysisInput, AnalysisResult, Engine, EngineInfo, StopToken, TaskNotSupported

MODEL_ID = "builtin-ct-v2 (rule-based candidates, not a diagnosis)"
DISCLAIMER = "Rule-based candidates, not a diagnosis."
NEEDS_HU = (
    "the built-in engine detects and grounds only on CT slices sent with their Hounsfield units (the request's "
    "'values' with unit HU, which the Slicer module and the headless runner send for CT); for {what} images use a "
    "vision-language engine: --engine minigptmed, --engine hf (MedGemma, Qwen-VL) or --engine openai"
)
UNSUPPORTED_PHRASE = "unsupported phrase"


def _where(box: Sequence[float], w: int, h: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    v = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    u = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "central"
    return f"{v} {u} part of the image"


def _spacing(inp: AnalysisInput) -> tuple[float, float]:
    return inp.pixel_spacing_mm if inp.pixel_spacing_mm is not None else (1.0, 1.0)


class BuiltinEngine(Engine):
    def __init__(self, settings: BuiltinSettings | None = None):
        self.settings = settings or BuiltinSettings()
        self._workers = 1  # set by load()

    def load(self) -> None:
        import SimpleITK as sitk  # fail at start, not on the first request

        # A 512 x 512 slice is too small for ITK's threads to pay (each filter splits it and joins again); the
        # slices of a batch run side by side instead, one ITK thread each (the filters release the GIL).
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        self._workers = self.settings.workers or os.cpu_count() or 1

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="builtin",
            model=MODEL_ID,
            device="cpu",
            tasks=(REPORT.id, DETECT.id, GROUND.id, IDENTIFY.id),
            max_batch=64,
        )

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        workers = min(self._workers, len(inputs))
        split = workers <= 1 < self._workers  # one slice, spare cores: its nodule and lesion passes side by side

        def one(inp: AnalysisInput) -> AnalysisResult:
            stop.check()
            t0 = time.perf_counter()
            result = self.analyze_one(inp, split)
            result.timings_ms["analysis"] = (time.perf_counter() - t0) * 1000
            return result

        if workers <= 1:
            return [one(inp) for inp in inputs]
        with ThreadPoolExecutor(workers, thread_name_prefix="builtin") as pool:
            return list(pool.map(one, inputs))  # in order; the first error (or stop) is raised here

    def analyze_one(self, inp: AnalysisInput, split: bool = False) -> AnalysisResult:
        """One input; ``split``: run a slice's passes on two threads (when no other slice runs beside it)."""
        hu = inp.hu
        if inp.task in (DETECT.id, GROUND.id) and hu is None:
            what = inp.modality or ("these" if inp.values is None else "non-HU")
            raise TaskNotSupported(NEEDS_HU.format(what=what))
        if inp.task == DETECT.id:
            assert hu is not None
            return self._detect(inp, hu, split)
        if inp.task == GROUND.id:
            assert hu is not None
            return self._ground(inp, hu, split)
        if inp.task == IDENTIFY.id:
            return self._identify(inp)
        if inp.task == REPORT.id:
            return self._report(inp, split)
        raise TaskNotSupported(f"the builtin engine cannot do '{inp.task}'")

    # -- CT with HU ---------------------------------------------------------------------------

    def _candidates(self, inp: AnalysisInput, hu: np.ndarray, split: bool):
        if split:  # the passes only read the slice and its tissue map; ITK releases the GIL
            with ThreadPoolExecutor(2, thread_name_prefix="builtin-slice") as pool:
                tmap = tissue_map(hu, _spacing(inp), pool)  # one lung closing on the pool
                later = pool.submit(detect_lesions, hu, tmap)
                nodules = detect_nodules(hu, tmap)
                lesions = later.result()
        else:
            tmap = tissue_map(hu, _spacing(inp))
            nodules = detect_nodules(hu, tmap)
            lesions = detect_lesions(hu, tmap)
        return tmap, nodules[: self.settings.max_nodule_candidates], lesions[: self.settings.max_lesion_candidates]

    def _detect(self, inp: AnalysisInput, hu: np.ndarray, split: bool) -> AnalysisResult:
        tmap, nodules, lesions = self._candidates(inp, hu, split)
        findings = [Finding(label=c.label, box=list(c.box), score=c.score) for c in [*nodules, *lesions]]
        lungs = ", ".join(
            f"{SIDE_NAMES[s]} {tmap.area_mm2(tmap.lung_sides == s) / 100:.1f} cm²"
            for s in (RIGHT_LUNG, LEFT_LUNG)
            if (tmap.lung_sides == s).any()
        )
        lung_text = f"Lung fields in view: {lungs}." if lungs else "No lung field in view."
        if findings:
            lines = [f"{i + 1}. {f.label}, score {f.score:.2f}" for i, f in enumerate(findings)]
            text = f"{DISCLAIMER} {len(findings)} candidate(s) on this slice. {lung_text}\n" + "\n".join(lines)
        else:
            text = f"{DISCLAIMER} No lung nodule candidate and no focal lesion candidate on this slice. {lung_text}"
        return AnalysisResult(text=text, findings=findings, raw_output=text)

    def _ground(self, inp: AnalysisInput, hu: np.ndarray, split: bool) -> AnalysisResult:
        phrase = (inp.question or inp.prompt or "").strip()
        target = vocabulary.match(phrase)
        if target is None:
            text = (
                f"{DISCLAIMER} The built-in engine cannot locate '{phrase[:80]}'. On CT it can locate: "
                f"{vocabulary.describe()}. For anything else use a vision-language engine."
            )
            return AnalysisResult(text=text, raw_output=text, warnings=[f"{UNSUPPORTED_PHRASE}: {phrase[:80]}"])
        tmap = tissue_map(hu, _spacing(inp))
        located = locate(target, hu, tmap)
        if not located:
            text = f"{DISCLAIMER} No {target} found on this slice (searched for '{phrase[:80]}')."
            return AnalysisResult(text=text, raw_output=text)
        findings = [Finding(label=loc.label, box=list(loc.box), score=loc.score) for loc in located]
        text = f"{DISCLAIMER} '{phrase[:80]}' read as {target}: " + "; ".join(f.label for f in findings) + "."
        return AnalysisResult(text=text, findings=findings, raw_output=text)

    def _identify(self, inp: AnalysisInput) -> AnalysisResult:
        assert inp.region is not None
        hu = inp.hu
        if hu is not None:
            m = measure_region(hu, inp.region, inp.pixel_spacing_mm, tissue_map(hu, _spacing(inp)), "HU")
        elif inp.values is not None:
            m = measure_region(inp.values.array, inp.region, inp.pixel_spacing_mm, None, "raw")
        else:
            m = measure_region(inp.image.gray_float(), inp.region, inp.pixel_spacing_mm, None, "gray")
        text = f"{DISCLAIMER} {m.text()}"
        box = [float(v) for v in inp.region]
        label = f"measured region (mean {m.mean:.0f} {m.unit}, {m.width:.0f} × {m.height:.0f} {m.length_unit})"
        return AnalysisResult(text=text, findings=[Finding(label=label, box=box)], raw_output=text)

    def _report(self, inp: AnalysisInput, split: bool) -> AnalysisResult:
        hu = inp.hu
        h, w = inp.image.height, inp.image.width
        size = f"{w}×{h} pixels"
        if inp.pixel_spacing_mm:
            size += f" ({w * inp.pixel_spacing_mm[1]:.0f} × {h * inp.pixel_spacing_mm[0]:.0f} mm)"
        parts = [DISCLAIMER, f"{inp.modality or 'Unknown-modality'} image of {size}."]
        findings: list[Finding] = []
        if hu is None:
            vals = inp.values.array if inp.values is not None else inp.image.gray_float()
            unit = inp.values.unit if inp.values is not None else "gray"
            p = np.percentile(vals, [1, 50, 99])
            parts.append(
                f"Intensities ({unit}): median {p[1]:.0f}, 1st-99th percentile {p[0]:.0f}..{p[2]:.0f}, mean "
                f"{vals.mean():.0f}, SD {vals.std():.0f}."
            )
            parts.append(
                "Without Hounsfield units the built-in engine measures intensities only; it does not detect or "
                "describe tissue (use a vision-language engine for that)."
            )
        else:
            tmap, nodules, lesions = self._candidates(inp, hu, split)
            comp = composition(tmap)
            body_cm2 = tmap.area_mm2(tmap.body) / 100
            parts.append(
                f"Body {body_cm2:.0f} cm²: "
                + ", ".join(f"{k} {v:.0f}%" for k, v in sorted(comp.items(), key=lambda kv: -kv[1]))
                + "."
            )
            for s in (RIGHT_LUNG, LEFT_LUNG):
                m = tmap.lung_sides == s
                if m.any():
                    parts.append(
                        f"{SIDE_NAMES[s].capitalize()}: {tmap.area_mm2(m) / 100:.1f} cm², median "
                        f"{float(np.median(hu[m])):.0f} HU."
                    )
            if not tmap.lung.any():
                parts.append("No lung field in view.")
            cands = [*nodules, *lesions]
            findings = [Finding(label=c.label, box=list(c.box), score=c.score) for c in cands]
            if cands:
                parts.append(
                    f"{len(cands)} candidate(s): "
                    + "; ".join(f"{c.label} in the {_where(c.box, w, h)}" for c in cands)
                    + "."
                )
            else:
                parts.append("No lung nodule candidate and no focal lesion candidate on this slice.")
        text = " ".join(parts)
        return AnalysisResult(text=text, findings=findings, raw_output=text)
