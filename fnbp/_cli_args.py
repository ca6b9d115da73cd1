"""Argument types of ``fnbp train``: each parses one flag's text or raises an error naming the flag."""
import argparse


def _int_arg(flag, lo, hi=None, hi_text=None):
    def parse(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got {text!r}") from None
        if n < lo or (hi is not None and n >= hi):
            span = f">= {lo}" if hi is None else f"in [{lo}, {hi_text or hi})"
            raise argparse.ArgumentTypeError(f"{flag} must be an integer {span}, got {text}")
        return n
    return parse


def _float_arg(flag, lo=None, hi=None, *, lo_open=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{flag} must be a finite number, got {text}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"{flag} must be {'>' if lo_open else '>='} {lo}, got {text}")
        if hi is not None and v >= hi:
            raise argparse.ArgumentTypeError(f"{flag} must be < {hi}, got {text}")
        return v
    return parse


def _layers(text):
    try:
        widths = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers like 64,32,10, got {text!r}")
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--layers needs the input width and at least one layer width, "
                                         f"all >= 1, got {text!r}")
    return widths


def _batch_size(text):
    if text == "full":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-size must be an integer >= 1 or 'full', got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--batch-size must be an integer >= 1 or 'full' (full batch is spelled "
                                         f"'full'), got {text}")
    return n
