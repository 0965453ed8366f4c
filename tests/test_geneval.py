"""geneval.py: GenEval's verdict rules on hand-made detections for each task type, relative
position, the prompt generator and metadata files; and the built-in world's checker judging
through the same rule (toy.judge).
Run: python -m pytest -q tests/test_geneval.py
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

import geneval  # noqa: E402
import rewards  # noqa: E402
import toy  # noqa: E402


def det(cls, box, score=0.95, color=None):
    return {"class": cls, "box": box, "score": score, "color": color}


LEFT, RIGHT, TOP, BOTTOM = [0, 40, 20, 60], [60, 40, 80, 60], [40, 0, 60, 20], [40, 80, 60, 100]


def test_relative_position():
    rp = geneval.relative_position
    assert rp(LEFT, RIGHT) == {"left of"} and rp(RIGHT, LEFT) == {"right of"}
    assert rp(TOP, BOTTOM) == {"above"} and rp(BOTTOM, TOP) == {"below"}
    assert rp([0, 0, 20, 20], [80, 80, 100, 100]) == {"left of", "above"}
    assert rp([0, 0, 50, 50], [5, 0, 55, 50]) == set()     # offset under the 0.1 * sizes threshold


CASES = [   # (metadata, detections, strict, partial)
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, [det("dog", LEFT)], True, 1.0),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, [det("cat", LEFT)], False, 0.0),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, [det("dog", LEFT, 0.2)], False, 0.0),
    ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]},   # extra dogs are fine here
     [det("dog", LEFT), det("dog", RIGHT)], True, 1.0),
    ({"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
     [det("dog", LEFT), det("cat", RIGHT)], True, 1.0),
    ({"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
     [det("dog", LEFT)], False, 0.5),
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
     [det("cat", LEFT), det("cat", RIGHT)], True, 1.0),
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
     [det("cat", LEFT), det("cat", RIGHT), det("cat", TOP)], False, 0.75),    # one too many: 1 - 1/2
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
     [det("cat", LEFT)], False, 0.75),                                        # one too few: 1/2 found
    ({"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]},
     [det("cat", LEFT), det("cat", RIGHT), det("cat", TOP, 0.5)], True, 1.0),  # 0.5 is under the counting threshold
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     [det("car", LEFT, color="red")], True, 1.0),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     [det("car", LEFT, color="blue")], False, 0.5),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},   # only the most confident counts
     [det("car", LEFT, 0.6, color="blue"), det("car", RIGHT, 0.9, color="red")], True, 1.0),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]},
     [det("car", LEFT, 0.9, color="blue"), det("car", RIGHT, 0.6, color="red")], False, 0.5),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]},
     [det("dog", RIGHT), det("cat", LEFT)], True, 1.0),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]},
     [det("dog", LEFT), det("cat", RIGHT)], False, 2 / 3),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", 0]}]},
     [det("dog", BOTTOM), det("cat", TOP)], True, 1.0),
    ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]},
     [det("cat", LEFT)], False, 1 / 3),                                       # no target: relation gets nothing
    ({"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "vase", "count": 1, "color": "blue"}]},
     [det("cup", LEFT, color="red"), det("vase", RIGHT, color="blue")], True, 1.0),
    ({"tag": "color_attr", "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "vase", "count": 1, "color": "blue"}]},
     [det("cup", LEFT, color="blue"), det("vase", RIGHT, color="red")], False, 0.5),   # colours swapped
]


@pytest.mark.parametrize("metadata, detections, strict, partial", CASES)
def test_geneval_verdict(metadata, detections, strict, partial):
    got = geneval.verdict(detections, metadata)
    assert got[0] is strict and got[1] == pytest.approx(partial)


def test_geneval_partial_is_one_exactly_when_strict():
    rng = random.Random(0)
    md_rng = geneval.prompts(300, seed=1)
    for md in md_rng:
        classes = [c["class"] for c in md["include"]]
        detections = [det(rng.choice(classes), [x := rng.uniform(0, 80), y := rng.uniform(0, 80),
                                                 x + rng.uniform(5, 20), y + rng.uniform(5, 20)],
                          rng.uniform(0.2, 1.0), rng.choice(geneval.COLORS[:3]))
                      for _ in range(rng.randint(0, 5))]
        strict, partial = geneval.verdict(detections, md)
        assert 0.0 <= partial <= 1.0 and (partial == 1.0) == strict


def test_geneval_prompts_and_metadata_file(tmp_path):
    md = geneval.prompts(200, seed=7)
    assert md == geneval.prompts(200, seed=7) and md != geneval.prompts(200, seed=8)
    # every one of the 80 single-object prompts ("a photo of a bench") is an official one: none is drawn
    assert {m["tag"] for m in md} == set(geneval.TAGS) - {"single_object"}
    rewards.check_metadata(["geneval"], md, [m["prompt"] for m in md])
    by_tag = {m["tag"]: m for m in md}
    assert by_tag["counting"]["exclude"][0]["count"] == by_tag["counting"]["include"][0]["count"] + 1
    pos = by_tag["position"]
    a, b = pos["include"][1]["class"], pos["include"][0]["class"]
    assert pos["prompt"].startswith(f"a photo of {geneval.article(a)} {pos['include'][1]['position'][0]}")
    assert pos["prompt"].endswith(geneval.article(b))
    assert all(c.get("class") != "person" for m in md if m["tag"] in ("colors", "color_attr") for c in m["include"])
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in md) + "\n")
    assert geneval.read_metadata(path) == md
    path.write_text(json.dumps(md[0]) + "\n{not json\n")
    with pytest.raises(geneval.MetadataError, match=":2: not JSON"):
        geneval.read_metadata(path)
    path.write_text(json.dumps({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "x"}))
    with pytest.raises(geneval.MetadataError, match="unicorn"):
        geneval.read_metadata(path)


def test_the_shapes_checker_judges_through_genevals_rule(monkeypatch):
    """One strict rule, not two: toy.judge's verdict is geneval.verdict's on the closed world, so a
    change to the rule (here: everything passes) changes the shapes checker's verdict with it."""
    meta = toy.prompt_metadata("a circle left of a square")
    wrong = [{"class": "circle", "color": "red", "box": toy.cell_box(3), "cell": 3},
             {"class": "square", "color": "red", "box": toy.cell_box(0), "cell": 0}]
    assert not toy.judge(wrong, meta)[0]
    seen = []
    monkeypatch.setattr(geneval, "verdict", lambda d, m, *a, **k: seen.append(m) or (True, 1.0))
    assert toy.judge(wrong, meta)[0] and seen
    assert {c["class"] for c in seen[0]["exclude"]} == set(toy.SHAPES)        # closed: every shape exactly counted


