"""Tests of the lazily read per-layer embedding table and of load_params(skip_per_layer_table=True)."""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from gemma3n.checkpoints import LazyPerLayerTable, hf_mapping, load_params, open_per_layer_table, save_params
from gemma3n.checkpoints import loader, per_layer_table
from gemma3n.checkpoints.safetensors_files import SafetensorsFiles
from gemma3n.config import TransformerConfig
from gemma3n.embedder import PER_LAYER_TABLE_PATH
from hf_oracle import HF_PREFIX, make_hf_causal_lm, random_params, small_configs

CONFIG = small_configs()[0]
TABLE = PER_LAYER_TABLE_PATH
HF_TABLE_KEY = 'embed_tokens_per_layer.weight'
ROW_SHAPE = (CONFIG.num_layers, CONFIG.per_layer_input_dim)


def _flat(params):
    return hf_mapping.flatten_params(params)


def _ids(seed: int) -> list[np.ndarray]:
    """Id arrays: 1-D with repeats and the first/last rows, 2-D [B, L], a scalar and an empty one."""
    rng = np.random.default_rng(seed)
    some = rng.integers(0, CONFIG.num_embed, 40)
    with_repeats = np.concatenate([some, some[:10], [0, CONFIG.num_embed - 1, 0]])
    return [with_repeats, rng.integers(0, CONFIG.num_embed, (3, 17)).astype(np.int32),
            np.int64(7), np.zeros((2, 0), np.int64)]


def _assert_bitwise_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
    """A small random Gemma3nForCausalLM saved by transformers (float32, sharded) and its own table [V, NL*P]."""
    params = random_params(CONFIG, seed=21)
    hf_model = make_hf_causal_lm(CONFIG, params, hf_vocab_size=CONFIG.num_embed + hf_mapping.HF_EXTRA_VOCAB)
    hf_model.config.final_logit_softcapping = hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP   # None is not savable
    path = tmp_path_factory.mktemp('hf') / 'gemma3n-small'
    hf_model.save_pretrained(path, max_shard_size='100KB')
    return path, hf_model.model.embed_tokens_per_layer.weight.detach().numpy().copy()


def _spy_reads(monkeypatch) -> list[str]:
    """Names of the tensors load_params reads from safetensors files from now on."""
    read = []
    original = SafetensorsFiles.read
    monkeypatch.setattr(SafetensorsFiles, 'read', lambda self, key: read.append(key) or original(self, key))
    return read


def _spy_row_bytes(monkeypatch) -> list[int]:
    """Byte counts of the reads a LazyPerLayerTable makes from now on."""
    counts = []
    original = per_layer_table.read_into
    monkeypatch.setattr(per_layer_table, 'read_into',
                        lambda reader, buffer, *args: counts.append(buffer.nbytes) or original(reader, buffer, *args))
    return counts


def test_hf_rows_equal_the_loaded_table_and_transformers_weights(hf_checkpoint, monkeypatch):
    path, hf_table = hf_checkpoint
    loaded = _flat(load_params(path, model=CONFIG, progress=False))[TABLE]
    loaded_bf16 = _flat(load_params(path, model=CONFIG, dtype=ml_dtypes.bfloat16, progress=False))[TABLE]
    # Independent of our mapping: transformers' own tensor, layer-major columns l * P + p.
    reference = hf_table.reshape(CONFIG.num_embed, *ROW_SHAPE)
    row_bytes = CONFIG.num_layers * CONFIG.per_layer_input_dim * 4     # stored float32

    with open_per_layer_table(path, model=CONFIG, dtype=np.float32) as table, open_per_layer_table(path) as bf16_table:
        assert table.shape == (CONFIG.num_embed, *ROW_SHAPE) and table.dtype == np.float32
        assert table.stored_dtype == np.float32 and table.nbytes_on_disk == CONFIG.num_embed * row_bytes
        assert bf16_table.dtype == ml_dtypes.bfloat16     # the default; config from config.json
        for ids in _ids(seed=0):
            read = _spy_row_bytes(monkeypatch)
            rows = table[ids]
            assert sum(read) == np.unique(ids).size * row_bytes       # each distinct row read once, nothing else
            _assert_bitwise_equal(rows, loaded[ids])
            _assert_bitwise_equal(rows, reference[ids])
            _assert_bitwise_equal(bf16_table[ids], loaded_bf16[ids])


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16], ids=['f32', 'bf16'])
def test_native_rows_equal_the_saved_table(tmp_path, dtype):
    params = {k: v.astype(dtype) for k, v in _flat(random_params(CONFIG, seed=22)).items()}
    save_params(hf_mapping.unflatten_params(params), tmp_path / 'ckpt.safetensors')
    with open_per_layer_table(tmp_path / 'ckpt.safetensors', model=CONFIG, dtype=dtype) as table, \
            open_per_layer_table(tmp_path / 'ckpt.safetensors', dtype=np.float32) as as_stored:
        assert as_stored.shape == params[TABLE].shape and as_stored.stored_dtype == dtype
        for ids in _ids(seed=1):
            _assert_bitwise_equal(table[ids], params[TABLE][ids])
            _assert_bitwise_equal(as_stored[ids], params[TABLE][ids].astype(np.float32))


