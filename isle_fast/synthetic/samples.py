"""One synthetic image and everything derived from it (:class:`Sample`): its objects, pixels,
ground truth, hard pseudo-label sets and soft sets (CAMs), from ``(seed, index)`` and the sets'
qualities (:mod:`isle_fast.synthetic.datasets` describes what is simulated)."""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass

import numpy as np

from isle_fast.stores.stack import IGNORE_INDEX, VOC_CLASSES
from isle_fast.synthetic.imageops import _blur, _smooth_noise, boundary_band

__all__ = ["Sample", "NUM_CLASSES", "FG"]

NUM_CLASSES = len(VOC_CLASSES)  # 21, background included
FG = NUM_CLASSES - 1

#: Look-alike classes, used for confusion when an image has no other class.
CONFUSERS: dict[str, str] = {
    "aeroplane": "bird", "bird": "aeroplane", "bicycle": "motorbike", "motorbike": "bicycle",
    "boat": "aeroplane", "bottle": "pottedplant", "pottedplant": "bottle", "bus": "car",
    "car": "bus", "train": "bus", "cat": "dog", "dog": "cat", "cow": "sheep", "sheep": "cow",
    "horse": "cow", "chair": "sofa", "sofa": "chair", "diningtable": "chair", "person": "sofa",
    "tvmonitor": "diningtable",
}

SHAPES = ("ellipse", "rectangle", "polygon", "blob")
TEXTURES = ("stripes", "checks", "dots", "rings", "blotches")
_STYLE_SEED = 20230901  # class signatures are the same for every data set seed
JPEG_QUALITY = 95


# ----------------------------------------------------------------------------------------------
# class signatures (fixed for every seed)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClassStyle:
    colour_a: np.ndarray  # (3,) float 0..255
    colour_b: np.ndarray
    texture: str
    period: float
    angle: float
    shape: str


def _class_styles() -> list[_ClassStyle | None]:
    rng = np.random.default_rng(_STYLE_SEED)
    hues = (np.arange(FG) * 7 % FG) / FG  # spread neighbours in index over the hue circle
    styles: list[_ClassStyle | None] = [None]
    for c in range(1, NUM_CLASSES):
        h = hues[c - 1]
        sat, val = 0.55 + 0.4 * rng.random(), 0.55 + 0.4 * rng.random()
        a = np.array(colorsys.hsv_to_rgb(h, sat, val)) * 255
        hb = (h + rng.uniform(0.12, 0.45)) % 1.0
        b = np.array(colorsys.hsv_to_rgb(hb, 0.3 + 0.6 * rng.random(), 0.25 + 0.7 * rng.random())) * 255
        styles.append(_ClassStyle(
            colour_a=a.astype(np.float32), colour_b=b.astype(np.float32),
            texture=TEXTURES[(c - 1) % len(TEXTURES)],
            period=float(rng.uniform(5.0, 14.0)), angle=float(rng.uniform(0, np.pi)),
            shape=SHAPES[(c - 1) % len(SHAPES)],
        ))
    return styles


_STYLES = _class_styles()


# ----------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------
@dataclass
class _Object:
    cls: int
    mask: np.ndarray  # full shape mask (before occlusion)
    visible: np.ndarray  # what is left after later objects are drawn on top
    cy: float
    cx: float
    radius: float


@dataclass
class Sample:
    """One generated image with everything derived from it.

    Attributes
    ----------
    id : str
    image : ndarray, (H, W, 3) uint8
        Pixels after the JPEG round trip (exactly what ``JPEGImages`` holds).
    jpeg : bytes
        The encoded JPEG file.
    labels : ndarray, (H, W) uint8
        True labels without the ignore band.
    gt : ndarray, (H, W) uint8
        Ground truth: ``labels`` with 255 in the boundary band.
    pseudo : dict str -> ndarray (H, W) uint8
        The hard pseudo-label sets (255 = abstain).
    cams : dict str -> dict
        The soft sets, each ``{"keys", "high_res"}`` (``"cam"`` is made when writing).
    present : ndarray of int
        Foreground classes present in ``labels`` (1-based), sorted.
    """

    id: str
    image: np.ndarray
    jpeg: bytes
    labels: np.ndarray
    gt: np.ndarray
    pseudo: dict[str, np.ndarray]
    cams: dict[str, dict]
    present: np.ndarray


