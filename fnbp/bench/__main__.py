"""``python -m fnbp.bench [options]``: the same as ``fnbp bench [options]``."""
import sys

from .run import main

sys.exit(main(prog="python -m fnbp.bench"))
