"""The built-in engine: classical, rule-based image analysis that needs no weights.

It is honest about what it is: it finds regions whose intensity stands out from the tissue around
them. It does not diagnose, and every text it writes says so.

Detection, per image:
1. Robust intensity range (0.5 / 99.5 percentiles) -> values scaled to about 0..1 (not clipped).
2. Tissue mask: above air/background (half the Otsu threshold, at most 15 % of the range); small holes (< 2 % of the
   tissue) filled so that dark lesions count as tissue while lungs and background stay out.
3. Local tissue background by normalised Gaussian convolution inside the mask (sigma = 1/12 of the
   image side), computed twice: the second pass excludes the outliers of the first, so a lesion does
   not raise its own background.
4. Residual z-score against a robust noise estimate (1.4826 * MAD of the residual in the tissue),
   lightly smoothed; |z| > ``z_threshold`` marks candidates.
   Pixels within 2 px of the tissue outline are excluded (partial volume).
5. Connected components that fill at least 20 % of their bounding box, with a minimum area (12 px, and 8 mm² when the spacing is known); boxes are their pixel bounding boxes, ranked by
   mean |z| * sqrt(area); score = 1 - exp(-mean|z| / z_threshold) (a contrast measure, not a probability).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from MiniGPTMedSlicerLib.protocol import DETECT, GROUND, IDENTIFY, REPORT, Finding

from ..settings import BuiltinSettings
from .base import AnalysisInput, AnalysisResult, Engine, EngineInfo, StopToken, TaskNotSupported

MODEL_ID = "builtin-rules-v1 (rule-based candidates, not a diagnosis)"
DISCLAIMER = "Rule-based intensity analysis, not a diagnosis."

DARK_WORDS = ("hypo", "dark", "low", "cyst", "fluid", "lucen", "air", "necro")
BRIGHT_WORDS = ("hyper", "bright", "high", "calc", "bleed", "hemorr", "haemorr", "enhanc", "dense", "contrast")


@dataclass
class Candidate:
    polarity: int  # +1 brighter than surroundings, -1 darker
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (pixels, exclusive end)
    area_px: int
    mean_z: float
    centroid: tuple[float, float]  # x, y

    @property
    def strength(self) -> float:
        return abs(self.mean_z) * math.sqrt(self.area_px)


def polarity_label(polarity: int, modality: str | None) -> str:
    m = (modality or "").upper()
    if m == "CT":
        return "hyperdense region" if polarity > 0 else "hypodense region"
    if m in ("MR", "MRI"):
        return "hyperintense region" if polarity > 0 else "hypointense region"
    return "bright region" if polarity > 0 else "dark region"


def _size_text(box: Sequence[float], spacing: tuple[float, float] | None) -> str:
    w, h = box[2] - box[0], box[3] - box[1]
    if spacing is None:
        return f"{w:.0f} × {h:.0f} px"
    return f"{w * spacing[1]:.1f} × {h * spacing[0]:.1f} mm"


class ImageAnalyzer:
    """The detection pipeline on one 2D image."""

    def __init__(self, cfg: BuiltinSettings):
        self.cfg = cfg

    def normalise(self, img: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(img, [0.5, 99.5])
        if hi <= lo:
            hi = lo + 1.0
        # scale only: z-scores do not depend on it, and clipping would flatten small bright lesions
        return ((img - lo) / (hi - lo)).astype(np.float32)

    def tissue_mask(self, x: np.ndarray) -> np.ndarray:
        import SimpleITK as sitk

        t = _otsu(np.clip(x, 0.0, 1.0))
        mask = x > max(min(t * 0.5, 0.15), 0.02)  # above air/background; fat counts as tissue
        if mask.sum() < 16:
            return np.ones_like(mask)
        # fill small holes (dark lesions inside tissue) but not lungs or the background
        holes = ~mask
        cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(holes.astype(np.uint8))))
        counts = np.bincount(cc.ravel())
        limit = 0.02 * mask.sum()
        small = np.nonzero((counts < limit) & (np.arange(len(counts)) > 0))[0]
        if len(small):
            mask |= np.isin(cc, small)
        return mask

    def zmap(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        sigma = max(4.0, self.cfg.background_sigma_fraction * max(x.shape))
        m = mask.astype(np.float32)
        bg = _masked_blur(x, m, sigma)
        z = self._z(x, bg, mask)
        keep = m * (np.abs(z) < self.cfg.z_threshold * 0.6)
        if keep.sum() > 0.2 * m.sum():
            bg = _masked_blur(x, keep, sigma)
            z = self._z(x, bg, mask)
        return _blur(z, 1.0) * mask

    @staticmethod
    def _z(x: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
        r = (x - bg) * mask
        vals = r[mask]
        if vals.size == 0:
            return np.zeros_like(x)
        mad = float(np.median(np.abs(vals - np.median(vals))))
        noise = max(1.4826 * mad, 0.01)
        return r / noise

    def candidates(
        self, gray: np.ndarray, spacing: tuple[float, float] | None = None
    ) -> tuple[list[Candidate], np.ndarray]:
        import SimpleITK as sitk

        x = self.normalise(gray.astype(np.float32))
        mask = self.tissue_mask(x)
        z = self.zmap(x, mask)
        # partial-volume pixels along the tissue outline are darker than the tissue: not candidates
        core = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(mask.astype(np.uint8)), [2, 2])) > 0
        z = z * core
        tissue = int(mask.sum())
        min_area = self.cfg.min_area_px
        if spacing is not None:
            min_area = max(min_area, int(math.ceil(self.cfg.min_area_mm2 / (spacing[0] * spacing[1]))))
        out: list[Candidate] = []
        for polarity in (1, -1):
            binary = (z * polarity) > self.cfg.z_threshold
            if not binary.any():
                continue
            cc_img = sitk.ConnectedComponent(sitk.GetImageFromArray(binary.astype(np.uint8)))
            labels = sitk.GetArrayFromImage(cc_img)
            stats = sitk.LabelShapeStatisticsImageFilter()
            stats.Execute(cc_img)
            zsum = np.bincount(labels.ravel(), weights=z.ravel())
            for lab in stats.GetLabels():
                area = int(stats.GetNumberOfPixels(lab))
                if area < min_area or area > self.cfg.max_area_fraction * max(tissue, 1):
                    continue
                bx, by, bw, bh = stats.GetBoundingBox(lab)
                if area < 0.2 * bw * bh:  # rings and thin curves (outlines, vessels walls), not regions
                    continue
                cx, cy = stats.GetCentroid(lab)
                out.append(Candidate(polarity, (bx, by, bx + bw, by + bh), area, float(zsum[lab] / area), (cx, cy)))
        out.sort(key=lambda c: c.strength, reverse=True)
        return out, mask

    def score(self, c: Candidate) -> float:
        return round(1.0 - math.exp(-abs(c.mean_z) / self.cfg.z_threshold), 4)


class BuiltinEngine(Engine):
    def __init__(self, settings: BuiltinSettings | None = None):
        self.cfg = settings or BuiltinSettings()
        self.analyzer = ImageAnalyzer(self.cfg)

    def load(self) -> None:
        import SimpleITK  # noqa: F401  (fail at start, not on the first request)

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="builtin",
            model=MODEL_ID,
            device="cpu",
            tasks=(REPORT.id, DETECT.id, GROUND.id, IDENTIFY.id),
            max_batch=64,
        )

    def analyze_batch(self, inputs: Sequence[AnalysisInput], stop: StopToken) -> list[AnalysisResult]:
        results = []
        for inp in inputs:
            stop.check()
            t0 = time.perf_counter()
            result = self.analyze_one(inp)
            result.timings_ms["analysis"] = (time.perf_counter() - t0) * 1000
            results.append(result)
        return results

    def analyze_one(self, inp: AnalysisInput) -> AnalysisResult:
        run = {
            DETECT.id: self._detect,
            REPORT.id: self._report,
            GROUND.id: self._ground,
            IDENTIFY.id: self._identify,
        }.get(inp.task)
        if run is not None:
            return run(inp)
        raise TaskNotSupported(f"the builtin engine cannot do '{inp.task}'")

    # -- tasks --------------------------------------------------------------------------------

    def _findings(self, inp: AnalysisInput, cands: list[Candidate]) -> list[Finding]:
        return [
            Finding(
                label=polarity_label(c.polarity, inp.modality),
                box=[float(v) for v in c.box],
                score=self.analyzer.score(c),
            )
            for c in cands
        ]

    def _filter_by_words(self, text: str | None, cands: list[Candidate]) -> list[Candidate]:
        t = (text or "").lower()
        dark = any(w in t for w in DARK_WORDS)
        bright = any(w in t for w in BRIGHT_WORDS)
        if "hypo" in t and "hyper" not in t:  # "hypodense" also contains "dense"
            dark, bright = True, False
        elif "hyper" in t and "hypo" not in t:
            dark, bright = False, True
        if dark and not bright:
            return [c for c in cands if c.polarity < 0]
        if bright and not dark:
            return [c for c in cands if c.polarity > 0]
        return cands

    def _detect(self, inp: AnalysisInput) -> AnalysisResult:
        cands, _ = self.analyzer.candidates(inp.image.gray_float(), inp.pixel_spacing_mm)
        cands = self._filter_by_words(inp.question, cands)[: self.cfg.max_findings]
        findings = self._findings(inp, cands)
        if findings:
            lines = [
                f"{i + 1}. {f.label}, {_size_text(f.box, inp.pixel_spacing_mm)}, contrast score {f.score:.2f}"
                for i, f in enumerate(findings)
            ]
            text = (
                f"{DISCLAIMER} {len(findings)} candidate region(s) differ from the surrounding tissue:\n"
                + "\n".join(lines)
            )
        else:
            text = f"{DISCLAIMER} No region stands out from the surrounding tissue."
        return AnalysisResult(text=text, findings=findings, raw_output=text)

    def _report(self, inp: AnalysisInput) -> AnalysisResult:
        gray = inp.image.gray_float()
        cands, mask = self.analyzer.candidates(gray, inp.pixel_spacing_mm)
        cands = cands[: self.cfg.max_findings]
        findings = self._findings(inp, cands)
        h, w = gray.shape
        parts = [DISCLAIMER]
        size = f"{w}×{h} pixels"
        if inp.pixel_spacing_mm:
            size += f" ({w * inp.pixel_spacing_mm[1]:.0f} × {h * inp.pixel_spacing_mm[0]:.0f} mm)"
        modality = f"{inp.modality} " if inp.modality else ""
        parts.append(f"{modality}image of {size}; tissue covers {100 * mask.mean():.0f}% of it.")
        if findings:
            n_b = sum(1 for c in cands if c.polarity > 0)
            n_d = len(cands) - n_b
            parts.append(
                f"{len(findings)} region(s) stand out from the surrounding tissue ({n_b} brighter, {n_d} darker)."
            )
            f0 = findings[0]
            cx = (f0.box[0] + f0.box[2]) / 2 / w
            cy = (f0.box[1] + f0.box[3]) / 2 / h
            where = f"{'upper' if cy < 1 / 3 else 'lower' if cy > 2 / 3 else 'middle'} {'left' if cx < 1 / 3 else 'right' if cx > 2 / 3 else 'central'} part of the image"
            parts.append(
                f"The most conspicuous is a {f0.label} of {_size_text(f0.box, inp.pixel_spacing_mm)} in the {where}."
            )
        else:
            parts.append("No region stands out from the surrounding tissue.")
        text = " ".join(parts)
        return AnalysisResult(text=text, findings=findings, raw_output=text)

    def _ground(self, inp: AnalysisInput) -> AnalysisResult:
        phrase = (inp.question or inp.prompt or "").strip()
        cands, _ = self.analyzer.candidates(inp.image.gray_float(), inp.pixel_spacing_mm)
        cands = self._filter_by_words(phrase, cands)
        if not cands:
            text = f"{DISCLAIMER} No candidate region for '{phrase}'."
            return AnalysisResult(text=text, raw_output=text)
        best = cands[0]
        label = phrase[:80] if phrase else polarity_label(best.polarity, inp.modality)
        f = Finding(label=label, box=[float(v) for v in best.box], score=self.analyzer.score(best))
        text = (
            f"{DISCLAIMER} Best candidate for '{phrase}': a {polarity_label(best.polarity, inp.modality)} of "
            f"{_size_text(f.box, inp.pixel_spacing_mm)}."
        )
        return AnalysisResult(text=text, findings=[f], raw_output=text)

    def _identify(self, inp: AnalysisInput) -> AnalysisResult:
        assert inp.region is not None
        gray = inp.image.gray_float()
        x = self.analyzer.normalise(gray)
        h, w = x.shape
        x0, y0, x1, y1 = inp.region
        i0, j0 = int(math.floor(y0)), int(math.floor(x0))
        i1, j1 = max(i0 + 1, int(math.ceil(y1))), max(j0 + 1, int(math.ceil(x1)))
        inside = np.zeros_like(x, dtype=bool)
        inside[i0:i1, j0:j1] = True
        pad = max(3, int(0.5 * max(i1 - i0, j1 - j0)))
        ring = np.zeros_like(inside)
        ring[max(0, i0 - pad) : min(h, i1 + pad), max(0, j0 - pad) : min(w, j1 + pad)] = True
        ring &= ~inside
        mask = self.analyzer.tissue_mask(x)
        ring_t = ring & mask if (ring & mask).sum() >= 8 else ring
        m_in = float(x[inside].mean())
        m_out = float(x[ring_t].mean()) if ring_t.any() else m_in
        noise = float(x[ring_t].std()) if ring_t.sum() > 1 else 0.0
        contrast = (m_in - m_out) / max(noise, 0.02)
        if abs(contrast) < 1.0:
            kind = "region similar to the surrounding tissue"
        else:
            kind = polarity_label(1 if contrast > 0 else -1, inp.modality)
        box = [float(x0), float(y0), float(x1), float(y1)]
        text = (
            f"{DISCLAIMER} The region ({_size_text(box, inp.pixel_spacing_mm)}) is a {kind}: mean relative "
            f"intensity {m_in:.2f} against {m_out:.2f} around it ({contrast:+.1f} noise units); "
            f"{100 * mask[inside].mean():.0f}% of it is tissue."
        )
        score = round(1.0 - math.exp(-abs(contrast) / self.cfg.z_threshold), 4)
        return AnalysisResult(text=text, findings=[Finding(label=kind, box=box, score=score)], raw_output=text)


# -- small numeric helpers ----------------------------------------------------------------------


def _otsu(x: np.ndarray, bins: int = 128) -> float:
    hist, edges = np.histogram(x, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    w1 = 1 - w0
    m0 = np.cumsum(p * centers)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = 0
    return float(centers[int(np.argmax(between))])


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(a.astype(np.float32))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma)))


def _masked_blur(x: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    num = _blur(x * weight, sigma)
    den = _blur(weight, sigma)
    with np.errstate(divide="ignore", invalid="ignore"):
        bg = np.where(den > 1e-3, num / np.maximum(den, 1e-6), x)
    return bg.astype(np.float32)
