"""Command-line plumbing shared by every entry point (train.py, eval.py, pretrain.py, toy.py,
rollout.py, critic.py): bad input gets one line on stderr and exit code 2, before any work."""
import argparse


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage block, then the error)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")
