"""Decode the CIFAR-10 JPEG subset (cifar10/cifar10-jpeg.tar.gz) into the prepared cache once.

Usage: python data_prep/cifar10.py [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import logging

from cnnapps.data.root import find_data_root
from cnnapps.data.cifar10 import prepare_cifar10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(prepare_cifar10(find_data_root(args.data_dir)))


if __name__ == "__main__":
    main()
