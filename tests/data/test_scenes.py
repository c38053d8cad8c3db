"""The synthetic scenes: deterministic, and the pixels show what the text says."""

from __future__ import annotations

import random

import numpy as np
import pytest

from minigpt4.data import scenes
from minigpt4.data.scenes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, cell_box, render_scene

# Filled fraction of each shape's bounding box, from its geometry (see scenes._outline).
EXPECTED_FILL = {
    "circle": np.pi / 4,
    "square": 1.0,
    "diamond": 0.5,
    "triangle": 0.5,
    "star": 0.384,
    "cross": 0.578,
}


def _pixels_of(image, rgb) -> np.ndarray:
    return np.all(np.asarray(image) == np.array(rgb, dtype=np.uint8), axis=-1)


def test_same_seed_gives_the_same_scene_and_different_seeds_differ():
    a, b = render_scene(random.Random(7)), render_scene(random.Random(7))
    assert a.objects == b.objects and a.background == b.background
    assert a.image.tobytes() == b.image.tobytes()
    others = [render_scene(random.Random(seed)) for seed in range(8, 16)]
    assert len({s.image.tobytes() for s in others + [a]}) == 9
    assert scenes.questions(a, random.Random(1)) == scenes.questions(b, random.Random(1))
    assert scenes.pope_probes(a, random.Random(1)) == scenes.pope_probes(b, random.Random(1))


def test_text_of_a_known_seed_is_stable():
    # The evaluation set is regenerated from seeds on every machine: its text must not drift.
    assert scenes.caption(render_scene(random.Random(0))) == (
        "a blue circle, a red triangle, a red diamond and a white star"
    )


@pytest.mark.parametrize("seed", range(12))
def test_every_object_is_drawn_in_its_cell_with_its_colour_and_shape(seed):
    scene = render_scene(random.Random(seed), size=448, n_objects=random.Random(seed).randint(1, 9))
    image = np.asarray(scene.image)
    covered = np.zeros(image.shape[:2], dtype=bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = cell_box(obj.position, 448)
        in_cell = _pixels_of(scene.image, COLOURS[obj.colour])[y0:y1, x0:x1]
        bx0, by0, bx1, by1 = obj.box
        assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1, "box must lie inside the cell"
        in_box = _pixels_of(scene.image, COLOURS[obj.colour])[by0:by1, bx0:bx1]
        assert in_box.sum() == in_cell.sum(), "all of the object's pixels lie in its box"
        centre = image[(by0 + by1) // 2, (bx0 + bx1) // 2]
        assert tuple(centre) == COLOURS[obj.colour]
        fill = in_box.sum() / in_box.size
        assert fill == pytest.approx(EXPECTED_FILL[obj.shape], abs=0.06), obj
        if obj.shape in ("triangle", "diamond"):
            # Same fill; a triangle is widest at its base, a diamond in its middle.
            widest = np.argmax(in_box.sum(axis=1)) / in_box.shape[0]
            assert widest > 0.85 if obj.shape == "triangle" else 0.35 < widest < 0.65
        covered[y0:y1, x0:x1] = True
    rest = image[~covered]
    assert np.all(rest == np.array(BACKGROUNDS[scene.background], dtype=np.uint8)), "empty cells are bare"


def test_objects_are_unique_and_in_reading_order():
    for seed in range(30):
        scene = render_scene(random.Random(seed))
        assert 1 <= len(scene.objects) <= 4
        kinds = [(o.shape, o.colour) for o in scene.objects]
        assert len(set(kinds)) == len(kinds)
        order = [POSITIONS.index(o.position) for o in scene.objects]
        assert order == sorted(set(order))
        assert all(o.shape in SHAPES and o.colour in COLOURS for o in scene.objects)


def test_caption_and_description_name_every_object():
    scene = render_scene(random.Random(3), n_objects=3)
    cap, desc = scenes.caption(scene), scenes.describe(scene)
    assert cap.count(" and ") == 1 and cap.count(", ") == 1
    assert desc.startswith(f"The image shows three shapes on a plain {scene.background} background.")
    for obj in scene.objects:
        assert obj.name in cap
        assert f"{obj.name} is in the {obj.position}." in desc


def test_questions_have_answers_that_match_the_scene():
    for seed in range(20):
        scene = render_scene(random.Random(seed))
        qa = dict(scenes.questions(scene, random.Random(seed)))
        assert len(qa) == 3 * len(scene.objects) + 2, "no question repeats"
        assert qa["How many shapes are in the image?"] == str(len(scene.objects))
        for obj in scene.objects:
            assert qa[f"What colour is the shape in the {obj.position}?"] == obj.colour
            assert qa[f"What shape is in the {obj.position}?"] == obj.shape
            assert qa[f"Where is the {obj.name}?"] == obj.position
        (count_q,) = [q for q in qa if q.startswith("How many") and "shapes" not in q]
        shape = next(s for s in SHAPES if f" {scenes.plural(s)} " in count_q)
        assert qa[count_q] == str(sum(o.shape == shape for o in scene.objects))


@pytest.mark.parametrize("adversarial", [False, True])
def test_pope_probes_are_balanced_and_true(adversarial):
    for seed in range(20):
        scene = render_scene(random.Random(seed))
        probes = scenes.pope_probes(scene, random.Random(seed), n_per_answer=3, adversarial=adversarial)
        answers = [a for _, a in probes]
        assert answers.count("yes") == answers.count("no") == min(3, len(scene.objects))
        present = {o.name for o in scene.objects}
        for question, answer in probes:
            name = question.removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
            assert (name in present) == (answer == "yes"), question
            if adversarial and answer == "no":
                colour, shape = name.split(" ")
                assert any(o.shape == shape or o.colour == colour for o in scene.objects)


def test_bad_object_counts_are_refused():
    with pytest.raises(ValueError, match="between 1 and 9"):
        render_scene(random.Random(0), n_objects=0)
    with pytest.raises(ValueError, match="between 1 and 9"):
        render_scene(random.Random(0), n_objects=10)
