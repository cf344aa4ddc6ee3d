"""A small procedural sample set in mmllm's own formats: coloured shapes, tones, moving squares.

Used by the tests and by ``mmllm demo`` on the tiny assembly; it shows the file layouts
(``pairs.jsonl``, ``chat.jsonl``) a user's own data should follow. Deterministic for a seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmllm.data.media import Audio, Video, save_audio, save_image, save_video

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def draw_shape(colour: str, shape: str, size: int = 32, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    r = size // 4
    cx, cy = size // 2 + offset[0], size // 2 + offset[1]
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLOURS[colour])
    return img


def tone(pitch: str, seconds: float = 0.25, rate: int = 16000) -> Audio:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * PITCHES[pitch] * t) * np.hanning(len(t))
    return Audio(wave.astype(np.float32), rate)


def moving(colour: str, shape: str, direction: str, frames: int = 8, size: int = 32) -> Video:
    dx, dy = DIRECTIONS[direction]
    return Video([draw_shape(colour, shape, size, (dx * (i - frames // 2) * 2, dy * (i - frames // 2) * 2))
                  for i in range(frames)], fps=8.0)


def write_sample_dataset(root: str | Path, video_suffix: str = ".gif") -> dict[str, Path]:
    """Write media plus ``pairs.jsonl`` (all modalities) and ``chat.jsonl`` under ``root``."""
    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    pairs, chats = [], []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}"
            caption = f"a {colour} {shape}"
            save_image(draw_shape(colour, shape), root / "media" / f"{name}.png")
            pairs.append({"id": f"img-{name}", "modality": "image", "media": f"media/{name}.png", "caption": caption})
            direction = list(DIRECTIONS)[len(pairs) % 4]
            vid = save_video(moving(colour, shape, direction), root / "media" / f"{name}_{direction}{video_suffix}")
            vcap = f"a {colour} {shape} moving {direction}"
            pairs.append({"id": f"vid-{name}", "modality": "video", "media": f"media/{vid.name}", "caption": vcap})
            chats.append({"id": f"chat-draw-{name}", "messages": [
                {"role": "user", "content": f"Draw {caption}."},
                {"role": "assistant", "content": "Here it is.",
                 "outputs": [{"modality": "image", "caption": caption, "media": f"media/{name}.png"}]}]})
            chats.append({"id": f"chat-describe-{name}", "messages": [
                {"role": "user", "content": "<image>\nWhat is this?", "media": [f"media/{name}.png"]},
                {"role": "assistant", "content": f"It is {caption}."}]})
    for pitch in PITCHES:
        save_audio(tone(pitch), root / "media" / f"{pitch}.wav")
        caption = f"a {pitch} beep"
        pairs.append({"id": f"aud-{pitch}", "modality": "audio", "media": f"media/{pitch}.wav", "caption": caption})
        chats.append({"id": f"chat-sound-{pitch}", "messages": [
            {"role": "user", "content": f"Make the sound of {caption}."},
            {"role": "assistant", "content": "Listen.", "outputs": [{"modality": "audio", "caption": caption}]}]})
        chats.append({"id": f"chat-hear-{pitch}", "messages": [
            {"role": "user", "content": "<audio>\nWhat do you hear?", "media": [f"media/{pitch}.wav"]},
            {"role": "assistant", "content": f"I hear {caption}."},
            {"role": "user", "content": "Show it as a clip."},
            {"role": "assistant", "content": "Sure.",
             "outputs": [{"modality": "video", "caption": f"a red square moving {list(DIRECTIONS)[0]}"}]}]})
    chats.append({"id": "chat-plain", "messages": [
        {"role": "user", "content": "Hello, how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."}]})
    files = {"pairs": root / "pairs.jsonl", "chat": root / "chat.jsonl"}
    files["pairs"].write_text("".join(json.dumps(r) + "\n" for r in pairs))
    files["chat"].write_text("".join(json.dumps(r) + "\n" for r in chats))
    return files
