"""Device meshes named the way the sharding rules speak: axes `data`, `fsdp`, `tensor`.

A mesh is written as a spec string, `data=2,tensor=4` (the command's `--mesh`), with any subset
of the three axes in any order; their sizes must multiply to the number of devices, or to fewer
with `devices=` naming which. The mesh's axes are of JAX's `Auto` type: the compiler's
partitioner decides where collectives go, from the shardings of the weights and inputs.

Example:
    >>> mesh = make_mesh('data=2,tensor=4')          # 8 devices
    >>> mesh.shape
    OrderedDict([('data', 2), ('tensor', 4)])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh

DATA = 'data'        # batch rows: each device a different slice of the batch, weights whole
FSDP = 'fsdp'        # batch rows too, and every large weight split along one axis
TENSOR = 'tensor'    # heads and the FFN width split: each device a part of every product
MESH_AXES = (DATA, FSDP, TENSOR)
SPEC_EXAMPLE = 'data=2,tensor=4'
CPU_DEVICE_COUNT_FLAG = 'xla_force_host_platform_device_count'


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """{axis: size} of a spec string like 'data=2,tensor=4'; ValueError naming what is wrong."""
    sizes: dict[str, int] = {}
    for part in spec.split(','):
        name, sep, size = part.strip().partition('=')
        name = name.strip()
        if not sep or not name:
            raise ValueError(f'mesh {spec!r}: expected axis=size pairs separated by commas, '
                             f'like {SPEC_EXAMPLE!r}; got {part.strip()!r}.')
        if name not in MESH_AXES:
            raise ValueError(f'mesh {spec!r}: unknown axis {name!r}; the axes are '
                             f'{", ".join(MESH_AXES)}.')
        if name in sizes:
            raise ValueError(f'mesh {spec!r}: axis {name!r} is named twice.')
        try:
            sizes[name] = int(size)
        except ValueError:
            raise ValueError(f'mesh {spec!r}: the size of {name!r} must be a whole number, '
                             f'got {size.strip()!r}.') from None
        if sizes[name] < 1:
            raise ValueError(f'mesh {spec!r}: the size of {name!r} must be at least 1, '
                             f'got {sizes[name]}.')
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of `devices` (default: all of them, of every process) shaped by `spec`.

    The axes keep the order of the spec. Raises ValueError when the sizes do not multiply to
    the number of devices.
    """
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES or not isinstance(size, int) or size < 1:
            raise ValueError(f'mesh {sizes}: axes are {", ".join(MESH_AXES)} with whole sizes '
                             f'of at least 1; got {name!r}={size!r}.')
    devices = list(jax.devices() if devices is None else devices)
    count = 1
    for size in sizes.values():
        count *= size
    if count != len(devices):
        shape = ' x '.join(f'{name}={size}' for name, size in sizes.items())
        simulate = (f' (on CPU, XLA_FLAGS=--{CPU_DEVICE_COUNT_FLAG}={count} set before the '
                    'program starts simulates them)' if devices[0].platform == 'cpu' else '')
        raise ValueError(f'mesh {shape} needs {count} devices, but {len(devices)} are '
                         f'available ({devices[0].platform}): choose sizes that multiply to '
                         f'{len(devices)}{simulate}.')
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), devices=devices,
                         axis_types=(AxisType.Auto,) * len(sizes))


def describe_mesh(mesh: Mesh) -> str:
    """'data=2,tensor=4' for a mesh: the spec string that builds it."""
    return ','.join(f'{name}={size}' for name, size in mesh.shape.items())
