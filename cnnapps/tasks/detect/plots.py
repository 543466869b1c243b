"""Detection pictures: an image with its detections, one colour per instance, labels that never cover each other,
and a caption that says which detections are shown (score threshold, NMS)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# distinct colours, one per instance in score order (Sasha Trubetskoy's list of 20, most distinct first)
PALETTE = [(230, 25, 75), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
           (255, 225, 25), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
           (128, 128, 128), (255, 250, 200)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px; PIL's bitmap font where it cannot be found."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=False), size)
    except (ImportError, ValueError, OSError):
        return ImageFont.load_default()


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Area shared by two (x1, y1, x2, y2) rectangles."""
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def place_labels(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[float, float]], width: float,
                 height: float) -> list[tuple[float, float]]:
    """Top-left corners for one label per box (``sizes``: (w, h) of each label), inside the image and covering
    no label placed before it where any such place exists: above the box's top-left corner, else just inside it,
    below or inside its bottom, then further down the box's left edge. Boxes are placed in the order given
    (highest score first, so the surest detections keep the best places); where every candidate collides, the
    one that covers least is taken."""
    placed: list[tuple[float, float, float, float]] = []
    corners = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        x = min(max(float(x1), 0.0), max(width - w, 0.0))
        ys = [y1 - h, y1, y2, y2 - h] + [y1 + k * h for k in range(1, max(int((y2 - y1) // max(h, 1)), 1))]
        candidates = []
        for y in ys:
            y = min(max(float(y), 0.0), max(height - h, 0.0))
            for dx in (0.0, float(x2) - x - w):  # the box's left edge, else its right edge
                cx = min(max(x + dx, 0.0), max(width - w, 0.0))
                rect = (cx, y, cx + w, y + h)
                candidates.append((sum(_overlap(rect, p) for p in placed), len(candidates), rect))
        _, _, best = min(candidates)
        placed.append(best)
        corners.append((best[0], best[1]))
    return corners


def draw_detections(image: np.ndarray, det: dict[str, torch.Tensor], class_names: Sequence[str],
                    caption: str = "") -> Image.Image:
    """``image`` (H, W, 3) uint8 with ``det``'s masks (where present), boxes and "<class> <score>" labels drawn,
    each detection in its own colour (in score order), and ``caption`` in a band below the image. Returns the
    picture: W wide, H plus the caption band high."""
    h, w = image.shape[:2]
    order = torch.argsort(det["scores"], descending=True).tolist() if len(det["scores"]) else []
    colours = {i: PALETTE[rank % len(PALETTE)] for rank, i in enumerate(order)}
    canvas = image.astype(np.float32)
    if "masks" in det:
        for i in order:
            m = det["masks"][i, 0].numpy() > 0.5
            canvas[m] = 0.55 * canvas[m] + 0.45 * np.asarray(colours[i], np.float32)
    size = max(12, h // 32)
    font, line = _font(size), max(2, size // 6)
    pic = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    texts, boxes = [], []
    for i in order:
        k = int(det["labels"][i])
        texts.append(f"{class_names[k - 1] if 0 < k <= len(class_names) else k} {float(det['scores'][i]):.2f}")
        boxes.append([float(v) for v in det["boxes"][i]])
        draw.rectangle(boxes[-1], outline=colours[i], width=line)
    pad = max(2, size // 5)
    sizes = []
    for t in texts:
        x1, y1, x2, y2 = draw.textbbox((0, 0), t, font=font)
        sizes.append((x2 - x1 + 2 * pad, y2 - y1 + 2 * pad))
    for i, t, (x, y), (tw, th) in zip(order, texts, place_labels(boxes, sizes, w, h), sizes):
        draw.rectangle([x, y, x + tw, y + th], fill=colours[i])
        x0, y0 = draw.textbbox((0, 0), t, font=font)[:2]
        draw.text((x + pad - x0, y + pad - y0), t, fill="white" if sum(colours[i]) < 480 else "black", font=font)
    if not caption:
        return pic
    cap_font = _font(max(11, size * 3 // 4))
    words, lines = caption.split(), [""]
    for word in words:  # wrap to the picture's width
        trial = f"{lines[-1]} {word}".strip()
        if lines[-1] and draw.textlength(trial, font=cap_font) > w - 2 * pad:
            lines.append(word)
        else:
            lines[-1] = trial
    step = cap_font.getbbox("Hg")[3] + pad
    out = Image.new("RGB", (w, h + step * len(lines) + 2 * pad), "white")
    out.paste(pic, (0, 0))
    cap = ImageDraw.Draw(out)
    for n, text in enumerate(lines):
        cap.text((pad, h + pad + n * step), text, fill="black", font=cap_font)
    return out


def save_detections(image: np.ndarray, det: dict[str, torch.Tensor], class_names: Sequence[str], out_png: Path,
                    caption: str = "") -> Path:
    """``draw_detections`` written as the PNG ``out_png``; returns its path."""
    draw_detections(image, det, class_names, caption).save(out_png, format="PNG")
    return Path(out_png)
