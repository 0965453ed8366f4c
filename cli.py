"""Command-line plumbing shared by every entry point (train.py, eval.py, pretrain.py, toy.py,
rollout.py, critic.py): bad input gets one line on stderr and exit code 2, before any run directory
is created or any model is loaded. One helper per kind of check:
  integer(min, max), finite_float(min, max, above), device, output_file(exts), nonempty, SEED
                              argparse type= checks
  unwritable(path)            a directory a run or file can be written to
  read_text(flag, path)       a readable UTF-8 text file (prompt lists)
  read_json(path)             a JSON file that parses
  safetensors_keys(path)      a safetensors file whose header is whole (no tensor is read)
  check_component(dir, cls)   a saved model of class cls that looks loadable (no tensor is read)
  check_pipeline(path)        a diffusers pipeline directory whose components all do
  add_threads(parser), set_threads(threads, device)   --threads: torch's CPU threads
This module imports only the standard library at the top (torch and safetensors inside the checks
that need them), so every entry point answers bad flags in the time it takes to import torch."""
import argparse
import json
import math
import os
import tempfile


class InputError(ValueError):
    """Bad flags, paths or files: the entry points print its one line and exit 2 (models.BackboneError,
    rewards.RewardError and train.ConfigError are kinds of it)."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage block, then the error)."""

    def error(self, message):
        # argparse words a failed type= check "argument --lr: must be ..."; it reads "--lr must be ..."
        head, _, rest = message.partition(": ")
        if head.startswith("argument ") and rest.startswith("must "):
            message = f"{head[len('argument '):]} {rest}"
        self.exit(2, f"error: {message}\n")

    def check_values(self, values, where):
        """Run each flag's type check on values that did not come from the command line (a resumed
        run's config.json, which a hand edit may have broken); InputError naming `where`."""
        for a in self._actions:
            value = values.get(a.dest)
            if a.type is not None and a.option_strings and value is not None:
                try:
                    a.type(str(value))
                except (argparse.ArgumentTypeError, ValueError) as e:
                    raise InputError(f"{where}: {a.option_strings[0]} {e}") from None


# ----------------------------------------------------------------------------- type= checks

def integer(min=1, max=None):
    """type=: an integer >= min (and <= max)."""
    def check(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {min}, got {text!r}") from None
        if value < min or (max is not None and value > max):
            raise argparse.ArgumentTypeError(f"must be >= {min}" + (f" and <= {max}" if max is not None else "")
                                             + f", got {value}")
        return value
    return check


SEED = integer(0, 2 ** 31 - 1)      # --seed everywhere: numpy takes seeds in [0, 2^32); rank r adds world * seed + r


def nonempty(text):
    """type=: a path or name that is not the empty string (--run-dir '' is not 'no --run-dir')."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


def finite_float(min=None, max=None, above=None):
    """type=: a finite number, optionally >= min, > above and <= max (nan and inf never pass)."""
    want = "finite" + "".join(f" and {op} {bound:g}" for op, bound in ((">=", min), (">", above), ("<=", max))
                              if bound is not None)

    def check(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, {want}, got {text!r}") from None
        if not (math.isfinite(value) and (min is None or value >= min) and (above is None or value > above)
                and (max is None or value <= max)):
            raise argparse.ArgumentTypeError(f"must be {want}, got {value:g}")
        return value
    return check


def device(text):
    """type=: a torch device this machine has: cpu, cuda, cuda:N (N < the GPUs visible) or mps."""
    import torch
    accepted = "accepted: cpu, cuda, cuda:N, mps"
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a torch device ({accepted}), got {text!r}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text!r}: no CUDA GPU is visible "
                                         "(use --device cpu)")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text!r}: "
                                         f"{torch.cuda.device_count()} GPU(s) visible")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"must be a device this machine has, got {text!r}: MPS is not available")
    if d.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"must be one of the devices this code runs on ({accepted}), got {text!r}")
    return text


def output_file(*exts):
    """type=: a file path ending in one of exts, in an existing directory this process can write to."""
    def check(text):
        if not text.lower().endswith(exts):
            raise argparse.ArgumentTypeError(f"must be a file ending in {', '.join(exts)}, got {text!r}")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"must be a file, got {text!r}: a directory of that name exists")
        folder = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(folder) or unwritable(folder):
            raise argparse.ArgumentTypeError(f"must be in a writable directory, got {text!r}: {folder} is not "
                                             "a writable directory")
        return text
    return check


# ----------------------------------------------------------------------------- paths and files

def unwritable(path):
    """None if a file can be written at path (a file, or a directory still to be created), else the
    directory in the way: the nearest existing ancestor, probed by creating and removing a temporary
    file in it (os.access says yes for /proc to root)."""
    d = os.path.abspath(path)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        return d
    try:
        fd, probe = tempfile.mkstemp(dir=d, suffix=".probe")
        os.close(fd), os.remove(probe)
    except OSError:
        return d
    return None


def read_text(flag, path):
    """The text of a UTF-8 text file, or InputError naming the flag (a binary file is not a prompt list)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{flag} {path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start})") \
            from None
    if "\0" in text:
        raise InputError(f"{flag} {path}: not a text file (it holds NUL bytes)")
    return text


