"""The gallery in a real browser: headless Chromium (Debian's ``chromium`` package) opens
``index.html`` from disk and every image, audio and video element must load.

Slow (a browser start) and needs Chromium: ``make test-browser`` installs it and runs this file.
The page is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated
JSON on file descriptors 3 and 4), so the gallery itself stays script-free.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mmllm.inference.runner import run_requests
from mmllm.model import AnyToAnyModel
from tests.test_infer import GENERATE, torch_threads, trained_checkpoint, write_requests

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Resolves to a JSON list: one entry per <img>/<audio>/<video>, ok when it decoded (media: loadeddata).
CHECK_MEDIA_JS = r"""
(async () => {
  const settle = (el, good, bad) => new Promise(resolve => {
    el.addEventListener(good, () => resolve(true), {once: true});
    el.addEventListener(bad, () => resolve(false), {once: true});
    setTimeout(() => resolve(false), 15000);
  });
  const out = [];
  for (const img of document.images) {
    if (!img.complete) await settle(img, "load", "error");
    out.push({tag: "img", src: img.getAttribute("src"), ok: img.complete && img.naturalWidth > 0});
  }
  for (const el of document.querySelectorAll("audio, video")) {
    if (el.readyState < 2 && !el.error) await settle(el, "loadeddata", "error");
    out.push({tag: el.tagName.toLowerCase(), src: el.getAttribute("src"),
              ok: el.readyState >= 2 && !el.error && el.duration > 0,
              error: el.error ? el.error.code + " " + el.error.message : null});
  }
  return JSON.stringify({scripts: document.scripts.length, media: out});
})()
"""


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def child_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._id = b"", 0

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str, session: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session)
        return result["result"].get("value")

    def open(self, url: str) -> str:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.navigate", {"url": url}, session)
        deadline = time.monotonic() + 30
        while self.evaluate("document.readyState", session) != "complete":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading")
            time.sleep(0.1)
        return session

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _no_h264(*args, **kwargs):
    raise RuntimeError("no H.264 encoder in this build")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` package (make test-browser installs it)")
def test_every_gallery_element_loads_in_headless_chromium(tmp_path_factory, tmp_path, monkeypatch):
    import mmllm.data.media as media_module

    ckpt = trained_checkpoint(tmp_path_factory)
    media = ckpt.parents[1] / "samples" / "media"
    out = tmp_path / "out"
    with torch_threads(1):
        model = AnyToAnyModel.from_pretrained(ckpt).eval()
        mp4 = write_requests(tmp_path / "a.jsonl", [
            {"id": "image", "prompt": GENERATE["image"]},
            {"id": "audio", "prompt": GENERATE["audio"]},
            {"id": "video-mp4", "prompt": GENERATE["video"]},
            {"id": "describe", "prompt": "What is this?", "image": str(media / "red_circle.png")},
            {"id": "broken", "prompt": "What is this?", "image": "missing.png"},
        ])
        run_requests(model, mp4, out, batch_size=4, max_new_tokens=16)
        monkeypatch.setattr(media_module, "_save_mp4", _no_h264)  # the GIF fallback, shown as <img>
        gif = write_requests(tmp_path / "b.jsonl", [{"id": "video-gif", "prompt": GENERATE["video"], "seed": 7}])
        run_requests(model, gif, out, max_new_tokens=16)
    files = [f for line in (out / "results.jsonl").read_text().splitlines() for f in json.loads(line).get("files", [])]
    assert {Path(f).suffix for f in files} == {".png", ".wav", ".mp4", ".gif"}, files

    browser = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        session = browser.open((out / "index.html").as_uri())
        report = json.loads(browser.evaluate(CHECK_MEDIA_JS, session))
    finally:
        browser.close()
    assert report["scripts"] == 0
    loaded = {(m["tag"], m["src"]): m for m in report["media"]}
    assert {("img" if f.endswith((".png", ".gif")) else "audio" if f.endswith(".wav") else "video", f)
            for f in files} == set(loaded)
    failed = [m for m in report["media"] if not m["ok"]]
    assert not failed, failed
