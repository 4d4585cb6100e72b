"""`shapes`: pictures of coloured shapes on a 3x3 grid, drawn with Pillow; questions about them.

The laptop stand-in for a vision-language reasoning task. A scene holds k shapes (k = the
difficulty) in distinct cells of a 3x3 grid; each has a colour (red, yellow, green, blue) and a
form (circle, ring, square, triangle). Questions (option `question`):

- `mood`: an abstract label defined by a composition rule — the stand-in for an emotion label
  that depends on the whole picture, not on one object. Warm colours are red and yellow, cool
  ones green and blue; round forms are circle and ring, sharp ones square and triangle. The
  majority temperature and the majority form give the label: warm+round = joy, warm+sharp =
  anger, cool+round = calm, cool+sharp = sad (a tie counts as warm, resp. sharp).
- `count`: "how many red?" / "how many circle?" — a count of one colour or one form.
- `mixed`: either, half and half.

The expert trace is the scene description then the reasoning: one line per shape in reading
order, its cell first (`tl red circle`; cells are t/m/b rows by l/c/r columns), then for `mood` the two counts
and the pair (`warm 2 cool 1`, `round 1 sharp 2`, `warm sharp`), for `count` the matching cells
(`red at tl br`), then `A:<answer>`. The answer is checked exactly.
"""

from __future__ import annotations

import random

import numpy as np

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, register_task
from thinkling.tasks.synthetic import check_count, difficulty_levels, rng_for

COLOURS = {"red": (220, 40, 40), "yellow": (230, 200, 20), "green": (40, 170, 60), "blue": (40, 80, 220)}
WARM = ("red", "yellow")
FORMS = ("circle", "ring", "square", "triangle")
ROUND = ("circle", "ring")
CELLS = ("tl", "tc", "tr", "ml", "mc", "mr", "bl", "bc", "br")  # reading order
MOODS = {("warm", "round"): "joy", ("warm", "sharp"): "anger", ("cool", "round"): "calm", ("cool", "sharp"): "sad"}
QUESTIONS = ("mood", "count", "mixed")


def mood_of(scene: list[tuple[str, str, str]]) -> tuple[list[str], str]:
    """The reasoning lines and the label of a scene of (colour, form, cell)."""
    warm = sum(c in WARM for c, _, _ in scene)
    rnd = sum(f in ROUND for _, f, _ in scene)
    cool, sharp = len(scene) - warm, len(scene) - rnd
    temp = "warm" if warm >= cool else "cool"
    form = "round" if rnd > sharp else "sharp"
    return [f"warm {warm} cool {cool}", f"round {rnd} sharp {sharp}", f"{temp} {form}"], MOODS[(temp, form)]


def draw(scene: list[tuple[str, str, str]], rng: random.Random, size: int = 36, noise: float = 6.0):
    """The RGB picture of a scene: each shape in its grid cell with a jittered size and centre,
    colours and background jittered, plus Gaussian pixel noise."""
    from PIL import Image, ImageDraw

    shade = rng.randint(225, 255)
    img = Image.new("RGB", (size, size), (shade, shade, shade))
    pen = ImageDraw.Draw(img)
    cell = size / 3
    for colour, form, where in scene:
        i = CELLS.index(where)
        cx = (i % 3 + 0.5) * cell + rng.uniform(-1, 1)
        cy = (i // 3 + 0.5) * cell + rng.uniform(-1, 1)
        r = rng.uniform(0.32, 0.42) * cell
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLOURS[colour])
        box = (cx - r, cy - r, cx + r, cy + r)
        if form == "circle":
            pen.ellipse(box, fill=fill)
        elif form == "ring":
            pen.ellipse(box, outline=fill, width=max(1, round(r / 2.5)))
        elif form == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    if noise:
        pixels = np.asarray(img, dtype=np.float32)
        gauss = np.random.default_rng(rng.getrandbits(32)).normal(0, noise, pixels.shape)
        img = Image.fromarray(np.clip(pixels + gauss, 0, 255).astype(np.uint8))
    return img


@register_task("shapes")
class ShapesTask(Task):
    """k coloured shapes on a 3x3 grid (k = difficulty, 1..9); mood (a composition rule) or count questions."""

    description = "Pictures of k coloured shapes on a 3x3 grid (difficulty = k); mood / count questions (vision)"

    def __init__(self, question: str = "mood", image_size: int = 36, noise: float = 6.0):
        if question not in QUESTIONS:
            raise ThinklingError(f"task 'shapes': question must be one of {', '.join(QUESTIONS)}, got {question!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 12 <= image_size <= 512:
            raise ThinklingError(f"task 'shapes': image_size must be an int in 12..512, got {image_size!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 64:
            raise ThinklingError(f"task 'shapes': noise must be a number in [0, 64], got {noise!r}")
        self.question, self.image_size, self.noise = question, image_size, float(noise)

    def problems(self, n, seed, difficulty=None):
        levels = difficulty_levels("shapes", difficulty, default=3, minimum=1)
        if max(levels) > len(CELLS):
            raise ThinklingError(f"task 'shapes': difficulty is the number of shapes, at most {len(CELLS)} "
                                 f"(got {difficulty!r})")
        rng = rng_for("shapes", seed)
        problems = []
        for i in range(check_count("shapes", n)):
            k = rng.choice(levels)
            cells = sorted(rng.sample(range(len(CELLS)), k))
            scene = [(rng.choice(list(COLOURS)), rng.choice(FORMS), CELLS[c]) for c in cells]
            question = self.question if self.question != "mixed" else rng.choice(("mood", "count"))
            # Cell first: a line names where to look, then what is there (colour-first traces taught the
            # tiny VLM positions but not colours in 300 SFT steps, docs/vlm.md).
            lines = [f"{w} {c} {f}" for c, f, w in scene]
            if question == "mood":
                reasoning, answer = mood_of(scene)
                prompt, label = "mood?", answer
            else:
                kind = rng.choice(("colour", "form"))
                value = rng.choice(list(COLOURS) if kind == "colour" else FORMS)
                where = [w for c, f, w in scene if value in (c, f)]
                reasoning, answer = [f"{value} at {' '.join(where) or 'none'}"], str(len(where))
                prompt, label = f"how many {value}?", f"count={answer}"
            problems.append(Problem(
                id=f"shapes-{seed}-{i}",
                prompt=prompt,
                answer=answer,
                steps=tuple(lines + reasoning),
                difficulty=float(k),
                tags=("shapes", question, f"label={label}"),
                images=(draw(scene, rng, self.image_size, self.noise),),
                meta={"scene": tuple(scene)},
            ))
        return problems