def read_json(path):
    """A JSON file's content, or InputError naming the file and where its JSON breaks."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a readable JSON file ({str(e).splitlines()[0]})") from None


def safetensors_keys(path):
    """The tensor names of a safetensors file, from its header alone; safe_open also checks that the
    file covers every tensor the header lists, so a truncated copy fails here."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys())
    except Exception as e:                          # SafetensorError, OSError
        raise InputError(f"{path}: not a loadable safetensors file ({str(e).splitlines()[0]})") from None


# tensor-name prefixes, one of which every checkpoint of the class holds: they tell a UNet's weights from a
# transformer's or a VAE's (transformers' CLIP text models save with or without the "text_model." prefix)
CLIP_TEXT = ("text_model.embeddings.", "embeddings.token_embedding.")
SIGNATURES = {"SD3Transformer2DModel": ("transformer_blocks.",), "UNet2DConditionModel": ("down_blocks.",),
              "AutoencoderKL": ("decoder.",), "CLIPTextModel": CLIP_TEXT, "CLIPTextModelWithProjection": CLIP_TEXT,
              "T5EncoderModel": ("encoder.block.", "shared.")}


def check_component(folder, cls):
    """A pipeline component's folder (or a model saved alone) as from_pretrained will read it: its
    JSON files parse, its safetensors headers are whole, and a model's weights are a `cls`'s (its
    config's class, and the SIGNATURES prefix in its tensor names). No tensor is read."""
    if not os.path.isdir(folder):
        raise InputError(f"{folder}: missing (expected a {cls} there)")
    files, keys = sorted(os.listdir(folder)), []
    for f in files:
        if f.endswith(".json"):
            config = read_json(os.path.join(folder, f))
            found = None
            if f == "config.json" and isinstance(config, dict):          # diffusers' class, or transformers'
                found = config.get("_class_name") or (config.get("architectures") or [None])[0]
            if found and cls in SIGNATURES and found != cls:
                raise InputError(f"{folder}/config.json describes a {found}, not the {cls} expected there")
        elif f.endswith(".safetensors"):
            keys += safetensors_keys(os.path.join(folder, f))
    if cls in SIGNATURES:
        if not keys and not any(f.endswith(".bin") for f in files):
            raise InputError(f"{folder}: no weights (*.safetensors or *.bin) for its {cls}")
        if keys and not any(k.startswith(SIGNATURES[cls]) for k in keys):
            raise InputError(f"{folder}: its weights are not a {cls}'s (no {' or '.join(SIGNATURES[cls])}* tensors; "
                             "another model's file?)")


def check_pipeline(path):
    """The pipeline class named by a diffusers directory's model_index.json, once every component it
    names passes check_component. No model is loaded: a damaged or mixed-up copy fails here in one
    line, not halfway through from_pretrained."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise InputError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    spec = read_json(index)
    if not isinstance(spec, dict):
        raise InputError(f"{index}: not a diffusers model index (a JSON object)")
    for name, entry in spec.items():
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] is not None:
            check_component(os.path.join(path, name), entry[1])
    return spec.get("_class_name")


# ----------------------------------------------------------------------------- CPU threads

THREADS_HELP = ("CPU threads torch computes with (default: 1 on a CPU device, unless OMP_NUM_THREADS is set: the "
                "built-in world's tiny models run no slower on one thread alone, and torch's spinning threads "
                "make a run beside any other busy process many times slower; BENCHMARKS.md 'Threads'; on a GPU "
                "device, torch's own default)")


def add_threads(parser):
    parser.add_argument("--threads", type=integer(1), default=None, help=THREADS_HELP)


def set_threads(threads, device):
    """torch.set_num_threads: --threads if given; else 1 on a CPU device, unless OMP_NUM_THREADS says
    otherwise. Returns the number in use."""
    import torch
    if threads is None and str(device).startswith("cpu") and "OMP_NUM_THREADS" not in os.environ:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()