def test_skip_per_layer_table_never_reads_it_in_any_format(hf_checkpoint, tmp_path, monkeypatch, caplog):
    import orbax.checkpoint as ocp

    path, _ = hf_checkpoint
    full = _flat(load_params(path, model=CONFIG, progress=False))
    read = _spy_reads(monkeypatch)
    with caplog.at_level(logging.INFO, logger='gemma3n.checkpoints'):
        skipped = _flat(load_params(path, model=CONFIG, progress=False, skip_per_layer_table=True))
    assert skipped.keys() == full.keys() - {TABLE}
    assert all(np.array_equal(skipped[name], full[name]) for name in skipped)
    assert HF_PREFIX + HF_TABLE_KEY not in read and len(read) == len(set(read)) > 0
    assert [r.message for r in caplog.records if r.levelno == logging.INFO] == [
            f'Loaded {path}: dropped 256 extra vocabulary rows of embed_tokens; '
            f'{HF_PREFIX}{HF_TABLE_KEY} (not read: skipped on request).']

    params = random_params(CONFIG, seed=23)
    save_params(params, tmp_path / 'ckpt.safetensors')
    for model in (CONFIG, None):
        read.clear()
        native = _flat(load_params(tmp_path / 'ckpt.safetensors', model=model, progress=False,
                                   skip_per_layer_table=True))
        assert native.keys() == _flat(params).keys() - {TABLE} and TABLE not in read and read

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'orbax', params)
    checkpointer.wait_until_finished()
    restored = []
    original = loader.orbax_restore
    monkeypatch.setattr(loader, 'orbax_restore',
                        lambda p, names, dtype: restored.extend(names) or original(p, names, dtype))
    orbax = _flat(load_params(tmp_path / 'orbax', model=CONFIG, progress=False, skip_per_layer_table=True))
    assert orbax.keys() == _flat(params).keys() - {TABLE} and TABLE not in restored
    np.testing.assert_array_equal(orbax['final_norm/scale'], params['final_norm']['scale'])


def test_bad_ids_and_bad_tables_raise_clear_errors(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint
    with open_per_layer_table(path, model=CONFIG) as table:
        with pytest.raises(ValueError, match=r'ids must lie in \[0, 300\); got 3 outside: \[-1, 300, 1000\]'):
            table[np.array([[3, -1], [300, 1000]])]
        with pytest.raises(TypeError, match='ids must be integers, got an array of float32'):
            table[np.array([1.0], np.float32)]

    # Our format with a table one column too wide for the config.
    params = _flat(random_params(CONFIG, seed=24))
    params[TABLE] = np.zeros((CONFIG.num_embed, CONFIG.num_layers, CONFIG.per_layer_input_dim + 1), np.float32)
    save_params(hf_mapping.unflatten_params(params), tmp_path / 'wide.safetensors')
    with pytest.raises(ValueError, match=rf'Tensor {TABLE} in .*wide\.safetensors has shape \(300, 10, 9\), '
                                         r'expected \(300, 10, 8\)'):
        open_per_layer_table(tmp_path / 'wide.safetensors', model=CONFIG)

    # A HF file whose table has the wrong number of layers, and one with an integer table.
    hf = hf_mapping.params_to_hf(random_params(CONFIG, seed=25), CONFIG, prefix=HF_PREFIX)
    hf[HF_PREFIX + HF_TABLE_KEY] = np.zeros((CONFIG.num_embed, 9 * CONFIG.per_layer_input_dim), np.float32)
    save_file(hf, str(tmp_path / 'short.safetensors'))
    with pytest.raises(ValueError, match=rf'Tensor model\.{HF_TABLE_KEY} in .*short\.safetensors has shape '
                                         r'\(300, 72\), expected \(300, 80\)'):
        open_per_layer_table(tmp_path / 'short.safetensors', model=CONFIG)
    hf[HF_PREFIX + HF_TABLE_KEY] = np.zeros((CONFIG.num_embed, 80), np.int32)
    save_file(hf, str(tmp_path / 'ints.safetensors'))
    with pytest.raises(ValueError, match=rf'{HF_TABLE_KEY} in .*ints\.safetensors has dtype int32, expected a float'):
        open_per_layer_table(tmp_path / 'ints.safetensors', model=CONFIG)
    with pytest.raises(ValueError, match=r'No config\.json next to .*ints\.safetensors: pass model='):
        open_per_layer_table(tmp_path / 'ints.safetensors')

    larger_vocab = dataclasses.replace(CONFIG, num_embed=400)
    with pytest.raises(ValueError, match='config.json does not match the model config: vocab_size'):
        open_per_layer_table(path, model=larger_vocab)
    no_table = {k: v for k, v in _flat(random_params(CONFIG, seed=26)).items() if k != TABLE}
    save_params(hf_mapping.unflatten_params(no_table), tmp_path / 'no_table.safetensors')
    with pytest.raises(ValueError, match=rf'no_table\.safetensors holds no tensor {TABLE}'):
        open_per_layer_table(tmp_path / 'no_table.safetensors')
    with pytest.raises(FileNotFoundError, match='Checkpoint not found: .*nowhere'):
        open_per_layer_table(tmp_path / 'nowhere', model=CONFIG)

    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'orbax', {'final_norm': {'scale': np.ones(4, np.float32)}})
    checkpointer.wait_until_finished()
    with pytest.raises(ValueError, match=r'orbax is an Orbax checkpoint, .*load it with load_params'):
        open_per_layer_table(tmp_path / 'orbax', model=CONFIG)


