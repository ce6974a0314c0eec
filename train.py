"""Train a segmentation model, clean or adversarially: ``python train.py --help``."""

from robustseg.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
