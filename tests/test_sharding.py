"""Sharding over a device mesh: the rules, meshes, process groups, block reads, and a small model
on 8 simulated CPU devices (one subprocess, tests/sharding_worker.py: generation, the train step
of full fine-tuning and LoRA, gemma3n.load of a Hugging Face folder and of our file, each mesh
against one device) and on 2 processes x 2 devices against 1 process x 4 devices."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from cli_runner import assert_usage_error, cli_env, run_cli
from gemma3n import sharding
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.layers import axes
from gemma3n.models import Gemma3n_E4B
from gemma3n.schema import model_schema
from gemma3n.sharding import distributed
from gemma3n.sharding.rules import stored_spec

WORKER = Path(__file__).with_name('sharding_worker.py')
ROOT = WORKER.parent.parent
# The worker compiles 4 meshes' prefill, decode step and two train steps; the bounds leave
# room for a busy machine.
WORKER_TIMEOUT_S = 600
PROCESSES_TIMEOUT_S = 600
MESHES = ('data=8', 'data=2,tensor=4', 'fsdp=4,tensor=2', 'tensor=8')
# float32 sums split over devices add in another order; the bound holds for logits
# (magnitude ~4), losses and the updated state (see test_the_train_step_matches_one_device).
TOLERANCE = 1e-5
LAYERS = 3                     # the worker's config
LOGITS_SIZE = 8 * 516          # the worker's batch x vocabulary

E4B_EMBED = (axes.VOCAB, axes.EMBED), (262144, 2048)
E4B_Q = (axes.Q_HEADS, axes.EMBED, axes.HEAD_DIM), (8, 2048, 256)
E4B_KV = (axes.KV, axes.KV_HEADS, axes.EMBED, axes.HEAD_DIM), (2, 2, 2048, 256)
E4B_GATING = (axes.GATE, axes.MLP, axes.EMBED), (2, 16384, 2048)
E4B_TABLE = (axes.VOCAB, axes.LAYERS, axes.PER_LAYER), (262144, 35, 256)


# ---- rules, meshes and process groups (no devices needed) -----------------------------------

@pytest.mark.parametrize('mesh, weight, expected', [
    ({'fsdp': 4, 'tensor': 2}, E4B_EMBED, P(('tensor', 'fsdp'), None)),
    ({'tensor': 8}, E4B_EMBED, P('tensor', None)),
    ({'data': 8}, E4B_EMBED, P(None, None)),                 # data parallel: weights whole
    ({'fsdp': 4, 'tensor': 2}, E4B_Q, P('tensor', 'fsdp', None)),
    ({'tensor': 8}, E4B_Q, P('tensor', None, None)),
    ({'tensor': 2}, E4B_KV, P(None, 'tensor', None, None)),  # 2 K/V heads over 2: split
    ({'fsdp': 4, 'tensor': 2}, E4B_GATING, P(None, 'tensor', 'fsdp')),
    ({'data': 2, 'tensor': 4}, E4B_TABLE, P('tensor', None, None)),
    ({'tensor': 1, 'fsdp': 8}, E4B_EMBED, P('fsdp', None)),  # an axis of size 1 splits nothing
])
def test_rules_split_e4b_weights(mesh, weight, expected):
    names, shape = weight
    assert sharding.ShardingRules().spec(names, shape, mesh) == expected


def test_a_rule_that_does_not_divide_falls_back_with_one_note(caplog):
    rules = sharding.ShardingRules()
    with caplog.at_level(logging.WARNING, logger='gemma3n.sharding.rules'):
        for _ in range(3):
            assert rules.spec(*E4B_KV, {'tensor': 4}) == P(None, None, None, None)
        # 516 rows: tensor=4 divides them, tensor x fsdp = 8 does not: tensor alone.
        assert rules.spec((axes.VOCAB, axes.EMBED), (516, 2048), {'fsdp': 2, 'tensor': 4}) == \
            P('tensor', 'fsdp')
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ['sharding: kv_heads of size 2 does not divide over tensor=4: replicated.',
                     'sharding: vocab of size 516 does not divide over tensor=4 x fsdp=2: '
                     'split over tensor only.']


def test_small_weights_stay_whole_and_batches_split_however_small():
    rules = sharding.ShardingRules()
    assert rules.spec((axes.EMBED,), (2048,), {'fsdp': 8}) == P(None)
    assert rules.spec((axes.BATCH, None), (8, 1), {'data': 2, 'fsdp': 4}) == P(('data', 'fsdp'), None)
    with pytest.raises(ValueError, match='2 axis names'):
        rules.spec((axes.VOCAB, axes.EMBED), (4,), {'tensor': 2})


def test_a_stored_order_keeps_each_dimension_s_split():
    # Checkpoint [N, D, H] stored [N, H, D] (serving order): D keeps fsdp, wherever it moved.
    assert stored_spec(P('tensor', 'fsdp', None), (0, 2, 1)) == P('tensor', None, 'fsdp')
    assert stored_spec(P('tensor'), (1, 0)) == P(None, 'tensor')


@pytest.fixture(scope='module')
def e4b_schema():
    return model_schema(Gemma3n_E4B(text_only=True))


@pytest.mark.parametrize('mesh, whole', [({'tensor': 8}, 0.02), ({'fsdp': 4, 'tensor': 2}, 0.002),
                                         ({'fsdp': 8}, 0.002), ({'data': 2, 'tensor': 4}, 0.02)])
def test_e4b_devices_each_hold_about_their_share(e4b_schema, mesh, whole):
    # The E4B text model's weights (the per-layer table included) by the default rules: each
    # device holds 1/n of them (n: the mesh without `data`) plus what stays whole. Under
    # tensor parallelism that is the projections no head or FFN axis splits (AltUp's, LAuReL's,
    # the per-layer inputs', K/V beyond 2 ways): 1.7% of the weights; under FSDP the small
    # weights (norms, AltUp's router and coefficients): 0.17%.
    rules = sharding.ShardingRules()
    total = per_device = 0
    for info in e4b_schema.values():
        spec = rules.spec(info.axes, info.shape, mesh)
        ways = math.prod(mesh[a] for entry in spec if entry is not None
                         for a in ((entry,) if isinstance(entry, str) else entry))
        total += math.prod(info.shape)
        per_device += math.prod(info.shape) / ways
    share = 1 / math.prod(size for axis, size in mesh.items() if axis != 'data')
    assert share <= per_device / total < share + whole


@pytest.mark.parametrize('spec, expected', [
    ('data=2,tensor=4', {'data': 2, 'tensor': 4}),
    (' fsdp = 4 , tensor=2 ', {'fsdp': 4, 'tensor': 2}),
])
def test_mesh_specs_parse(spec, expected):
    assert sharding.parse_mesh_spec(spec) == expected


@pytest.mark.parametrize('spec, message', [
    ('data', "expected axis=size pairs"),
    ('model=2', "unknown axis 'model'; the axes are data, fsdp, tensor"),
    ('data=2,data=2', "axis 'data' is named twice"),
    ('tensor=two', "must be a whole number, got 'two'"),
    ('tensor=0', 'must be at least 1, got 0'),
])
def test_bad_mesh_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        sharding.parse_mesh_spec(spec)


def test_a_mesh_that_does_not_match_the_devices_is_refused():
    # This process has one CPU device.
    with pytest.raises(ValueError, match=r'mesh data=2 x tensor=4 needs 8 devices, but 1 are '
                                         r'available \(cpu\): .* XLA_FLAGS=--xla_force_host_'
                                         r'platform_device_count=8'):
        sharding.make_mesh('data=2,tensor=4')
    assert sharding.describe_mesh(sharding.make_mesh('tensor=1')) == 'tensor=1'


@pytest.mark.parametrize('args, fragments', [
    (['--mesh', 'data=2,tensor=4'], ['mesh data=2 x tensor=4 needs 8 devices, but 1 are available',
                                     'xla_force_host_platform_device_count=8']),
    (['--coordinator', 'nowhere', '--num-processes', '2', '--process-id', '0'],
     ["host:port, got 'nowhere'"]),
])
def test_the_command_refuses_meshes_and_process_groups_in_one_line(tmp_path_factory, args,
                                                                    fragments):
    env = dict(cli_env(tmp_path_factory), XLA_FLAGS='')
    assert_usage_error(run_cli(env, 'generate', *args, 'Hello'), *fragments)


def test_process_groups_come_from_arguments_or_the_environment(monkeypatch):
    for name in (distributed.COORDINATOR_ENV, distributed.NUM_PROCESSES_ENV,
                 distributed.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert sharding.process_group() is None
    assert sharding.process_group('host:1234', 2, 1) == sharding.ProcessGroup('host:1234', 2, 1)
    monkeypatch.setenv(distributed.COORDINATOR_ENV, '10.0.0.1:5000')
    monkeypatch.setenv(distributed.NUM_PROCESSES_ENV, '4')
    monkeypatch.setenv(distributed.PROCESS_ID_ENV, '3')
    assert sharding.process_group() == sharding.ProcessGroup('10.0.0.1:5000', 4, 3)
    with pytest.raises(ValueError, match=r'must lie in \[0, 4\), got 4'):
        sharding.process_group(process_id=4)
    monkeypatch.delenv(distributed.PROCESS_ID_ENV)
    with pytest.raises(ValueError, match='need all three'):
        sharding.process_group()
    with pytest.raises(ValueError, match="host:port, got 'nowhere'"):
        sharding.process_group('nowhere', 2, 0)


def test_blocks_are_read_from_the_file_alone(tmp_path):
    x = np.arange(4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    save_file({'x': x}, tmp_path / 'x.safetensors')
    files = SafetensorsFiles([tmp_path / 'x.safetensors'])
    for index in [(slice(1, 3),), (slice(None), slice(2, 4)), (slice(1, 2), slice(0, 6), slice(1, 3)),
                  (slice(0, 0),), (slice(1, 3), slice(2, 5), slice(4, 5))]:
        np.testing.assert_array_equal(files.read_block('x', index), x[index])


# ---- a small model on 8 simulated devices ---------------------------------------------------

def _worker(log: Path, *args: str) -> subprocess.Popen:
    """tests/sharding_worker.py ARGS, its output to the file `log` (a pipe left unread could
    stall one of two processes that wait for each other)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop('XLA_FLAGS', None)
    with open(log, 'w') as output:
        return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, cwd=ROOT,
                                stdout=output, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, log: Path, timeout: int = WORKER_TIMEOUT_S) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f'the sharding worker ran past {timeout} s:\n{log.read_text()[-3000:]}')
    assert process.returncode == 0, log.read_text()[-3000:]


