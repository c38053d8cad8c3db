"""Real photos for the offline eval set: images that ship with scikit-image, described by hand.

Every caption, answer and probe below was written by looking at the picture. VQA answers list what
ten annotators might plausibly say (VQAv2 keeps ten answers per question); a variant listed fewer
times earns partial credit, as in VQAv2. `colour` answers the follow-up "What colour is it?" about
the main object, read against `COLOUR_OPTIONS`: every option a careful viewer would accept is listed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Photo:
    file_name: str  # in scikit-image's data folder
    captions: tuple[str, ...]
    questions: tuple[tuple[str, tuple[str, ...]], ...]  # (question, ten answers)
    probes: tuple[tuple[str, str], ...]  # (object, "yes" | "no")
    # Words that name the main object (matched at word starts); ImageNet's name for it where it has one.
    objects: tuple[str, ...] = ()
    # The right answers to "What colour is it?" about the main object, each one of `COLOUR_OPTIONS`.
    colour: tuple[str, ...] = ()
    # For open instructions (minigpt4/eval/instruct.py): one or two sentences of what the picture
    # shows; further words that name its main object; every colour a careful viewer could name in
    # it (a colour word not listed is invented); whether it shows people or animals.
    facts: str = ""
    also_named: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    people: bool = False
    animals: bool = False


# The closed answer set of the photos' colour follow-up. "black and white" is one option (a reply
# naming it does not also name "black" and "white"), right for the grey-scale photos; "grey" and
# "gray" are both there so that either spelling counts.
COLOUR_OPTIONS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
    "black", "white", "gray", "grey", "silver", "gold", "black and white",
)  # fmt: skip


def _ten(*weighted: tuple[str, int]) -> tuple[str, ...]:
    answers = tuple(a for a, n in weighted for _ in range(n))
    if len(answers) != 10:
        raise ValueError(f"VQAv2 keeps ten answers per question, got {len(answers)}: {answers}")
    return answers


def _all(answer: str) -> tuple[str, ...]:
    return _ten((answer, 10))


PHOTOS: tuple[Photo, ...] = (
    Photo(
        "astronaut.png",
        facts="The image is a photo of a smiling woman astronaut in an orange space suit. Behind her are an"
        " American flag and a model of the space shuttle; her black helmet is in front of her.",
        also_named=("woman", "suit"),
        colours=(
            "orange",
            "white",
            "black",
            "blue",
            "red",
            "gray",
            "silver",
            "brown",
            "gold",
            "purple",
            "beige",
        ),
        people=True,
        colour=("orange",),
        objects=("astronaut", "spacesuit", "space suit"),
        captions=(
            "a smiling woman astronaut in an orange space suit",
            "an astronaut posing in front of an american flag and a model of the space shuttle",
            "a portrait of a female astronaut in an orange suit with a black helmet in front of her",
        ),
        questions=(
            ("What colour is her suit?", _all("orange")),
            ("What flag is in the background?", _ten(("american", 7), ("usa", 2), ("us", 1))),
            ("Is the woman smiling?", _all("yes")),
            ("How many people are in the picture?", _all("1")),
        ),
        probes=(("flag", "yes"), ("helmet", "yes"), ("dog", "no"), ("car", "no")),
    ),
    Photo(
        "chelsea.png",
        facts="The image is a close-up photo of the face of a brown tabby cat with green eyes, looking to"
        " the side.",
        also_named=("kitty",),
        # light brown and ginger fur with dark stripes, white whiskers, green-yellow eyes, a pink nose
        colours=(
            "brown",
            "orange",
            "black",
            "white",
            "gray",
            "green",
            "yellow",
            "gold",
            "beige",
            "pink",
            "red",
        ),
        animals=True,
        colour=("brown",),  # light brown fur with dark stripes
        objects=("cat", "kitten", "tabby"),
        captions=(
            "a close-up of the face of a tabby cat",
            "a brown striped cat with green eyes",
            "the face of a tabby cat looking to the side",
        ),
        questions=(
            ("What animal is this?", _ten(("cat", 8), ("kitten", 1), ("tabby cat", 1))),
            ("What colour are the cat's eyes?", _all("green")),
            ("Is the cat asleep?", _all("no")),
        ),
        probes=(("cat", "yes"), ("dog", "no"), ("bird", "no")),
    ),
    Photo(
        "coffee.png",
        facts="The image is a photo of a cup of espresso on a red saucer with a metal spoon, on a wooden"
        " table.",
        also_named=("mug", "saucer"),
        colours=("red", "brown", "white", "silver", "gray", "black", "orange", "gold", "beige"),
        colour=("red", "brown"),  # a dark red cup and saucer, brown coffee
        objects=("coffee", "espresso", "cappuccino", "cup"),
        captions=(
            "a cup of espresso on a saucer with a spoon",
            "a red cup of coffee on a red saucer on a wooden table",
            "an espresso in a red and white cup with a metal spoon beside it",
        ),
        questions=(
            ("What drink is in the cup?", _ten(("coffee", 6), ("espresso", 4))),
            ("What is next to the cup on the saucer?", _all("spoon")),
            ("What colour is the saucer?", _ten(("red", 7), ("brown", 3))),
            ("What is the table made of?", _all("wood")),
        ),
        probes=(("cup", "yes"), ("spoon", "yes"), ("fork", "no"), ("bottle", "no")),
    ),
    Photo(
        "rocket.jpg",
        facts="The image is a photo of a white rocket on its launch pad at dusk, standing between tall"
        " lattice towers, with bright lights on the pad.",
        also_named=("spacecraft", "launch pad"),
        colours=("white", "blue", "black", "gray", "silver", "yellow", "orange", "gold"),
        colour=("white",),
        objects=("rocket", "missile", "space shuttle"),
        captions=(
            "a rocket on a launch pad at dusk",
            "a white rocket standing between tall lattice towers",
            "a rocket ready for launch with bright lights on the pad at twilight",
        ),
        questions=(
            ("What is in the middle of the picture?", _all("rocket")),
            ("What colour is the rocket?", _all("white")),
            ("How many towers stand around the rocket?", _all("4")),
        ),
        probes=(("rocket", "yes"), ("tower", "yes"), ("person", "no"), ("tree", "no")),
    ),
    Photo(
        "motorcycle_left.png",
        facts="The image is a photo of a red and black motorcycle parked in a cluttered garage, in front"
        " of shelves with boxes.",
        also_named=("bike",),
        # boxes in brown, orange and yellow, a green-grey bench, a blue tarp, a white wall
        colours=(
            "red",
            "black",
            "silver",
            "gray",
            "white",
            "brown",
            "orange",
            "beige",
            "yellow",
            "green",
            "blue",
        ),
        colour=("red",),
        objects=("motorcycle", "motorbike", "moped", "scooter"),
        captions=(
            "a red motorcycle parked in a garage",
            "a red motorbike on its stand in front of shelves with boxes",
            "a red and black motorcycle in a cluttered garage",
        ),
        questions=(
            ("What vehicle is this?", _ten(("motorcycle", 7), ("motorbike", 3))),
            ("What colour is the motorcycle?", _all("red")),
            ("Where is the motorcycle parked?", _all("garage")),
            ("How many wheels does it have?", _all("2")),
        ),
        probes=(("motorcycle", "yes"), ("box", "yes"), ("car", "no"), ("person", "no")),
    ),
    Photo(
        "coins.png",
        facts="The image is a black and white photo of old coins arranged in four rows on a dark background.",
        also_named=("money",),
        colours=("black", "white", "gray", "silver"),
        # the coins carry heads and figures: a person or an animal on them is not invented
        people=True,
        animals=True,
        colour=("gray", "grey", "silver", "black and white"),  # grey-scale photo of silver coins
        objects=("coin",),
        captions=(
            "old coins arranged in rows on a dark background",
            "a black and white photo of ancient coins in four rows",
            "a collection of antique coins with heads and figures on them",
        ),
        questions=(
            ("What objects are shown?", _all("coins")),
            ("Is this photo in colour?", _all("no")),
            ("How many rows of coins are there?", _all("4")),
        ),
        probes=(("coin", "yes"), ("person", "no"), ("cup", "no")),
    ),
    Photo(
        "camera.png",
        facts="The image is a black and white photo of a man in a dark coat looking through a camera on"
        " a tripod, on a lawn.",
        also_named=("man", "cameraman", "photographer"),
        colours=("black", "white", "gray", "silver"),
        people=True,
        colour=("gray", "grey", "silver", "black and white"),  # grey-scale; a silver camera and tripod
        objects=("camera", "tripod"),
        captions=(
            "a man looking through a camera on a tripod",
            "a black and white photo of a cameraman on a field",
            "a man in a dark coat filming with a camera on a tripod on a lawn",
        ),
        questions=(
            ("What is the man looking through?", _all("camera")),
            ("What is the camera standing on?", _all("tripod")),
            ("Is this photo in colour?", _all("no")),
            ("What is the man wearing?", _ten(("coat", 8), ("jacket", 2))),
        ),
        probes=(("person", "yes"), ("tripod", "yes"), ("dog", "no"), ("horse", "no")),
    ),
)
