"""Shared test setup: float32 numerics on CPU and the test helpers' directory on sys.path."""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(__file__))