def _run_meshes(folder: Path) -> None:
    """The worker's `meshes` run and 2 processes x 2 devices, all at once (the processes wait
    for each other, and the two cores of a small machine both compile), into `folder`."""
    coordinator = f'127.0.0.1:{_free_port()}'
    runs = [(_worker(folder / 'meshes.log', 'meshes', str(folder)), folder / 'meshes.log',
             WORKER_TIMEOUT_S)]
    for i in range(2):
        log = folder / f'process_{i}.log'
        runs.append((_worker(log, 'process', str(folder / f'process_{i}.npz'), coordinator, '2',
                             str(i)), log, PROCESSES_TIMEOUT_S))
    try:
        for process, log, timeout in runs:
            _finish(process, log, timeout)
    finally:
        for process, _, _ in runs:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope='module')
def meshes(tmp_path_factory):
    """The worker's report (tests/sharding_worker.py: every mesh against one device), its
    folder, and the outputs of 2 processes x 2 devices. pytest-xdist runs the module on one
    worker (`--dist loadfile`, pyproject.toml), so it is made once while the other worker runs
    other modules."""
    folder = tmp_path_factory.mktemp('meshes')
    _run_meshes(folder)
    return json.loads((folder / 'report.json').read_text()), folder


@pytest.mark.parametrize('mesh', MESHES)
def test_logits_and_greedy_tokens_match_one_device(meshes, mesh):
    report = meshes[0][mesh]
    assert report['tokens_equal']
    assert report['logits_diff'] <= TOLERANCE
    # The same prefill and step programs throughout: one compile each.
    assert report['traces'] == [1, 1]


