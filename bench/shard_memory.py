"""Peak host memory of each process when loading a checkpoint sharded over a device mesh.

A checkpoint in our own format at E4B widths (reduced layers, random bfloat16) is loaded into
the serving layout, each weight straight into its shards (`gemma3n.layout.load_serving(mesh=)`),
by 1 process without a mesh, 1 process holding all devices of the mesh, and N processes
holding a part of them each (`jax.distributed`, gloo, loopback). Each process reports its peak
resident memory; with the weights split over the processes, each should hold ~1/N of them.
The per-layer table stays in the file (as the command serves it), so it is not counted.

    python -m bench.shard_memory                 # E4B widths, 5 layers (LLLLG), mesh fsdp=4
    python -m bench.shard_memory --layers 10 --mesh tensor=4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench import common, process_memory

FORMAT_METADATA = {'format': 'gemma3n-params', 'format_version': '1'}    # gemma3n.checkpoints.native
DEVICES = 4
SETUPS = ((1, 0), (1, DEVICES), (2, DEVICES // 2), (4, 1))    # (processes, devices each; 0: no mesh)
SCALE_SUFFIX = '/scale'
WEIGHT_STD = 0.02
TIMEOUT_S = 1800


def bench_model(layers: int):
    import jax.numpy as jnp
    from gemma3n.config import TransformerConfig
    from gemma3n.models import E4B_HIDDEN_DIM
    from gemma3n.transformer import Gemma3nTransformer
    config = TransformerConfig.gemma3n(num_layers=layers, num_shared_layers=layers // 2,
                                       num_sparse_layers=min(layers, common.REDUCED_SPARSE_LAYERS),
                                       hidden_dim=E4B_HIDDEN_DIM)
    return Gemma3nTransformer(config=config, text_only=True, dtype=jnp.bfloat16)


def ensure_checkpoint(layers: int) -> Path:
    """Random bfloat16 weights of `bench_model(layers)` in our own format, written once."""
    path = common.WEIGHTS_DIR / f'native-{layers}-layers.safetensors'
    if path.is_file():
        return path
    import jax
    import jax.numpy as jnp
    from gemma3n.checkpoints.hf_mapping import flatten_params
    model = bench_model(layers)
    shapes = flatten_params(jax.eval_shape(model.init, jax.random.key(0),
                                           jnp.ones((1, 1), jnp.int32))['params'])
    specs = [(name, tuple(leaf.shape), WEIGHT_STD, name.endswith(SCALE_SUFFIX))
             for name, leaf in shapes.items()]
    common.write_random_safetensors(path, specs, common.WEIGHT_SEED, metadata=FORMAT_METADATA)
    return path


def child(args: argparse.Namespace) -> None:
    """One process: join the group, load sharded, report peak memory."""
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={max(args.devices, 1)}'
    import jax
    from gemma3n import layout, sharding
    if args.processes > 1:
        sharding.initialize(sharding.ProcessGroup(args.coordinator, args.processes, args.process_id))
    mesh = sharding.make_mesh(args.mesh) if args.devices else None
    before = process_memory.current_rss_bytes()
    with common.Stopwatch() as watch:
        _, params = layout.load_serving(args.checkpoint, bench_model(args.layers), progress=False,
                                        skip_per_layer_table=True, mesh=mesh)
        jax.block_until_ready(params)
    local = sum(shard.data.nbytes for leaf in jax.tree_util.tree_leaves(params)
                for shard in leaf.addressable_shards)
    print(json.dumps({'peak_rss_gb': process_memory.peak_rss_bytes() / common.GB,
                      'rss_before_gb': before / common.GB, 'local_weights_gb': local / common.GB,
                      'load_s': watch.seconds}), flush=True)
    if args.processes > 1:
        jax.distributed.shutdown()


def run_setup(checkpoint: Path, args: argparse.Namespace, processes: int, devices: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        coordinator = f'127.0.0.1:{s.getsockname()[1]}'
    commands = [[sys.executable, '-m', 'bench.shard_memory', '--child', '--checkpoint', str(checkpoint),
                 '--layers', str(args.layers), '--mesh', args.mesh, '--devices', str(devices),
                 '--processes', str(processes), '--process-id', str(i), '--coordinator', coordinator]
                for i in range(processes)]
    running = [subprocess.Popen(c, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, text=True)
               for c in commands]
    reports = []
    for process in running:
        out, _ = process.communicate(timeout=TIMEOUT_S)
        if process.returncode:
            raise RuntimeError(f'a load process failed with exit status {process.returncode}')
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--layers', type=int, default=5)
    parser.add_argument('--mesh', default='fsdp=4', help='a mesh of 4 devices')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    for name in ('--checkpoint', '--coordinator'):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ('--devices', '--processes', '--process-id'):
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    machine = common.machine_info()
    checkpoint = ensure_checkpoint(args.layers)
    size_gb = checkpoint.stat().st_size / common.GB
    rows, results = [], []
    for processes, devices in SETUPS:
        reports = run_setup(checkpoint, args, processes, devices)
        results.append({'processes': processes, 'devices_each': devices, 'reports': reports})
        mesh = f'{args.mesh} ({processes} x {devices})' if devices else 'none (1 device)'
        rows.append([mesh, max(r['peak_rss_gb'] for r in reports),
                     max(r['peak_rss_gb'] - r['rss_before_gb'] for r in reports),
                     max(r['local_weights_gb'] for r in reports), max(r['load_s'] for r in reports)])
    table = common.format_table(['mesh (processes x devices)', 'peak RSS GB / process',
                                 'growth while loading GB', 'weights held GB / process',
                                 'load s'], rows)
    print(f'checkpoint {checkpoint.name}: {size_gb:.2f} GB ({args.layers} layers at E4B widths; '
          f'the per-layer table stays in the file)\n{table}\nload average {machine["load_average"]}')
    common.write_json({'machine': machine, 'layers': args.layers, 'mesh': args.mesh,
                       'checkpoint_gb': size_gb, 'results': results, 'table': table},
                      common.results_path('shard-memory'))


if __name__ == '__main__':
    main()
