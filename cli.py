"""Command-line plumbing shared by every entry point (train.py, eval.py, pretrain.py, toy.py,
rollout.py, critic.py): bad input gets one line on stderr and exit code 2, before any work."""
import argparse
import os
import tempfile


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage block, then the error)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


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