@pytest.mark.parametrize('split', ['full', 'lora'])
@pytest.mark.parametrize('mesh', MESHES)
def test_the_train_step_matches_one_device(meshes, mesh, split):
    # One step of TrainSteps (2 accumulated micro-batches, clipping, AdamW), full fine-tuning
    # and LoRA: the loss, and every leaf of the new state (weights, AdamW's moments: the first
    # is a tenth of the clipped gradient), within 1e-5 of one device's.
    report = meshes[0][mesh][f'train_{split}']
    assert report['loss_diff'] <= TOLERANCE
    assert report['state_diff'] <= TOLERANCE
    # The updated weights and the optimizer's moments stay where the weights were placed.
    assert report['kept_shardings']


# Shards on the first device of each mesh, as the rules say for the worker's config (D=64,
# F=256, N=8 query heads of 16, K=2, V=516).
SHARD_SHAPES = {
    'data=8': {'embedder/input_embedding': [516, 64],
               'layer_0/mlp/gating_einsum': [2, 256, 64]},
    'data=2,tensor=4': {'embedder/input_embedding': [129, 64],
                        'layer_0/attn/q_einsum/w': [2, 64, 16],
                        'layer_0/attn/kv_einsum/w': [2, 2, 64, 16],
                        'layer_0/mlp/gating_einsum': [2, 64, 64],
                        'layer_0/mlp/linear': [64, 64]},
    'fsdp=4,tensor=2': {'embedder/input_embedding': [258, 16],
                        'layer_0/attn/q_einsum/w': [4, 16, 16],
                        'layer_0/attn/kv_einsum/w': [2, 1, 16, 16],
                        'layer_0/mlp/gating_einsum': [2, 128, 16],
                        'final_norm/scale': [16]},
    'tensor=8': {'embedder/input_embedding': [516, 64],
                 'layer_0/attn/q_einsum/w': [1, 64, 16],
                 'layer_0/attn/kv_einsum/w': [2, 2, 64, 16],
                 'layer_0/mlp/linear': [32, 64]},
}


