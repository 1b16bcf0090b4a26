"""``python -m sparsekit.bench [args]`` -- same as ``sparsekit bench [args]``."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
