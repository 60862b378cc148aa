"""What a newcomer meets first: --help with defaults and no reStructuredText, --version, the engines listing; and the
runner's --modality, --window-preset and --scene none."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from backend import __version__
from headless.runner import WINDOW_PRESETS, main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_backend_help_shows_defaults_and_convert_only_its_options():
    serve = " ".join(_run("backend.cli", "serve", "--help").stdout.split())
    for default in ("(default: 8765)", "(default: auto)", "default 127.0.0.1"):
        assert default in serve, serve
    assert "``" not in serve and "MINIGPTMED_OPENAI_URL" in serve and "MINIGPTMED_TOKEN" in serve
    convert = _run("backend.cli", "convert", "--help").stdout
    assert "--eva" in convert and "--out" in convert and "--qformer" in convert  # --qformer: XrayGPT's conversion
    for other in ("--engine", "--family", "--device", "--port", "--sampling"):
        assert other not in convert, other
    assert "``" not in _run("backend.cli", "--help").stdout
    assert _run("backend.cli", "--version").stdout.strip() == f"minigptmed-backend {__version__}"


def test_engines_lists_usability_and_what_auto_picks(tmp_path):
    folder = tmp_path / "medgemma"
    folder.mkdir()
    r = _run("backend.cli", "engines", "--model", str(folder), "--family", "medgemma")
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines()}
    assert r.returncode == 0, r.stderr
    assert "not usable" in rows["minigptmed"] and "0 of 3 weight files" in rows["minigptmed"]
    assert " usable" in rows["builtin"] and "not usable" not in rows["hf"]
    assert rows["auto"] == f"auto picks: hf (a transformers model folder was found at {folder})"
    r = _run("backend.cli", "engines")
    assert r.stdout.splitlines()[-1] == "auto picks: builtin (no VLM weights configured or found locally)"


def test_runner_help_and_version():
    r = _run("headless.runner", "analyze", "--help")
    help_text = " ".join(r.stdout.split())
    for text in ("(default: axial)", "(default: detect)", "default: the middle", "(default: 512)", "(default: full)"):
        assert text in help_text, r.stdout
    assert "``" not in _run("headless.runner", "--help").stdout
    assert _run("headless.runner", "--version").stdout.strip() == f"minigptmed-slicer {__version__}"


@pytest.mark.parametrize("preset", ["lung", "bone"])
def test_modality_window_preset_and_scene_none(anatomical_path, builtin_server, tmp_path, preset):
    out = tmp_path / "o"
    rc = main(
        [
            "analyze",
            "--task",
            "report",
            str(anatomical_path),
            "--backend",
            builtin_server,
            "--view-size",
            "96",
            "--modality",
            "mr",
            "--window-preset",
            preset,
            "--scene",
            "none",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    image = json.loads((out / "findings.json").read_text())["image"]
    assert image["modality"] == "MR"
    assert (image["window"], image["level"]) == WINDOW_PRESETS[preset]
    assert (out / "input.png").is_file() and (out / "view.png").is_file() and not (out / "scene.mrb").exists()
