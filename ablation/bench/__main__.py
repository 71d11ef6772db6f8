"""`python -m ablation.bench` and `make bench`: the commands are in ablation/bench/__init__.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