@dataclass(frozen=True)
class _Spec:
    seed: int
    shapes: np.ndarray
    ids: tuple[str, ...]
    set_names: tuple[str, ...]
    quality: np.ndarray
    abstain: np.ndarray
    soft_set_names: tuple[str, ...]
    soft_quality: np.ndarray
    bias: np.ndarray  # (N, C) +1 over-segments, -1 under-segments
    max_objects: int
    band: int
    tags_only: bool


def _shape_mask(kind: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
                cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    t = rng.uniform(0, np.pi)
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    if kind == "ellipse":
        a, b = r, r * rng.uniform(0.5, 1.0)
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if kind == "rectangle":
        a, b = r * rng.uniform(0.65, 1.0), r * rng.uniform(0.4, 0.9)
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    if kind == "polygon":
        k = int(rng.integers(3, 8))
        # keep vertices apart so the polygon is not degenerate
        ang = np.sort((np.arange(k) * 2 * np.pi / k + rng.uniform(-0.4, 0.4, size=k) * np.pi / k) + t)
        rad = r * rng.uniform(0.75, 1.05, size=k)
        vy, vx = rad * np.sin(ang), rad * np.cos(ang)
        inside = np.ones(yy.shape, dtype=bool)
        for i in range(k):
            j = (i + 1) % k
            cross = (vx[j] - vx[i]) * (dy - vy[i]) - (vy[j] - vy[i]) * (dx - vx[i])
            inside &= cross >= 0
        return inside
    # blob: a wobbly radius
    theta = np.arctan2(v, u)
    rr = np.ones_like(theta)
    for k in (2, 3, 5):
        rr = rr + rng.uniform(0.0, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) <= r * 0.85 * rr


def _texture(style: _ClassStyle, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray,
             cy: float, cx: float) -> np.ndarray:
    """Pattern weight in [0, 1] in the object's own frame (the texture moves with the object)."""
    t = style.angle + rng.uniform(-0.2, 0.2)
    per = style.period * rng.uniform(0.85, 1.15)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    w = 2 * np.pi / per
    if style.texture == "stripes":
        p = 0.5 + 0.5 * np.sin(w * u)
    elif style.texture == "checks":
        p = 0.5 + 0.5 * np.tanh(4 * np.sin(w * u) * np.sin(w * v))
    elif style.texture == "dots":
        p = ((np.cos(w * u) + np.cos(w * v)) > 0.9).astype(np.float32)
    elif style.texture == "rings":
        p = 0.5 + 0.5 * np.sin(w * np.hypot(u, v))
    else:
        h, wd = yy.shape
        p = (_smooth_noise(rng, h, wd, per * 0.7) > 0.0).astype(np.float32)
    return p.astype(np.float32)


def _scene(rng: np.random.Generator, h: int, w: int, max_objects: int
           ) -> tuple[np.ndarray, np.ndarray, list[_Object]]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: smooth low-saturation colour field with some fine grain
    bg = np.empty((h, w, 3), dtype=np.float32)
    base = rng.uniform(70, 190)
    tint = rng.uniform(-25, 25, size=3)
    for ch in range(3):
        bg[..., ch] = base + tint[ch] + 35 * _smooth_noise(rng, h, w, rng.uniform(40, 90))
    bg += 10 * _smooth_noise(rng, h, w, 3.0)[..., None]
    img = bg
    labels = np.zeros((h, w), dtype=np.uint8)

    n_obj = int(rng.integers(1, max_objects + 1))
    n_cls = int(rng.integers(1, min(3, n_obj) + 1))
    classes = rng.choice(np.arange(1, NUM_CLASSES), size=n_cls, replace=False)
    obj_classes = np.concatenate([classes, rng.choice(classes, size=n_obj - n_cls)])
    side = min(h, w)
    objects: list[_Object] = []
    for c in obj_classes:
        c = int(c)
        style = _STYLES[c]
        assert style is not None
        r = float(side * rng.uniform(0.14, 0.32))
        cy, cx = float(rng.uniform(0.15 * h, 0.85 * h)), float(rng.uniform(0.15 * w, 0.85 * w))
        kind = style.shape if rng.random() < 0.7 else SHAPES[int(rng.integers(len(SHAPES)))]
        mask = _shape_mask(kind, rng, yy, xx, cy, cx, r)
        if not mask.any():
            continue
        p = _texture(style, rng, yy, xx, cy, cx)[..., None]
        colour = style.colour_a * (1 - p) + style.colour_b * p
        gy, gx = rng.normal(size=2)
        shade = 1.0 + 0.15 * np.tanh(((yy - cy) * gy + (xx - cx) * gx) / (r + 1e-6))[..., None]
        colour = colour * shade * rng.uniform(0.9, 1.1)
        img = np.where(mask[..., None], colour, img)
        labels[mask] = c
        for o in objects:
            o.visible &= ~mask
        objects.append(_Object(c, mask, mask.copy(), cy, cx, r))
    img = img + rng.normal(0.0, 3.0, size=img.shape).astype(np.float32)
    objects = [o for o in objects if o.visible.any()]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels, objects


def _jpeg_round_trip(img: np.ndarray) -> tuple[np.ndarray, bytes]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8), data


