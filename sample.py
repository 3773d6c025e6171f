"""Sample from minflux: text-to-image, Fill, Kontext and vis2ir.

Not implemented yet (the sampling issue). When it lands, `python sample.py` with no arguments samples
from the latest run of `python train.py`; given official weights it runs FLUX.1 on a GPU.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("sample.py: sampling is not implemented yet; see the README for what exists today.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