# --- memory -----------------------------------------------------------------------------------------

# E4B's per-layer table has 262144 rows of 35 x 256; a quarter of them (1.2 GB in bfloat16) keeps the
# test fast while a full read would still stand out far above the threshold.
MEMORY_VOCAB = 65_536
MEMORY_CONFIG = TransformerConfig.gemma3n(num_embed=MEMORY_VOCAB)
MEMORY_IDS = (2, 256)            # 512 rows, as a [B, L] prompt
MAX_RSS_INCREASE = 0.05          # of the table's size
PATTERN_PERIOD = 256             # bfloat16 holds the integers 0..256 exactly
MEMORY_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from gemma3n.checkpoints import open_per_layer_table
    from gemma3n.config import TransformerConfig
    from gemma3n.schema import text_schema

    def peak_rss():
        # VmHWM: this process image's peak resident set (ru_maxrss would carry the parent's peak over exec).
        with open('/proc/self/status') as status:
            return int(next(line for line in status if line.startswith('VmHWM:')).split()[1]) * 1024

    ids = np.random.default_rng(0).integers(0, {vocab}, {ids_shape})
    config = TransformerConfig.gemma3n(num_embed={vocab})
    text_schema(config)    # tracing the model for its weight schema (cached) is not what is measured
    baseline = peak_rss()
    with open_per_layer_table(sys.argv[1], model=config) as table:
        rows = table[ids]
    np.save(sys.argv[2], rows.view(np.uint16))   # bfloat16 bits: .npy has no bfloat16
    print(json.dumps(dict(baseline=baseline, peak=peak_rss(), table_bytes=table.nbytes_on_disk,
                          ids=ids.tolist(), shape=rows.shape)))
''')


def _pattern(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """The value the memory test's table holds at (row, column): row // 256 in column 0 names the block."""
    values = (rows[:, None] + columns[None, :]) % PATTERN_PERIOD
    return np.where(columns[None, :] == 0, rows[:, None] // PATTERN_PERIOD, values)


def _write_big_table(path: Path, vocab_size: int, width: int) -> None:
    """A one-tensor HF safetensors file [vocab_size, width] bfloat16, written block by block.

    safetensors' writers need the whole tensor in memory; the header is the documented layout
    (little-endian u64 length + JSON padded to 8 bytes) so this process stays small too.
    """
    key = HF_PREFIX + HF_TABLE_KEY
    nbytes = vocab_size * width * 2
    header = json.dumps({key: {'dtype': 'BF16', 'shape': [vocab_size, width], 'data_offsets': [0, nbytes]}})
    header += ' ' * (-len(header) % 8)
    block = _pattern(np.arange(PATTERN_PERIOD), np.arange(width)).astype(ml_dtypes.bfloat16)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(header)) + header.encode())
        for number in range(vocab_size // PATTERN_PERIOD):
            block[:, 0] = number
            f.write(block.tobytes())


def test_gathering_rows_keeps_peak_memory_far_below_the_table(tmp_path):
    """MEMORY TEST (~10 s, writes 1.2 GB to tmp): peak RSS of a gather from a real-width table (Linux)."""
    width = MEMORY_CONFIG.num_layers * MEMORY_CONFIG.per_layer_input_dim
    path = tmp_path / 'table.safetensors'
    try:
        _write_big_table(path, MEMORY_VOCAB, width)
        result = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT.format(vocab=MEMORY_VOCAB, ids_shape=MEMORY_IDS),
                                 str(path), str(tmp_path / 'rows.npy')], capture_output=True, text=True, timeout=120)
    finally:
        path.unlink(missing_ok=True)   # pytest keeps recent tmp dirs; do not leave 1.2 GB behind
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers['table_bytes'] == MEMORY_VOCAB * width * 2
    assert numbers['shape'] == [*MEMORY_IDS, MEMORY_CONFIG.num_layers, MEMORY_CONFIG.per_layer_input_dim]
    ids = np.asarray(numbers['ids'])
    expected = _pattern(ids.reshape(-1), np.arange(width)).reshape(*MEMORY_IDS, MEMORY_CONFIG.num_layers, -1)
    rows = np.load(tmp_path / 'rows.npy').view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(rows.astype(np.float32), expected)
    increase = numbers['peak'] - numbers['baseline']
    print(f'\nper-layer table {numbers["table_bytes"] / 2**30:.2f} GiB: gathering {np.prod(MEMORY_IDS)} rows raised '
          f'peak RSS by {increase / 2**20:.1f} MiB ({increase / numbers["table_bytes"]:.2%})')
    assert increase < MAX_RSS_INCREASE * numbers['table_bytes']