def _other_class(c: int, present: np.ndarray, u: float, tags_only: bool) -> int:
    others = [int(p) for p in present if p != c]
    if others:
        return others[int(u * len(others)) % len(others)]
    return 0 if tags_only else VOC_CLASSES.index(CONFUSERS[VOC_CLASSES[c]])


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float,
          r: float) -> np.ndarray:
    """A blob mask, computed on its bounding box only (same random draws as a full-image call)."""
    h, w = yy.shape
    y0, y1 = int(np.clip(np.floor(cy - 1.6 * r), 0, h)), int(np.clip(np.ceil(cy + 1.6 * r) + 1, 0, h))
    x0, x1 = int(np.clip(np.floor(cx - 1.6 * r), 0, w)), int(np.clip(np.ceil(cx + 1.6 * r) + 1, 0, w))
    out = np.zeros((h, w), dtype=bool)
    out[y0:y1, x0:x1] = _shape_mask("blob", rng, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1], cy, cx, r)
    return out


def _hard_set(spec: _Spec, n: int, objects: list[_Object], labels: np.ndarray, present: np.ndarray,
              events: np.ndarray, fp_events: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    """One hard pseudo-label map for set ``n``."""
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pred = np.zeros((h, w), dtype=np.uint8)
    unsure = np.zeros((h, w), dtype=bool)
    # classes are drawn in the order of their top-most object, so occlusion matches the image
    order = sorted(present.tolist(), key=lambda c: max(j for j, o in enumerate(objects) if o.cls == c))
    for c in order:
        e = 1.0 - spec.quality[n, c]
        noise = _smooth_noise(rng, h, w, max(4.0, 0.1 * min(h, w)))  # drawn for every class: stable streams
        mine = [j for j, o in enumerate(objects) if o.cls == c]
        if e <= 0:
            for j in mine:
                pred[objects[j].visible] = c
            continue
        kept = [j for j in mine if events[j, 0] >= 0.9 * e * e]  # common random numbers: nested misses
        if not kept:
            continue
        union = np.zeros((h, w), dtype=bool)
        for j in kept:
            union |= objects[j].visible
        radius = float(np.mean([objects[j].radius for j in kept]))
        sigma = 0.5 * e * radius
        blurred = _blur(union, sigma)
        field_ = blurred + 0.5 * e * noise * (blurred > 0.02)
        thr = 0.5 - 0.4 * e * spec.bias[n, c]
        mask = field_ > thr
        unsure |= (np.abs(field_ - thr) < (0.05 + 0.25 * e)) & (blurred > 0.02)
        cls_map = np.full((h, w), c, dtype=np.uint8)
        for j in kept:
            o = objects[j]
            _, u_conf, u_part, u_dir = events[j]
            if u_conf < 0.8 * e * e:
                # give a part of the object to another class: a half-plane cut through it
                frac = min(1.0, 0.3 + 1.4 * e * u_part)
                ang = 2 * np.pi * u_dir
                proj = (yy - o.cy) * np.sin(ang) + (xx - o.cx) * np.cos(ang)
                near = _blur(o.visible, sigma + 2.0) > 0.02
                other = _other_class(c, present, u_part, spec.tags_only)
                cls_map[near & (proj > o.radius * (1.0 - 2.0 * frac))] = other
        pred[mask] = cls_map[mask]
    # false positives: blobs of present classes on predicted background
    for c in present:
        e = 1.0 - spec.quality[n, c]
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r_obj = max((o.radius for o in objects if o.cls == c), default=min(h, w) * 0.2)
        rad = max(2.0, 0.4 * e * r_obj * rng.uniform(0.5, 1.0))
        blob = _blob(rng, yy, xx, cy, cx, rad)
        if e > 0 and fp_events[int(c)] < e:
            pred[blob & (pred == 0)] = c
    if rng.random() < spec.abstain[n]:
        pred[unsure] = IGNORE_INDEX
    return pred


def _soft_set(spec: _Spec, m: int, objects: list[_Object], present: np.ndarray,
              events: np.ndarray, rng: np.random.Generator, h: int, w: int) -> dict:
    """CAMs of soft set ``m``: ``{"keys": (K,), "high_res": (K, H, W) float32}``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    maps = []
    for c in present:
        c = int(c)
        e = 1.0 - spec.soft_quality[m, c]
        noise = _smooth_noise(rng, h, w, max(4.0, 0.1 * min(h, w)))
        mine = [j for j, o in enumerate(objects) if o.cls == c]
        union = np.zeros((h, w), dtype=bool)
        for j in mine:
            union |= objects[j].visible
        radius = float(np.mean([objects[j].radius for j in mine]))
        act = _blur(union, (0.08 + 0.3 * e) * radius)
        # focus on a discriminative part of every object: a bump around a random point of it
        focus = np.zeros((h, w), dtype=np.float32)
        for j in mine:
            o = objects[j]
            ys, xs = np.nonzero(o.visible)
            k = int(rng.integers(len(ys)))
            bump = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * (0.7 * o.radius) ** 2))
            weak = 0.35 if events[j, 0] < 0.45 * e * e else 1.0  # a weakly activated (missed) object
            focus = np.maximum(focus, weak * bump ** (1.5 * e))
        cam = act * focus
        # confusion: weak activation on the objects of other classes
        for j, o in enumerate(objects):
            if o.cls != c and e > 0:
                cam = np.maximum(cam, 0.6 * e * events[j, 1] * _blur(o.visible, 0.3 * o.radius))
        cam = cam * (1.0 + 0.4 * e * noise)
        # a false-positive activation somewhere
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        rad = min(h, w) * (0.05 + 0.15 * e)
        fp = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rad * rad)) * 0.7 * e * rng.random()
        cam = np.maximum(cam, fp)
        cam = np.clip(cam, 0.0, None)
        peak = float(cam.max())
        maps.append(cam / peak if peak > 0 else cam)
    keys = np.asarray(present, dtype=np.int64) - 1
    hr = np.stack(maps).astype(np.float32) if maps else np.zeros((0, h, w), np.float32)
    return {"keys": keys, "high_res": hr}


def _generate(spec: _Spec, i: int) -> Sample:
    h, w = (int(v) for v in spec.shapes[i])
    rng = np.random.default_rng([spec.seed, i, 0])
    img, labels, objects = _scene(rng, h, w, spec.max_objects)
    image, jpeg = _jpeg_round_trip(img)
    gt = labels.copy()
    gt[boundary_band(labels, spec.band)] = IGNORE_INDEX
    present = np.unique(labels[labels > 0]).astype(np.int64)
    ev_rng = np.random.default_rng([spec.seed, i, 1])
    events = ev_rng.random(size=(max(len(objects), 1), 4))
    fp_u = ev_rng.random(size=NUM_CLASSES)
    fp_events = {c: float(fp_u[c]) for c in range(NUM_CLASSES)}
    pseudo = {}
    for n, name in enumerate(spec.set_names):
        pseudo[name] = _hard_set(spec, n, objects, labels, present, events, fp_events,
                                 np.random.default_rng([spec.seed, i, 2, n]))
    cams = {}
    for m, name in enumerate(spec.soft_set_names):
        cams[name] = _soft_set(spec, m, objects, present, events,
                               np.random.default_rng([spec.seed, i, 3, m]), h, w)
    return Sample(spec.ids[i], image, jpeg, labels, gt, pseudo, cams, present)
