"""Renderers of the toy world: attributes + a seeded generator -> an image, a sound or a video.

Nuisance variation (small position and colour jitter, background tint, pitch and onset jitter,
loudness) comes from the generator, so two items of one combination differ while every attribute
stays unambiguous to a judge.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from mmllm.data.media import Audio, Video

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down (anti-aliased edges)
BACKGROUND = (236, 236, 230)
RGB = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 45, 185),
}
RADIUS = {"small": 4.0, "large": 7.5}
CENTRES = {
    "top-left": (9.0, 9.0),
    "top-right": (23.0, 9.0),
    "bottom-left": (9.0, 23.0),
    "bottom-right": (23.0, 23.0),
    "centre": (16.0, 16.0),
}

SAMPLE_RATE = 16000
SOUND_SAMPLES = 16384  # 1.024 s: 64 hops of 256
PITCH_HZ = {"low": 220.0, "medium": 440.0, "high": 880.0}
RHYTHMS = {  # (onset s, duration s) of each note
    "steady": ((0.06, 0.88),),
    "double": ((0.08, 0.3), (0.58, 0.3)),
    "fast": ((0.05, 0.13), (0.3, 0.13), (0.55, 0.13), (0.8, 0.13)),
}
HARMONICS = 10

VIDEO_FRAMES = 8
VIDEO_FPS = 8.0
VIDEO_RADIUS = 5.0
SPEED = 2.0  # pixels per frame
TRAIL = (0.55, 0.3)  # opacity of the copies 1 and 2 frames behind
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


# ------------------------------------------------------------------------------------------- image


def _jitter_rgb(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        h = r * 1.05
        return [(cx, cy - h), (cx + h, cy + 0.8 * h), (cx - h, cy + 0.8 * h)]
    if shape == "cross":
        t = 0.36 * r
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    return None


def draw(
    canvas: Image.Image, shape: str, centre: tuple[float, float], radius: float, rgb: tuple[int, ...]
) -> None:
    """Draw ``shape`` on a supersampled RGBA ``canvas`` (coordinates in output pixels)."""
    s = SUPERSAMPLE
    cx, cy, r = centre[0] * s, centre[1] * s, radius * s
    d = ImageDraw.Draw(canvas)
    fill = tuple(rgb)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.88 * r
        d.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:
        polygon = _shape_polygon(shape, cx, cy, r)
        if polygon is None:
            raise ValueError(f"unknown shape {shape!r}")
        d.polygon(polygon, fill=fill)


def _background(rng: np.random.Generator) -> tuple[int, ...]:
    return _jitter_rgb(BACKGROUND, rng, 10)


def _finish(canvas: Image.Image) -> Image.Image:
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def image(attributes: dict[str, str], rng: np.random.Generator) -> Image.Image:
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), _background(rng))
    cx, cy = CENTRES[attributes["position"]]
    centre = (cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5))
    radius = RADIUS[attributes["size"]] * rng.uniform(0.93, 1.07)
    draw(canvas, attributes["shape"], centre, radius, _jitter_rgb(RGB[attributes["colour"]], rng, 12))
    return _finish(canvas)


# ------------------------------------------------------------------------------------------- sound


def _oscillator(timbre: str, f0: float, t: np.ndarray) -> np.ndarray:
    phase = 2 * np.pi * f0 * t
    if timbre == "pure":
        return np.sin(phase)
    ks = [k for k in range(1, HARMONICS + 1) if k * f0 < SAMPLE_RATE / 2]
    if timbre == "buzzy":  # band-limited square: odd harmonics, 1/k
        ks = [k for k in ks if k % 2]
        wave = sum(np.sin(k * phase) / k for k in ks)
    elif timbre == "bright":  # band-limited sawtooth: every harmonic, 1/k
        wave = sum(np.sin(k * phase) / k for k in ks)
    else:
        raise ValueError(f"unknown timbre {timbre!r}")
    return wave / np.abs(wave).max()


def sound(attributes: dict[str, str], rng: np.random.Generator) -> Audio:
    t = np.arange(SOUND_SAMPLES) / SAMPLE_RATE
    f0 = PITCH_HZ[attributes["pitch"]] * 2 ** (rng.uniform(-0.5, 0.5) / 12)  # +- a quarter tone
    tone = _oscillator(attributes["timbre"], f0, t)
    envelope = np.zeros_like(t)
    shift = rng.uniform(-0.02, 0.02)
    ramp = 0.01
    for onset, duration in RHYTHMS[attributes["rhythm"]]:
        start, end = onset + shift, onset + shift + duration
        envelope = np.maximum(
            envelope, np.clip(np.minimum((t - start) / ramp, (end - t) / ramp), 0.0, 1.0)
        )
    wave = rng.uniform(0.3, 0.6) * tone * envelope + rng.normal(0, 0.003, t.shape)
    return Audio(wave.astype(np.float32), SAMPLE_RATE)


# ------------------------------------------------------------------------------------------- video


def video(attributes: dict[str, str], rng: np.random.Generator) -> Video:
    """A shape crossing the frame; copies 1 and 2 frames behind fade out (motion visible per frame)."""
    dx, dy = DIRECTIONS[attributes["direction"]]
    r = VIDEO_RADIUS * rng.uniform(0.95, 1.05)
    travel = SPEED * (VIDEO_FRAMES - 1)
    along_start = IMAGE_SIZE / 2 - travel / 2 + SPEED  # centre the path, counting the 2-frame trail
    across = IMAGE_SIZE / 2 + rng.uniform(-6.0, 6.0)
    along_start += rng.uniform(-1.0, 1.0)
    rgb = _jitter_rgb(RGB[attributes["colour"]], rng, 12)
    background = _background(rng)
    frames = []
    for f in range(VIDEO_FRAMES):
        canvas = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, background)
        for lag, opacity in ((2, TRAIL[1]), (1, TRAIL[0]), (0, 1.0)):
            along = along_start + SPEED * (f - lag)
            if dx:  # horizontal motion: the sign of dx picks the end it starts from
                centre = (along if dx > 0 else IMAGE_SIZE - along, across)
            else:
                centre = (across, along if dy > 0 else IMAGE_SIZE - along)
            mixed = tuple(int(round(opacity * c + (1 - opacity) * b)) for c, b in zip(rgb, background))
            draw(canvas, attributes["shape"], centre, r, mixed)
        frames.append(_finish(canvas))
    return Video(frames, VIDEO_FPS)
