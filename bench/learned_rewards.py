"""What the built-in world's learned rewards (toy-clip, toy-pref: pretrain.py, checkpoints/) tell apart.

For every prompt of the world, 8 correct boards are drawn beside 8 deliberately wrong ones, and a reward
"prefers the right board" for that prompt when its mean score on the correct boards is higher. The wrong
boards, each wrong by the checker's strict rule:
  colour changed   one coloured object in another colour (colour, colour-attribution prompts)
  object missing   one object left out (two-object, counting prompts)
  sides swapped    the relation's sides swapped (position prompts)
  repainted warm   every green or blue object the prompt names painted red (prompts naming green or blue)
  repainted cool   the same objects in the other cool colour (green <-> blue): as wrong as the warm
                   repaint, without the warmth
The last two pair up: a reward that prefers the right board over the cool repaint but not over the warm one
has a taste for warm colours, which is what the simulated rater behind toy-pref has and what a policy trained
on it exploits (BENCHMARKS.md, reward hacking with the learned rewards). Also copied from each checkpoint's
config.json: zero-shot accuracy over the world's prompts and, for toy-pref, the rater's taste and agreement.

Run:  python bench/learned_rewards.py            (~1 min on one thread)
      python bench/learned_rewards.py --also "toy-pref taste 0.5=bench/runs/reward_hacking_learned_taste0.5/toy-pref"
Writes bench/results/learned_rewards.json and the section "learned-rewards" of BENCHMARKS.md.
"""
import argparse
import json
import os

from common import ROOT, machine, write_json, write_section

CHECKS = {  # name -> (the prompts it applies to, how the wrong board is made)
    "colour changed": (("colors", "color_attr"), "color"),
    "object missing": (("two_object", "counting"), "missing"),
    "sides swapped": (("position",), "swap"),
    "repainted warm": (None, {"green": "red", "blue": "red"}),
    "repainted cool": (None, {"green": "blue", "blue": "green"}),
}
SCENES = 8


def boards(toy, meta, seed, wrong=None):
    """(SCENES, 3, 32, 32): SCENES boards for `meta`, correct or made wrong by toy.render's `wrong`."""
    return toy.render_batch([meta] * SCENES, seed, wrong)


def repaint(meta, colours):
    """The same scene description with each named colour replaced by colours[colour] (None: not applicable)."""
    include = [{**e, "color": colours[e["color"]]} if e.get("color") in colours else e for e in meta["include"]]
    return include if include != meta["include"] else None


def prefers_right(fn, toy, metas):
    """{check: share of its prompts where fn's mean score is higher on the correct boards, and how many}
    for each check that applies to some of `metas`."""
    wins = {check: [] for check in CHECKS}
    for i, meta in enumerate(metas):
        prompts, right = [meta["prompt"]] * SCENES, None
        for check, (tags, wrong) in CHECKS.items():
            if isinstance(wrong, dict):                       # a repaint: a correct board of another description
                include = repaint(meta, wrong)
                if include is None:
                    continue
                bad = boards(toy, toy.make_metadata(include), i)
            elif meta["tag"] in tags:
                bad = boards(toy, meta, i, wrong)
            else:
                continue
            right = fn(boards(toy, meta, i), prompts).mean() if right is None else right    # scored once per prompt
            wins[check].append(float(right > fn(bad, prompts).mean()))
    # checks that apply to none of `metas` are left out
    return {check: {"share": sum(w) / len(w), "prompts": len(w)} for check, w in wins.items() if w}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--also", action="append", default=[], metavar="LABEL=DIR",
                   help="another toy-pref directory to measure beside the shipped ones (pretrain.py --model toy-pref --out DIR)")
    args = p.parse_args()
    models = [("toy-clip", "toy-clip", None), ("toy-pref", "toy-pref", None)]
    for item in args.also:
        label, sep, path = item.partition("=")
        if not sep or not os.path.isfile(os.path.join(path, "config.json")):
            p.exit(2, f"error: --also {item!r}: expected LABEL=DIR with DIR holding a toy-pref (config.json)\n")
        models.append((label, "toy-pref", path))
    import rewards
    import toy
    metas, rows = toy.all_prompts(), {}
    for label, name, path in models:
        config = json.load(open(os.path.join(path or os.path.join(ROOT, "checkpoints", name), "config.json")))
        fn = rewards.build_reward(name, path=path)
        rows[label] = {"reward": name, "path": path or f"checkpoints/{name}", "taste": config.get("taste"),
                       "agreement_with_rater": config.get("held_out_agreement_with_rater"),
                       "zero_shot": config["zero_shot"]["mean"], "prefers_right": prefers_right(fn, toy, metas)}
        print(label, json.dumps(rows[label]["prefers_right"]), flush=True)
    command = "python bench/learned_rewards.py" + "".join(f' --also "{a}"' for a in args.also)
    write_json("learned_rewards", {"command": command, "scenes_per_board": SCENES, "machine": machine(), "rows": rows})
    cell = lambda v, fmt=".3f": "" if v is None else format(v, fmt)
    lines = [f"Command: `{command}`. For each prompt of the world, {SCENES} correct boards against {SCENES} wrong ones "
             "(the script's docstring says how each is made); a cell is the share of the prompts where the reward's "
             "mean score is higher on the correct boards (how many prompts in brackets). Zero-shot accuracy, the "
             "rater's taste and agreement on held-out pairs: from the checkpoint's config.json (pretrain.py).", "",
             "| reward | taste | agreement with the rater | zero-shot | " + " | ".join(CHECKS) + " |",
             "|---|---|---|---|" + "---|" * len(CHECKS)]
    for label, r in rows.items():
        checks = " | ".join(f"{c['share']:.2f} ({c['prompts']})" for c in r["prefers_right"].values())
        lines.append(f"| {label} (`{r['path']}`) | {cell(r['taste'], 'g')} | {cell(r['agreement_with_rater'])} | "
                     f"{cell(r['zero_shot'])} | {checks} |")
    write_section("learned-rewards", "## What the world's learned rewards tell apart (bench/learned_rewards.py)\n\n"
                  + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
