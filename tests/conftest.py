"""Shared fixtures: the reference data of the released model.

``tests/data/reference`` holds a copy of the project's reference files (a randomised mini
model's weights, inputs and outputs from the released code, and the key lists of the released
checkpoints), so that the tests run from any clone; ``SEGMAN_REFERENCE_DIR`` points elsewhere.
"""
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from mmengine.logging import MMLogger

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get('SEGMAN_REFERENCE_DIR', REPO / 'tests' / 'data' / 'reference'))


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        pytest.fail(f'reference file {path} is missing: set SEGMAN_REFERENCE_DIR to the '
                    'folder holding segman_mini_official.pt and segman_official_keys_*.txt')
    return path


@pytest.fixture(scope='session')
def mini_reference():
    return torch.load(reference_file('segman_mini_official.pt'), map_location='cpu',
                      weights_only=True)


def official_keys(size: str):
    """``{key: shape}`` of the released checkpoint of one size."""
    keys = {}
    for line in reference_file(f'segman_official_keys_{size}.txt').read_text().splitlines():
        if line.strip():
            name, shape = line.split(' ', 1)
            keys[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    return keys


@contextmanager
def captured_log() -> Iterator[List[logging.LogRecord]]:
    """The records of mmengine's current logger inside the block."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