@pytest.mark.parametrize('mesh', MESHES)
def test_shards_have_the_shapes_the_rules_say(meshes, mesh):
    shards = meshes[0][mesh]['shards']
    for path, shard in SHARD_SHAPES[mesh].items():
        assert shards[path] == shard, path
    # A weight split n ways by its spec: every shard holds exactly 1/n of its bytes.
    assert meshes[0][mesh]['shares_exact']


def test_the_decode_step_holds_the_collectives_of_its_mesh(meshes):
    report = meshes[0]
    # Data parallel: each device decodes its own rows; only the logits and the new end_index
    # [8] are gathered, whole for the host. No all-reduce.
    assert report['data=8']['collectives']['all-reduce'] == 0
    assert report['data=8']['collectives']['all-gather'] == 2
    # Tensor parallel: the head-split attention output and the FFN's down projection end in an
    # all-reduce of partial sums, 2 per layer, and one more outside the layers.
    for mesh in ('tensor=8', 'data=2,tensor=4'):
        assert report[mesh]['collectives']['all-reduce'] == 2 * LAYERS + 1, mesh
    # No step gathers a split weight whole; the largest all-gather is the logits [8, 516].
    for mesh in MESHES:
        assert report[mesh]['weights_gathered'] == 0, mesh
        assert report[mesh]['largest_gather'] <= LOGITS_SIZE, mesh


@pytest.mark.parametrize('checkpoint', ['hf', 'native'])
def test_load_places_each_weight_in_its_shards(meshes, checkpoint):
    # gemma3n.load(path, mesh=fsdp=4 x tensor=2) of a Hugging Face folder (read a tensor at a
    # time, cut into blocks) and of our own file (read block by block): the serving layout's
    # values exactly, each stored dimension split as its checkpoint dimension is, and the
    # logits of the same checkpoint loaded on one device.
    report = meshes[0]['load'][checkpoint]
    assert report['max_diff'] == 0
    assert report['q_spec'] == ['tensor', 'None', 'fsdp']     # q stored [N, H, D]
    assert report['shards']['layer_0/attn/q_einsum/w'] == [4, 16, 16]
    assert report['shards']['embedder/input_embedding'] == [258, 16]
    assert report['shares_exact']
    assert report['logits_diff'] <= TOLERANCE


def test_two_processes_match_one_process_with_as_many_devices(meshes):
    folder = meshes[1]
    four = np.load(folder / 'four.npz')
    for i in range(2):
        result = np.load(folder / f'process_{i}.npz')
        np.testing.assert_array_equal(result['devices'], [2, 4])
        np.testing.assert_array_equal(result['tokens'], four['tokens'])
        np.testing.assert_allclose(result['logits'], four['logits'], rtol=0, atol=TOLERANCE)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
