"""The runner's --stream and --follow-up against the tiny MiniGPT-Med behind the real server: the answers' text on
stdout as it comes, the follow-up sent with the earlier turn (uploaded once), the conversation in findings.json."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from minigpt_fixtures import tiny_files

from backend.engines.minigptmed import MiniGPTMedEngine
from backend.server_thread import ServerThread
from backend.settings import MiniGPTMedSettings


def test_stream_and_follow_up(chest_ct_path, tmp_path):
    t = tiny_files()
    e = MiniGPTMedEngine(
        MiniGPTMedSettings(
            eva=str(t.eva), llama=str(t.llama), checkpoint=str(t.checkpoint), model_config=str(t.model_config)
        )
    )
    out = tmp_path / "run"
    with ServerThread(e) as url:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "headless.runner",
                "analyze",
                str(chest_ct_path),
                "--task",
                "report",
                "--stream",
                "--follow-up",
                "is there a mass?",
                "--scene",
                "none",
                "--view-size",
                "128",
                "--backend",
                url,
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=ROOT,
        )
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "findings.json").read_text())
    turns = data["conversation"]
    assert [t["task"] for t in turns] == ["report", "vqa"] and turns[1]["question"] == "is there a mass?"
    assert r.stdout.splitlines() == [turns[0]["text"], turns[1]["text"]], (r.stdout, turns)
    assert data["text"] == turns[0]["text"] and data["engine"] == "minigptmed"