def test_closed_world_counts_exactly():
    md = geneval.closed({"include": [{"class": "circle", "count": 2}]}, ("circle", "square"))
    two, three = ([geneval.verdict([{"class": "circle", "box": toy.cell_box(c), "score": 1.0} for c in range(n)], md,
                                   threshold=0.0, counting_threshold=0.0)[0] for n in (2, 3)])
    extra = geneval.verdict([{"class": c, "box": toy.cell_box(i), "score": 1.0}
                             for i, c in enumerate(("circle", "circle", "square"))], md, threshold=0.0,
                            counting_threshold=0.0)[0]
    assert two and not three and not extra


def test_the_official_prompts_ship_and_training_never_sees_them():
    """data/geneval holds GenEval's 553 official prompts (with its licence); eval.py --prompts geneval
    evaluates exactly them; train.py --prompts geneval draws from GenEval's templates but never one of
    them, and its held-out prompts are not among its training prompts."""
    import os

    import eval as evaluation
    import train
    official = geneval.official()
    assert len(official) == 553 and {m["tag"] for m in official} == set(geneval.TAGS)
    assert os.path.isfile(os.path.join(os.path.dirname(geneval.OFFICIAL), "LICENSE"))
    assert [m["prompt"] for m in evaluation.load_prompts("geneval", None)] == [m["prompt"] for m in official]
    names = {m["prompt"] for m in official}
    for seed in (0, 1):
        train_metas, heldout = train.load_prompts("geneval", seed)
        seen = {m["prompt"] for m in train_metas}
        assert len(train_metas) == 2000 and len(heldout) == 200
        assert not seen & names and not {m["prompt"] for m in heldout} & (names | seen)
    # the generator does make official prompts (its templates are GenEval's): they are skipped, not absent
    import numpy as np
    rng = np.random.default_rng(0)
    assert any(geneval._sample(geneval.TAGS[rng.integers(6)], rng)["prompt"] in names for _ in range(500))


def test_the_geneval_reward_takes_the_official_thresholds_by_default():
    import argparse

    import rewards
    p = argparse.ArgumentParser()
    rewards.add_reward_args(p)
    spec = rewards.parse_reward_args(p.parse_args(["--rewards", "geneval"]))
    assert spec.build_kwargs("geneval") == {"threshold": 0.3, "counting_threshold": 0.9}
    spec = rewards.parse_reward_args(p.parse_args(["--rewards", "geneval", "--geneval-threshold", "0.2",
                                                   "--geneval-counting-threshold", "0.5"]))
    assert spec.build_kwargs("geneval") == {"threshold": 0.2, "counting_threshold": 0.5}
    import inspect
    defaults = inspect.signature(rewards.geneval_score).parameters
    assert (defaults["threshold"].default, defaults["counting_threshold"].default) == (0.3, 0.9)
