"""Datasets (TFDS builders), grain pipelines, patch sampling and augmentation."""
