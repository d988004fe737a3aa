"""Shared test setup: float32 numerics on CPU, the decode kernels compiled inside the repository
(once, shared by every worker and command run: nothing is read from the user's cache), and the
test helpers' directory on sys.path."""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('GEMMA3N_KERNEL_CACHE', os.path.join(REPO_ROOT, '.cache', 'kernels'))
sys.path.insert(0, os.path.dirname(__file__))
