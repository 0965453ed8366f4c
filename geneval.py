"""GenEval's rules, in one place (METHOD.md section 6, the compositional reward; GenEval,
arXiv 2310.11513, as its repository implements it): the prompt generator over the COCO classes
and its templates, metadata and its validation, relative position with its threshold, and the
verdict on one image's objects for each of the six task types. The `geneval` reward
(rewards.geneval_score: detector boxes, CLIP colours) and the built-in world's checker (toy.judge:
objects read from pixels) both judge through verdict(); they differ only in how they find objects.

| GenEval (evaluate_images.py, create_prompts.py) | here |
|---|---|
| task types single_object ... color_attr | TAGS; prompts(), _sample() |
| metadata: tag, include, exclude, prompt | dicts as GenEval writes them; read_metadata(), metadata_problem() |
| include clause {class, count, color, position: [relation, target]} | metadata["include"][k] |
| exclude clause {class, count}: fails at `count` or more | metadata["exclude"]; closed() writes them for a closed world |
| relative_position(obj, target), threshold 0.1 | relative_position(box_a, box_b, POSITION_THRESHOLD) |
| the strict verdict | verdict(...)[0] |
| (not GenEval's) partial credit, after Flow-GRPO | verdict(...)[1] |

Test: tests/test_geneval.py
"""
import functools
import json
import math
import os

from cli import InputError


class MetadataError(InputError):
    """A bad metadata file or task type: printed as one line, exit code 2."""


COCO_CLASSES = (   # GenEval's object_names.txt: COCO's 80 things, three renamed
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
POSITION_THRESHOLD = 0.1
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
# GenEval's official 553 prompts (data/geneval: its evaluation_metadata.jsonl, MIT licence): the benchmark
OFFICIAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "geneval", "evaluation_metadata.jsonl")


