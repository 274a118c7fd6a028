"""Drawing one SynthPEDES image: backgrounds, the person in a view and pose, garment patterns,
occluders, lighting, blur and sensor noise; every pixel a function of the random generator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tbps.data.synth.attributes import COLOURS, HAIR_COLOURS, Looks, PersonAttributes, weighted_choice

NOISE_MAX = 2.5  # sensor noise sigma in grey levels, on one image in five (noise costs disk space)


def make_backgrounds(rng: np.random.Generator, height: int, width: int, count: int) -> list[Image.Image]:
    """A bank of scenes twice as wide as an image; each image crops, flips and relights one."""
    bank = []
    wide = width * 2
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    for index in range(count):
        kind = index % 4
        horizon = int(height * rng.uniform(0.55, 0.78))
        top = rng.uniform(90, 215, size=3).astype(np.float32)
        bottom = top * rng.uniform(0.7, 1.0)
        arr = np.broadcast_to(top + (bottom - top) * ys, (height, wide, 3)).copy()
        ground = rng.uniform(70, 170, size=3).astype(np.float32)
        if kind == 1:  # park: green ground
            ground = np.array([rng.uniform(60, 110), rng.uniform(110, 160), rng.uniform(50, 90)], np.float32)
        elif kind == 2:  # pavement: grey
            ground = np.full(3, rng.uniform(90, 170), np.float32)
        gy = np.linspace(0.85, 1.1, height - horizon, dtype=np.float32)[:, None, None]
        arr[horizon:] = ground * gy
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        if kind in (0, 2):  # building facades with windows / shop fronts
            x = int(rng.integers(-width // 4, 0))
            while x < wide:
                w = int(rng.integers(width // 2, width + 1))
                wall = tuple(int(v) for v in rng.uniform(80, 220, size=3))
                top_y = int(rng.uniform(0, 0.3) * horizon)
                draw.rectangle([x, top_y, x + w, horizon], fill=wall)
                win = tuple(int(v * 0.55) for v in wall)
                step_x, step_y = max(6, w // 4), max(8, horizon // 6)
                for wx in range(x + step_x // 3, x + w - step_x // 2, step_x):
                    for wy in range(top_y + step_y // 3, horizon - step_y, step_y):
                        draw.rectangle([wx, wy, wx + step_x // 2, wy + step_y // 2], fill=win)
                x += w
        elif kind == 1:  # trees
            for _ in range(int(rng.integers(3, 7))):
                cx, cy = rng.uniform(0, wide), rng.uniform(0.2, 0.7) * horizon
                r = rng.uniform(0.15, 0.35) * width
                leaf = (int(rng.uniform(30, 80)), int(rng.uniform(90, 150)), int(rng.uniform(30, 80)))
                draw.rectangle([cx - r * 0.12, cy, cx + r * 0.12, horizon], fill=(90, 65, 40))
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=leaf)
        else:  # indoor: wall panels and doors
            for _ in range(int(rng.integers(2, 5))):
                x0 = rng.uniform(0, wide)
                w = rng.uniform(0.2, 0.5) * width
                colour = tuple(int(v) for v in rng.uniform(60, 230, size=3))
                draw.rectangle([x0, rng.uniform(0.2, 0.5) * horizon, x0 + w, horizon], fill=colour)
        # ground texture: tiles or path lines, denser towards the horizon
        line = tuple(int(v * 0.8) for v in ground)
        y = float(horizon)
        gap = max(2.0, 0.02 * height)
        while y < height:
            draw.line([0, y, wide, y], fill=line, width=1)
            gap *= 1.35
            y += gap
        if kind in (2, 3):
            for x in np.arange(rng.uniform(0, width / 3), wide, width / 3):
                draw.line([x, horizon, x + (x - wide / 2) * 0.8, height], fill=line, width=1)
        bank.append(img)
    return bank


# ----------------------------------------------------------------------------- rendering

def _rgb(name: str, jitter: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    base = COLOURS[name][0]
    return tuple(int(min(255, max(0, c + j))) for c, j in zip(base, jitter))


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * factor)) for c in rgb)


class _Painter:
    """Draws in person coordinates: x in person heights from the body axis, y from the head top.

    ``facing`` mirrors x for side views, so the side figure is drawn once, facing right.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, cx: float, top: float, h: float, facing: int = 1) -> None:
        self.draw, self.cx, self.top, self.h, self.facing = draw, cx, top, h, facing

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.facing * x * self.h, self.top + y * self.h

    def poly(self, pts, fill, outline=None) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in pts], fill=fill, outline=outline)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill, outline=None) -> None:
        (x0, y0), (x1, y1) = self.pt(x - rx, y - ry), self.pt(x + rx, y + ry)
        self.draw.ellipse([min(x0, x1), y0, max(x0, x1), y1], fill=fill, outline=outline)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill, radius: float = 0.0, outline=None) -> None:
        (a, b), (c, d) = self.pt(x0, y0), self.pt(x1, y1)
        box = [min(a, c), min(b, d), max(a, c), max(b, d)]
        if radius > 0:
            self.draw.rounded_rectangle(box, radius=radius * self.h, fill=fill, outline=outline)
        else:
            self.draw.rectangle(box, fill=fill, outline=outline)

    def chord(self, x0: float, y0: float, x1: float, y1: float, fill, outline=None) -> None:
        """The upper half of the ellipse in the box: a cap's crown."""
        (a, b), (c, d) = self.pt(x0, y0), self.pt(x1, y1)
        self.draw.chord([min(a, c), min(b, d), max(a, c), max(b, d)], 180, 360, fill=fill, outline=outline)

    def line(self, pts, fill, width: float) -> None:
        self.draw.line([self.pt(x, y) for x, y in pts], fill=fill, width=max(1, int(round(width * self.h))))

    def limb(self, x0: float, y0: float, x1: float, y1: float, w0: float, w1: float, fill, outline=None) -> None:
        """A tapered quad from (x0, y0) to (x1, y1): an arm, a leg or a sleeve."""
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy) or 1.0
        nx, ny = -dy / n, dx / n
        self.poly([(x0 + nx * w0 / 2, y0 + ny * w0 / 2), (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
                   (x1 - nx * w1 / 2, y1 - ny * w1 / 2), (x0 - nx * w0 / 2, y0 - ny * w0 / 2)], fill, outline)


@dataclass
class Pose:
    view: str
    facing: int  # side view: +1 right, -1 left
    arm_swing: float
    stride: float
    spread: float


@dataclass
class _Figure:
    """What every part of one drawn person reads: the painter, the person, the view and the body's
    colours and proportions (fractions of the person's height ``h``)."""

    P: _Painter
    person: PersonAttributes
    looks: Looks
    pose: Pose
    view: str
    side: bool
    skin: tuple[int, int, int]
    upper_rgb: tuple[int, int, int]
    upper_edge: tuple[int, int, int]
    lower_rgb: tuple[int, int, int]
    bag_rgb: tuple[int, int, int] | None
    hair_rgb: tuple[int, int, int]
    sw: float  # shoulder half-width
    hw: float  # hip half-width
    waist_y: float
    hem_y: float


def render_person(img: Image.Image, person: PersonAttributes, looks: Looks, pose: Pose,
                  cx: float, top: float, h: float) -> None:
    """Draw the person back to front; garments go through a mask so stripes and checks clip to them."""
    view = pose.view
    side = view == "side"
    female = person.gender == "female"
    upper_rgb = _rgb(person.upper_colour, looks.jitter)
    f = _Figure(
        P=_Painter(ImageDraw.Draw(img), cx, top, h, pose.facing if side else 1), person=person, looks=looks,
        pose=pose, view=view, side=side, skin=looks.skin, upper_rgb=upper_rgb, upper_edge=_shade(upper_rgb, 0.6),
        lower_rgb=_rgb(person.lower_colour, looks.jitter) if person.lower_type != "none" else looks.skin,
        bag_rgb=_rgb(person.bag_colour, looks.jitter) if person.bag_type != "none" else None,
        hair_rgb=HAIR_COLOURS[person.hair_colour][0],
        sw=(0.1 if female else 0.115) * looks.build * (0.6 if side else 1.0),
        hw=(0.1 if female else 0.092) * looks.build * (0.68 if side else 1.0),
        waist_y=0.47, hem_y={"coat": 0.7, "dress": 0.66}.get(person.upper_type, 0.49))
    _draw_behind_body(f)
    _draw_legs(f)
    arms, sleeves = _draw_arms(f)
    _draw_upper_garment(img, f, sleeves, top, h)
    _draw_garment_details(f)
    _draw_hands_and_carried(f, arms)
    _draw_head(f)


def _draw_behind_body(f: _Figure) -> None:
    """Suitcase on the far side, backpack body (front and side views), long hair (front)."""
    P, person, view, side, sw, bag_rgb, hair_rgb = f.P, f.person, f.view, f.side, f.sw, f.bag_rgb, f.hair_rgb
    bag = person.bag_type
    if bag == "backpack" and view == "front":
        P.rect(-sw - 0.014, 0.17, sw + 0.014, 0.41, bag_rgb, radius=0.02)
    if bag == "backpack" and side:
        P.rect(-sw - 0.09, 0.17, -sw + 0.01, 0.43, bag_rgb, radius=0.025, outline=_shade(bag_rgb, 0.6))
    if person.hair_length == "long" and view != "back":
        P.rect(-0.062 if not side else -0.07, 0.05, 0.062 if not side else 0.02, 0.27, hair_rgb, radius=0.03)


def _draw_legs(f: _Figure) -> None:
    """Legs (bare or in trousers, jeans, shorts), shoes, and the lower garment's top."""
    P, person, pose, side, hw, waist_y = f.P, f.person, f.pose, f.side, f.hw, f.waist_y
    skin, lower_rgb, shoe_rgb = f.skin, f.lower_rgb, _rgb(person.shoe_colour)
    if side:
        feet = [(pose.stride, 0.935), (-0.8 * pose.stride, 0.935)]
        hips = [(0.0, waist_y), (0.0, waist_y)]
    else:
        feet = [(-pose.spread, 0.935), (pose.spread, 0.935)]
        hips = [(-0.045, waist_y), (0.045, waist_y)]
    bare_from = {"shorts": 0.6, "skirt": 0.6, "none": 0.55}.get(person.lower_type, 0.93)
    for (hx, hy), (fx, fy) in zip(hips, feet):
        P.limb(hx, hy, fx, fy, 0.085, 0.06, skin if bare_from < 0.9 else lower_rgb)
        if person.lower_type in ("trousers", "jeans"):
            P.limb(hx, hy, fx, fy, 0.085, 0.06, lower_rgb, outline=_shade(lower_rgb, 0.7))
            if person.lower_type == "jeans":  # a lighter seam down the leg
                P.line([(hx + (0.03 if hx >= 0 else -0.03), hy + 0.02), (fx + (0.022 if fx >= 0 else -0.022), fy - 0.02)],
                       _shade(lower_rgb, 1.35), 0.008)
        elif person.lower_type == "shorts":
            t = (bare_from - hy) / (fy - hy)
            P.limb(hx, hy, hx + (fx - hx) * t, bare_from, 0.095, 0.085, lower_rgb, outline=_shade(lower_rgb, 0.7))
    for fx, fy in feet:
        if side:
            P.ellipse(fx + 0.03, fy + 0.01, 0.058, 0.026, shoe_rgb, outline=_shade(shoe_rgb, 0.6))
        else:
            P.ellipse(fx, fy + 0.012, 0.04, 0.026, shoe_rgb, outline=_shade(shoe_rgb, 0.6))
    if person.lower_type in ("trousers", "jeans", "shorts"):
        P.poly([(-hw, waist_y - 0.01), (hw, waist_y - 0.01), (hw * 0.9, waist_y + 0.08), (-hw * 0.9, waist_y + 0.08)],
               lower_rgb)
    elif person.lower_type == "skirt":
        P.poly([(-hw, waist_y - 0.01), (hw, waist_y - 0.01), (hw + 0.05, 0.65), (-hw - 0.05, 0.65)], lower_rgb,
               outline=_shade(lower_rgb, 0.7))


def _draw_arms(f: _Figure) -> tuple[list[tuple[float, float, float, float]], list[tuple[float, ...]]]:
    """Bare arms; returns them (shoulder to hand) and the sleeves the garment mask will cover."""
    P, person, pose, side, sw, skin = f.P, f.person, f.pose, f.side, f.sw, f.skin
    skin_dark = _shade(skin, 0.8)
    long_sleeves = person.upper_type not in ("t-shirt", "dress")
    if side:
        arms = [(0.0, 0.17, -pose.arm_swing, 0.49), (0.0, 0.17, pose.arm_swing, 0.49)]  # far, near
    else:
        arms = [(s * (sw - 0.018), 0.17, s * (sw + 0.02 + pose.arm_swing), 0.49) for s in (-1, 1)]
    sleeves = []
    for ax0, ay0, ax1, ay1 in arms:
        P.limb(ax0, ay0, ax1, ay1, 0.05, 0.038, skin, outline=skin_dark)
        if long_sleeves:
            sleeves.append((ax0, ay0, ax0 + (ax1 - ax0) * 0.95, ay0 + (ay1 - ay0) * 0.95, 0.056, 0.045))
        else:
            sleeves.append((ax0, ay0, ax0 + (ax1 - ax0) * 0.33, ay0 + (ay1 - ay0) * 0.33, 0.06, 0.055))
    return arms, sleeves


def _draw_upper_garment(img: Image.Image, f: _Figure, sleeves: list[tuple[float, ...]], top: float, h: float) -> None:
    """Torso and sleeves through a mask, so a pattern clips to the garment."""
    P, person, side, sw, hw, hem_y = f.P, f.person, f.side, f.sw, f.hw, f.hem_y
    upper_rgb, upper_edge = f.upper_rgb, f.upper_edge
    mask = Image.new("L", img.size, 0)
    M = _Painter(ImageDraw.Draw(mask), P.cx, P.top, P.h, P.facing)
    if person.upper_type == "dress":
        torso = [(-sw * 0.9, 0.16), (sw * 0.9, 0.16), (hw * 0.9, 0.42), (hw + 0.06, hem_y), (-hw - 0.06, hem_y),
                 (-hw * 0.9, 0.42)]
    elif person.upper_type == "coat":
        torso = [(-sw, 0.155), (sw, 0.155), (hw + 0.03, 0.45), (hw + 0.045, hem_y), (-hw - 0.045, hem_y),
                 (-hw - 0.03, 0.45)]
    else:
        torso = [(-sw, 0.155), (sw, 0.155), (hw * 1.03, hem_y), (-hw * 1.03, hem_y)]
    if side:
        torso = [(x + (0.012 if x > 0 else 0.0), y) for x, y in torso]  # a chest
    M.poly(torso, 255)
    for i, (x0, y0, x1, y1, w0, w1) in enumerate(sleeves):
        if side and i == 0:
            continue  # the far arm's sleeve is drawn darker, behind
        M.limb(x0, y0, x1, y1, w0, w1, 255)
    if side:
        x0, y0, x1, y1, w0, w1 = sleeves[0]
        P.limb(x0, y0, x1, y1, w0, w1, _shade(upper_rgb, 0.75))
    if person.upper_pattern == "plain":
        img.paste(upper_rgb, mask=mask)
    else:
        img.paste(_pattern(img.size, person.upper_pattern, upper_rgb, _rgb(person.pattern_colour), top, h),
                  mask=mask)
    P.poly(torso, None, outline=upper_edge)


def _draw_garment_details(f: _Figure) -> None:
    """Jacket opening, coat buttons, shirt collar, hood or pocket, logo, belt."""
    P, person, view, looks, hw, waist_y, hem_y = f.P, f.person, f.view, f.looks, f.hw, f.waist_y, f.hem_y
    upper_rgb, upper_edge = f.upper_rgb, f.upper_edge
    if person.upper_type == "jacket" and view == "front":
        P.rect(-0.025, 0.16, 0.025, hem_y, _rgb(looks.inner))
        P.line([(0.0, 0.16), (0.0, hem_y)], upper_edge, 0.006)
    elif person.upper_type == "coat" and view == "front":
        P.line([(0.0, 0.17), (0.0, hem_y)], upper_edge, 0.008)
        for by in (0.26, 0.34, 0.42, 0.5):
            P.ellipse(0.025, by, 0.008, 0.006, upper_edge)
        P.poly([(-0.05, 0.155), (0.0, 0.24), (0.05, 0.155)], _rgb(looks.inner))
    elif person.upper_type == "shirt" and view == "front":
        P.poly([(-0.045, 0.152), (0.0, 0.2), (0.045, 0.152), (0.0, 0.17)], _shade(upper_rgb, 1.25))
        P.line([(0.0, 0.2), (0.0, hem_y)], upper_edge, 0.005)
    elif person.upper_type == "hoodie":
        if view == "back":
            P.ellipse(0.0, 0.19, 0.07, 0.05, _shade(upper_rgb, 0.82), outline=upper_edge)
        elif view == "front":
            P.rect(-0.07, 0.37, 0.07, 0.46, _shade(upper_rgb, 0.85), radius=0.01)
            P.ellipse(0.0, 0.155, 0.07, 0.02, _shade(upper_rgb, 0.8))
        else:
            P.ellipse(-0.04, 0.17, 0.04, 0.045, _shade(upper_rgb, 0.82))
    if person.logo != "none" and view == "front":
        P.rect(-0.035, 0.23, 0.035, 0.29, _rgb(person.logo), radius=0.008)
    if person.belt != "none":
        belt_rgb = _rgb(person.belt)
        P.rect(-hw * 1.03, waist_y - 0.008, hw * 1.03, waist_y + 0.013, belt_rgb)
        if view == "front":
            P.rect(-0.014, waist_y - 0.006, 0.014, waist_y + 0.011, (200, 190, 120))


def _draw_hands_and_carried(f: _Figure, arms: list[tuple[float, float, float, float]]) -> None:
    """Hands, and the carried item in front of the body."""
    P, person, view, side, sw, hw, skin, bag_rgb = f.P, f.person, f.view, f.side, f.sw, f.hw, f.skin, f.bag_rgb
    carry, bag = f.looks.carry_side, person.bag_type
    for _, _, ax1, ay1 in arms[1:] if side else arms:
        P.ellipse(ax1, ay1 + 0.012, 0.021, 0.023, skin)
    hand_x = arms[1][2] if side else arms[0 if carry < 0 else 1][2]
    if bag == "backpack" and view == "back":
        P.rect(-0.085, 0.17, 0.085, 0.43, bag_rgb, radius=0.025, outline=_shade(bag_rgb, 0.6))
        P.rect(-0.06, 0.33, 0.06, 0.42, _shade(bag_rgb, 0.8), radius=0.015)
    elif bag == "backpack" and view == "front":
        for s in (-1, 1):
            P.limb(s * 0.065, 0.158, s * 0.075, 0.36, 0.024, 0.022, bag_rgb)
    elif bag == "handbag":
        P.line([(hand_x - 0.03, 0.52), (hand_x, 0.495), (hand_x + 0.03, 0.52)], _shade(bag_rgb, 0.7), 0.008)
        P.poly([(hand_x - 0.05, 0.52), (hand_x + 0.05, 0.52), (hand_x + 0.06, 0.62), (hand_x - 0.06, 0.62)],
               bag_rgb, outline=_shade(bag_rgb, 0.6))
    elif bag == "shoulder bag":
        s = carry if not side else -1
        if view != "side":
            P.line([(-s * (sw - 0.03), 0.16), (s * (hw + 0.03), 0.46)], _shade(bag_rgb, 0.8), 0.018)
        else:
            P.line([(0.0, 0.16), (-0.02, 0.44)], _shade(bag_rgb, 0.8), 0.018)
        bx = s * (hw + 0.05) if not side else -0.02
        P.rect(bx - 0.055, 0.42, bx + 0.055, 0.55, bag_rgb, radius=0.012, outline=_shade(bag_rgb, 0.6))
    elif bag == "suitcase":
        sx = hand_x + (0.06 * carry if not side else -0.08)
        P.line([(hand_x, 0.5), (sx, 0.62)], (60, 60, 64), 0.01)
        P.rect(sx - 0.065, 0.62, sx + 0.065, 0.93, bag_rgb, radius=0.015, outline=_shade(bag_rgb, 0.55))
        P.line([(sx, 0.64), (sx, 0.91)], _shade(bag_rgb, 0.8), 0.006)
        for wx in (sx - 0.045, sx + 0.045):
            P.ellipse(wx, 0.94, 0.012, 0.012, (30, 30, 30))


def _draw_head(f: _Figure) -> None:
    """Neck, head (hair from behind, face from the front or side), long hair, headwear."""
    P, person, view, side, skin, hair_rgb, jit = f.P, f.person, f.view, f.side, f.skin, f.hair_rgb, f.looks.jitter
    P.rect(-0.022, 0.11, 0.022, 0.165, skin)
    head_rx, head_ry = (0.05, 0.066)
    if view == "back":
        P.ellipse(0.0, 0.075, head_rx, head_ry, hair_rgb)
        if person.hair_length == "long":
            P.rect(-0.07, 0.06, 0.07, 0.27, hair_rgb, radius=0.03)
    elif view == "front":
        P.ellipse(0.0, 0.072, head_rx + 0.006, head_ry + 0.006, hair_rgb)
        P.ellipse(0.0, 0.088, head_rx - 0.004, head_ry - 0.014, skin)
        for ex in (-0.018, 0.018):
            P.ellipse(ex, 0.08, 0.006, 0.004, (40, 30, 30))
        if person.hair_length == "long":
            for s in (-1, 1):
                P.rect(s * 0.062, 0.05, s * 0.04, 0.25, hair_rgb)
    else:
        P.ellipse(0.0, 0.075, head_rx, head_ry, hair_rgb)
        P.ellipse(0.018, 0.085, head_rx - 0.012, head_ry - 0.014, skin)
        P.ellipse(0.035, 0.08, 0.005, 0.004, (40, 30, 30))
    if person.headwear != "none":
        hat_rgb = _rgb(person.headwear_colour, jit)
        edge = _shade(hat_rgb, 0.6)
        if person.headwear == "cap":
            P.chord(-0.056, 0.0, 0.056, 0.09, hat_rgb, outline=edge)
            if view == "front":
                P.rect(-0.06, 0.04, 0.06, 0.055, _shade(hat_rgb, 0.85))
            elif side:
                P.rect(0.03, 0.038, 0.1, 0.052, _shade(hat_rgb, 0.85))
        else:
            P.ellipse(0.0, 0.03, 0.095, 0.02, hat_rgb, outline=edge)
            P.rect(-0.05, -0.035, 0.05, 0.03, hat_rgb, radius=0.015, outline=edge)
            P.rect(-0.05, 0.012, 0.05, 0.024, _shade(hat_rgb, 0.7))


def _pattern(size: tuple[int, int], pattern: str, base: tuple[int, int, int], second: tuple[int, int, int],
             top: float, h: float) -> Image.Image:
    """Stripes or checks anchored to the person, bold enough to survive 3x downsizing."""
    width, height = size
    img = Image.new("RGB", size, base)
    draw = ImageDraw.Draw(img)
    period = max(4.0, 0.05 * h if pattern == "striped" else 0.065 * h)
    half = period / 2
    y = top - period * math.ceil(top / period)
    row = 0
    while y < height:
        if pattern == "striped":
            draw.rectangle([0, y, width, y + half - 1], fill=second)
        else:
            x = (row % 2) * half
            while x < width:
                draw.rectangle([x, y, x + half - 1, y + half - 1], fill=second)
                x += period
        y += half if pattern == "checked" else period
        row += 1
    return img


def _occlude(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    """Something between the camera and the person: a car bonnet or bench, a pole, a passer-by."""
    kind = int(rng.integers(3))
    colour = tuple(int(v) for v in rng.uniform(30, 200, size=3))
    if kind == 0:
        y0 = rng.uniform(0.8, 0.9) * height
        draw.rounded_rectangle([-10, y0, width + 10, height + 10], radius=0.05 * width, fill=colour)
    elif kind == 1:
        x0 = rng.uniform(0.0, 0.9) * width
        draw.rectangle([x0, 0, x0 + rng.uniform(0.05, 0.1) * width, height], fill=colour)
    else:
        w = rng.uniform(0.12, 0.22) * width
        x0 = -w * 0.3 if rng.random() < 0.5 else width - w * 0.7
        draw.rounded_rectangle([x0, rng.uniform(0.15, 0.3) * height, x0 + w, height + 10], radius=w * 0.3,
                               fill=colour)


def _relight(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera and lighting: overall gain, a colour cast, a brightness gradient, sensor noise.

    Done with Pillow lookup tables and uint8 blends rather than float arrays: this is the hot loop.
    """
    width, height = img.size
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.93, 1.07, size=3)
    ramp = np.arange(256, dtype=np.float64)
    lut = np.concatenate([np.minimum(255.0, ramp * g) for g in gain]).astype(np.uint8)
    img = img.point(lut.tolist())
    amount = rng.uniform(0.0, 0.3)
    if amount > 0.05:
        angle = rng.uniform(0, 2 * math.pi)
        gx = np.linspace(0.0, 1.0, width, dtype=np.float32) * math.cos(angle)
        gy = np.linspace(0.0, 1.0, height, dtype=np.float32) * math.sin(angle)
        ramp2d = gy[:, None] + gx[None, :]
        ramp2d -= ramp2d.min()
        ramp2d /= max(float(ramp2d.max()), 1e-6)
        levels = np.round(255.0 * (1.0 - amount * ramp2d) / 4.0) * 4.0  # banded: compresses far better
        mask = Image.fromarray(levels.clip(0, 255).astype(np.uint8), "L")
        img = Image.composite(img, Image.new("RGB", img.size, 0), mask)
    sigma = rng.uniform(1.0, NOISE_MAX)
    if rng.random() < 0.2:
        noise = (rng.standard_normal((height, width, 1), dtype=np.float32) * sigma).astype(np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    return img


def render_image(person: PersonAttributes, looks: Looks, view: str, rng: np.random.Generator,
                 height: int, width: int, backgrounds: list[Image.Image]) -> Image.Image:
    """One photo of ``person``: background, pose, scale, position, lighting, blur, occlusion all drawn."""
    bank = backgrounds[int(rng.integers(len(backgrounds)))]
    x0 = int(rng.integers(0, bank.width - width + 1))
    img = bank.crop((x0, 0, x0 + width, height))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    h = rng.uniform(0.8, 0.95) * min(height, 3.0 * width)
    top = rng.uniform(0.01, 0.99) * (height - h * 1.0)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * h
    if person.bag_type == "suitcase":
        cx -= looks.carry_side * 0.05 * h
    pose = Pose(view=view, facing=int(weighted_choice(rng, (-1, 1))), arm_swing=float(rng.uniform(-0.02, 0.05)),
                 stride=float(rng.uniform(0.0, 0.09)), spread=float(rng.uniform(0.03, 0.065)))
    if view == "side":
        pose.arm_swing = float(rng.uniform(-0.06, 0.06))
    draw = ImageDraw.Draw(img)
    shadow = tuple(int(v * 0.55) for v in img.getpixel((int(min(width - 1, max(0, cx))), int(min(height - 1, top + h * 0.96)))))
    draw.ellipse([cx - 0.13 * h, top + 0.93 * h, cx + 0.13 * h, top + 0.99 * h], fill=shadow)
    render_person(img, person, looks, pose, cx, top, h)
    if rng.random() < 0.22:
        _occlude(draw, rng, width, height)
    img = _relight(img, rng)
    if rng.random() < 0.35:  # low-resolution camera: down and back up
        factor = rng.uniform(1.5, 2.8)
        small = img.resize((max(1, int(width / factor)), max(1, int(height / factor))), Image.BILINEAR)
        img = small.resize((width, height), Image.BILINEAR)
    return img
