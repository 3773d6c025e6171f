"""Train minflux: flow-matching LoRA + SemanticCrossAttention on vis2ir triptychs.

Not implemented yet (the training issue). When it lands, `python train.py` with no arguments trains a
small configuration of the FLUX architecture from scratch on CPU, on procedurally generated
[visible | infrared | semantic] triptychs; given official weights it trains LoRA on FLUX.1-Fill-dev.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print("train.py: training is not implemented yet; see the README for what exists today.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