def article(name):
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _plural(name):   # GenEval's rule, kept as is ("skises", "sheeps") so prompts match its suite
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _sample(tag, rng):
    """One prompt of GenEval's template for `tag` (prompts/create_prompts.py), as metadata."""
    pick = lambda k: [COCO_CLASSES[i] for i in rng.choice(len(COCO_CLASSES), size=k, replace=False)]
    no_person = lambda k: [COCO_CLASSES[i + 1] for i in rng.choice(len(COCO_CLASSES) - 1, size=k, replace=False)]
    if tag == "single_object":
        (a,) = pick(1)
        return dict(tag=tag, include=[{"class": a, "count": 1}], prompt=f"a photo of {article(a)}")
    if tag == "two_object":
        a, b = pick(2)
        return dict(tag=tag, include=[{"class": a, "count": 1}, {"class": b, "count": 1}],
                    prompt=f"a photo of {article(a)} and {article(b)}")
    if tag == "counting":   # the exclude clause is what makes the count exact
        (a,), n = pick(1), int(rng.integers(2, 4, endpoint=True))
        return dict(tag=tag, include=[{"class": a, "count": n}], exclude=[{"class": a, "count": n + 1}],
                    prompt=f"a photo of {NUMBER_WORDS[n]} {_plural(a)}")
    if tag == "colors":     # GenEval never colours a person
        (a,), c = no_person(1), COLORS[rng.integers(len(COLORS))]
        return dict(tag=tag, include=[{"class": a, "count": 1, "color": c}], prompt=f"a photo of {article(c)} {a}")
    if tag == "position":   # "A left of B": B is clause 0, A carries ["left of", 0]
        (a, b), r = pick(2), POSITIONS[rng.integers(len(POSITIONS))]
        return dict(tag=tag, include=[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [r, 0]}],
                    prompt=f"a photo of {article(a)} {r} {article(b)}")
    if tag == "color_attr":
        (a, b), (ca, cb) = no_person(2), [COLORS[i] for i in rng.choice(len(COLORS), size=2, replace=False)]
        return dict(tag=tag, include=[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    prompt=f"a photo of {article(ca)} {a} and {article(cb)} {b}")
    raise MetadataError(f"unknown GenEval tag {tag!r}; choose from {', '.join(TAGS)}")


@functools.lru_cache(maxsize=1)
def official():
    """GenEval's 553 official prompts with their metadata (data/geneval/evaluation_metadata.jsonl): what
    published GenEval figures are measured on (eval.py --prompts geneval)."""
    return tuple(read_metadata(OFFICIAL))


def prompts(n, seed=0, tags=TAGS, exclude=()):
    """n GenEval-style prompts with metadata from GenEval's own templates; each prompt's task type drawn
    uniformly from tags. Never one of GenEval's official prompts (official()): RL papers keep the
    benchmark out of training, so a policy is never evaluated on what it trained on; nor one in exclude.
    So no single_object prompt is ever drawn (all 80 possible ones are official), and counting keeps
    160 of its 240."""
    import numpy as np
    rng = np.random.default_rng(seed)
    skip = {m["prompt"] for m in official()} | set(exclude)
    out, misses = [], 0
    while len(out) < n:
        md = _sample(tags[rng.integers(len(tags))], rng)
        if md["prompt"] not in skip:
            out.append(md)
        elif (misses := misses + 1) > 100 * n + 10_000:     # e.g. tags=("single_object",): all official
            raise MetadataError(f"task types {', '.join(tags)}: no prompt outside GenEval's official ones to draw")
    return out


def read_metadata(path, coco=True):
    """A GenEval metadata file: one JSON object a line with tag, include, exclude (optional), prompt;
    each checked by metadata_problem (the shapes world uses the same format with coco=False)."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                md = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetadataError(f"{path}:{i}: not JSON ({e.msg})") from None
            problem = metadata_problem(md, coco)
            if problem:
                raise MetadataError(f"{path}:{i}: {problem}")
            out.append(md)
    return out


def metadata_problem(md, coco=True):
    """What is wrong with one prompt's metadata, or None. coco: GenEval's own suite (its task types,
    its 80 classes and 10 colours); without it, any classes (the shapes world's)."""
    if not isinstance(md, dict) or not isinstance(md.get("include"), list) or not md["include"]:
        return "no GenEval-style metadata (a non-empty 'include' list)"
    if coco and md.get("tag") not in TAGS:
        return f"tag {md.get('tag')!r} is not one of {', '.join(TAGS)}"
    for k, clause in enumerate(md["include"] + list(md.get("exclude", []))):
        if not isinstance(clause, dict) or "class" not in clause or not isinstance(clause.get("count"), int) \
                or clause["count"] < 1:
            return f"clause {clause!r} needs a 'class' and a positive integer 'count'"
        if coco and clause["class"] not in COCO_CLASSES:
            return f"class {clause['class']!r} is not one of GenEval's 80 COCO classes"
        if coco and clause.get("color", COLORS[0]) not in COLORS:
            return f"colour {clause['color']!r} is not one of {', '.join(COLORS)}"
        if "position" in clause:
            rel, target = (list(clause["position"]) + [None, None])[:2]
            if rel not in POSITIONS or not isinstance(target, int) or not 0 <= target < min(k, len(md["include"])):
                return f"position {clause['position']!r} needs a relation and the index of an earlier include clause"
    return None


def relative_position(box_a, box_b, threshold=POSITION_THRESHOLD):
    """GenEval's relations of box A to box B (x0, y0, x1, y1; y down): the centre offset, shrunk
    on each axis by threshold * (both boxes' sizes), must point mostly along a direction."""
    offset = [(box_a[i] + box_a[i + 2]) / 2 - (box_b[i] + box_b[i + 2]) / 2 for i in (0, 1)]
    sizes = [abs(box_a[i + 2] - box_a[i]) + abs(box_b[i + 2] - box_b[i]) for i in (0, 1)]
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    dx, dy = (r / math.hypot(*offset) for r in revised)
    return {rel for rel, holds in (("left of", dx < -0.5), ("right of", dx > 0.5),
                                   ("above", dy < -0.5), ("below", dy > 0.5)) if holds}


def verdict(detections, metadata, threshold=0.3, counting_threshold=0.9, max_objects=16,
                    position_threshold=POSITION_THRESHOLD):
    """GenEval's verdict on one image from its detections -> (strict pass, partial credit in [0, 1]).

    detections: [{"class", "box": [x0, y0, x1, y1], "score", "color"}] ("color" is needed only for
    classes with a colour clause). Thresholds default to GenEval's (for its Mask2Former).
    Strict is GenEval's rule: include clauses are ANDed; for each, the `count` most confident
    boxes of the class must exist, all in the asked colour, each in the asked relation to every
    box of the target clause (which must itself have passed); an exclude clause fails when
    `count` or more boxes are found, which is what makes counting exact.
    Partial credit (not GenEval's; in the spirit of Flow-GRPO's) averages one credit per check:
    found / count, right colour / count, share of (box, target box) pairs in the relation, and
    for an exclude clause 1 - excess / allowed. It equals 1 exactly when strict passes."""
    cut = counting_threshold if metadata.get("tag") == "counting" else threshold
    objects = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        if d["score"] > cut and len(objects.setdefault(d["class"], [])) < max_objects:
            objects[d["class"]].append(d)
    strict, credits, passed, found_by_clause = True, [], [], []
    for req in metadata["include"]:
        n = req["count"]
        found = objects.get(req["class"], [])[:n]
        ok = len(found) == n
        credits.append(len(found) / n)
        if "color" in req:
            right = sum(d.get("color") == req["color"] for d in found)
            credits.append(right / n)
            ok = ok and right == n
        if "position" in req:
            relation, target = req["position"]
            pairs = [relation in relative_position(d["box"], t["box"], position_threshold)
                     for d in found for t in found_by_clause[target]]
            credits.append(sum(pairs) / len(pairs) if pairs else 0.0)
            ok = ok and passed[target] and all(pairs)
        strict = strict and ok
        passed.append(ok)
        found_by_clause.append(found)
    for req in metadata.get("exclude", []):
        m, allowed = len(objects.get(req["class"], [])), req["count"] - 1
        strict = strict and m <= allowed
        credits.append(max(0.0, 1.0 - max(m - allowed, 0) / max(allowed, 1)))
    return bool(strict), float(sum(credits) / len(credits))


def closed(metadata, classes):
    """The metadata of a closed world, where every class is known and every object is seen: each
    asked class must appear exactly as often as asked and nothing else may appear. Written in
    GenEval's own language, as exclude clauses (what its counting prompts do for their one class),
    so the shapes world's strict verdict is GenEval's rule itself (toy.judge)."""
    asked = {}
    for clause in metadata["include"]:
        asked[clause["class"]] = asked.get(clause["class"], 0) + clause["count"]
    exclude = [{"class": c, "count": asked.get(c, 0) + 1} for c in classes]
    return {**metadata, "exclude": list(metadata.get("exclude", [])) + exclude}
