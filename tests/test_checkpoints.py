"""Tests of gemma3n.checkpoints: load HF / Orbax / our own checkpoints, save our own atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from gemma3n import SigLiPFromPatches, ViTModel, VisionExit
from gemma3n.checkpoints import apply_hf_softcap, hf_mapping, load_params, native, save_params
from gemma3n.checkpoints.safetensors_hf import HFSoftcapWarning
from gemma3n.config import TransformerConfig
from gemma3n.layout import load_serving, to_serving
from gemma3n.transformer import Gemma3nTransformer
from hf_oracle import make_hf_causal_lm, random_params, small_configs

CONFIG = small_configs()[0]
# Float32 logits of our model and transformers agree to ~1e-5-1e-4 on these O(1-5) logits: both
# round differently (RMSNorm rsqrt vs pow, softmax, RoPE angles) and 10 layers accumulate it.
LOGIT_TOLERANCE = 1e-4
SEQUENCE_LENGTH = 24     # longer than the sliding window (8) of the small configs
MM_PREFIX = 'model.language_model.'


def _flat(params):
    return hf_mapping.flatten_params(params)


def _assert_trees_equal(actual, expected):
    actual, expected = _flat(actual), _flat(expected)
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        value = np.asarray(value)
        assert actual[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual[name].view(np.uint8), value.view(np.uint8), err_msg=name)


def _tokens(config, seed=0):
    # Ids >= 1: id 0 is padding for our model but an ordinary token for transformers without a mask.
    return np.random.default_rng(seed).integers(1, config.num_embed, (2, SEQUENCE_LENGTH)).astype(np.int32)


def _our_logits(model, params, tokens):
    return np.asarray(model.apply({'params': params}, jnp.asarray(tokens)).logits)


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.fixture(scope='module')
def hf_checkpoint(tmp_path_factory):
    """A small random Gemma3nForCausalLM (HF vocabulary with the 256 extra rows), sharded save_pretrained."""
    params = random_params(CONFIG, seed=11)
    hf_model = make_hf_causal_lm(CONFIG, params, hf_vocab_size=CONFIG.num_embed + hf_mapping.HF_EXTRA_VOCAB)
    # The saved config carries HF's default softcap (30): transformers refuses None in config files.
    hf_model.config.final_logit_softcapping = hf_mapping.HF_DEFAULT_FINAL_LOGIT_SOFTCAP
    path = tmp_path_factory.mktemp('hf') / 'gemma3n-small'
    hf_model.save_pretrained(path, max_shard_size='100KB')
    return path, params, hf_model


# A model has no vision parameters either way: the loader decides from the model, not the flag.
@pytest.mark.parametrize('text_only', [True, False], ids=['text_only', 'no_vision_encoder'])
def test_hf_save_pretrained_loads_and_matches_transformers_logits(hf_checkpoint, caplog, text_only):
    path, params, hf_model = hf_checkpoint
    assert (path / 'model.safetensors.index.json').is_file()
    assert CONFIG.vision_encoder is None
    model = Gemma3nTransformer(config=CONFIG, text_only=text_only, dtype=jnp.float32)
    with caplog.at_level(logging.INFO, logger='gemma3n.checkpoints'), \
            pytest.warns(HFSoftcapWarning, match='final_logit_softcapping=30.0'):
        loaded = load_params(path, model=model, progress=False)
    _assert_trees_equal(loaded, params)
    assert [r.message for r in caplog.records if r.levelno == logging.INFO] == [
            f'Loaded {path}: dropped 256 extra vocabulary rows of embed_tokens.']

    capped = apply_hf_softcap(model, path)
    assert capped.config.final_logit_softcap == 30.0
    tokens = _tokens(CONFIG)
    expected = _hf_logits(hf_model, tokens)[..., :CONFIG.num_embed]
    np.testing.assert_allclose(_our_logits(capped, loaded, tokens), expected, atol=LOGIT_TOLERANCE, rtol=0)


@pytest.mark.parametrize('quantize_int8', [False, True], ids=['bf16', 'int8'])
def test_hf_checkpoint_straight_into_the_serving_layout(hf_checkpoint, quantize_int8):
    # The loader hands the converter its own layout change as a view (transposes, head reshapes,
    # stacked pairs) and the converter composes it with the serving order: the result must be
    # exactly what converting the loaded tree in memory gives.
    path, _, _ = hf_checkpoint
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.bfloat16)
    serving_model, streamed = load_serving(path, model, dtype=ml_dtypes.bfloat16, progress=False,
                                           quantize_int8=quantize_int8)
    _, expected = to_serving(model, load_params(path, model=model, dtype=ml_dtypes.bfloat16, progress=False),
                             quantize_int8=quantize_int8)
    assert serving_model is model     # the leaves say how each weight is stored
    streamed_leaves = jax.tree_util.tree_leaves_with_path(streamed)
    expected_leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in streamed_leaves] == [p for p, _ in expected_leaves]
    for (name, got), (_, want) in zip(streamed_leaves, expected_leaves):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(name))


def test_hf_config_is_derived_from_config_json(hf_checkpoint):
    path, params, _ = hf_checkpoint
    _assert_trees_equal(load_params(path, progress=False), params)   # model=None: config from config.json
    assert hf_mapping.config_from_hf(json.loads((path / 'config.json').read_text())) == CONFIG


def test_single_hf_safetensors_file(tmp_path, capsys):
    """A lone .safetensors file (prefix `model.`): needs model= when no config.json lies beside it."""
    params = random_params(CONFIG, seed=18)
    save_file(hf_mapping.params_to_hf(params, CONFIG, prefix='model.'), str(tmp_path / 'weights.safetensors'))
    _assert_trees_equal(load_params(tmp_path / 'weights.safetensors', model=CONFIG), params)
    assert 'Loading weights.safetensors' in capsys.readouterr().err     # the tqdm progress bar
    with pytest.raises(ValueError, match=r'No config.json next to .*weights\.safetensors: pass model='):
        load_params(tmp_path / 'weights.safetensors')


def _write_multimodal_checkpoint(path: Path, params, config: TransformerConfig, dtype) -> None:
    """What the hub's Gemma3nForConditionalGeneration files look like, at small size and in `dtype`.

    Built by hand because the real vision tower needs timm (not a dependency): the text decoder
    under `model.language_model.`, k/v/k_norm also for KV-shared layers, vision and audio tower
    tensors, the multimodal embedders, two shards and an index, a Gemma3nConfig config.json.
    """
    path.mkdir()
    tensors = {k: v.astype(dtype) for k, v in hf_mapping.params_to_hf(params, config, prefix=MM_PREFIX).items()}
    d, kv_rows, rng = config.embed_dim, config.num_kv_heads * config.head_dim, np.random.default_rng(0)
    for i in range(config.num_unshared_layers, config.num_layers):
        for name, shape in [('k_proj', (kv_rows, d)), ('v_proj', (kv_rows, d)), ('k_norm', (config.head_dim,))]:
            tensors[f'{MM_PREFIX}layers.{i}.self_attn.{name}.weight'] = rng.standard_normal(shape).astype(dtype)
    towers = {'model.vision_tower.timm_model.conv_stem.conv.weight': (16, 3, 3, 3),
              'model.vision_tower.timm_model.blocks.0.0.conv_exp.weight': (32, 16, 3, 3),
              'model.audio_tower.subsample_conv_projection.conv_0.conv.weight': (8, 1, 3, 3),
              'model.audio_tower.conformer.0.attention.attn.q_proj.weight': (16, 16),
              'model.embed_vision.embedding.weight': (128, 24), 'model.embed_audio.embedding.weight': (128, 16)}
    tensors.update({k: rng.standard_normal(s).astype(dtype) for k, s in towers.items()})
    names = sorted(tensors)
    shards = {'model-00001-of-00002.safetensors': names[::2], 'model-00002-of-00002.safetensors': names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / shard))
    index = {'metadata': {}, 'weight_map': {k: shard for shard, keys in shards.items() for k in keys}}
    (path / 'model.safetensors.index.json').write_text(json.dumps(index))
    hf_config = transformers.Gemma3nConfig(text_config=hf_mapping.hf_text_config(config))
    (path / 'config.json').write_text(json.dumps(hf_config.to_dict()))


def test_multimodal_checkpoint_skips_towers_and_matches_logits(tmp_path, caplog):
    config = small_configs()[2]
    params = random_params(config, seed=12)
    _write_multimodal_checkpoint(tmp_path / 'mm', params, config, ml_dtypes.bfloat16)
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.float32)
    with caplog.at_level(logging.INFO, logger='gemma3n.checkpoints'):
        loaded = load_params(tmp_path / 'mm', model=model, dtype=jnp.float32, progress=False)
    # The file holds bf16: the result is the bf16-rounded weights, as float32.
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in _flat(params).items()}
    _assert_trees_equal(loaded, hf_mapping.unflatten_params(rounded))
    summaries = [r.message for r in caplog.records if r.levelno == logging.INFO]
    assert len(summaries) == 1
    assert (f'dropped {3 * config.num_shared_layers} k_proj/v_proj/k_norm tensors of KV-shared layers 5-14; '
            '256 extra vocabulary rows of embed_tokens; 6 tensors outside the text decoder: '
            'model.audio_tower.* (2), model.embed_audio.* (1), model.embed_vision.* (1), '
            'model.vision_tower.* (2)') in summaries[0]

    hf_model = make_hf_causal_lm(config, hf_mapping.unflatten_params(rounded))
    tokens = _tokens(config, seed=1)
    np.testing.assert_allclose(_our_logits(model, loaded, tokens), _hf_logits(hf_model, tokens),
                               atol=LOGIT_TOLERANCE, rtol=0)


def _fake_vision_params():
    return {'vision_encoder': {'siglip_encoder': {'pos_embedding': np.ones((1, 4, 6), np.float32)}},
            'embedder': {'mm_input_projection': {'w': np.full((6, CONFIG.embed_dim), 0.5, np.float32)}}}


def _with_vision(params):
    flat = _flat(params)
    flat.update(_flat(_fake_vision_params()))
    return hf_mapping.unflatten_params(flat)


def test_orbax_checkpoint_in_reference_layout_loads(tmp_path, caplog):
    import orbax.checkpoint as ocp

    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in _flat(random_params(CONFIG, seed=13)).items()}
    full = _with_vision(hf_mapping.unflatten_params(params))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'orbax', full)
    checkpointer.wait_until_finished()

    with caplog.at_level(logging.INFO, logger='gemma3n.checkpoints'):
        text = load_params(tmp_path / 'orbax', model=CONFIG, progress=False)
    _assert_trees_equal(text, hf_mapping.unflatten_params(params))
    assert any('dropped 2 vision parameters' in r.message for r in caplog.records)
    _assert_trees_equal(load_params(tmp_path / 'orbax', progress=False), full)     # as stored
    as_f32 = load_params(tmp_path / 'orbax', model=CONFIG, dtype=np.float32, progress=False)
    np.testing.assert_array_equal(_flat(as_f32)['layer_3/mlp/linear'], params['layer_3/mlp/linear'].astype(np.float32))
    # A transform sees every restored leaf once, by path (Orbax restores the tree whole first).
    seen = []
    negated = load_params(tmp_path / 'orbax', model=CONFIG, progress=False,
                          transform=lambda path, value: seen.append(path) or -value)
    assert sorted(seen) == sorted(params)
    np.testing.assert_array_equal(_flat(negated)['layer_3/mlp/linear'], -params['layer_3/mlp/linear'])

    wider = dataclasses.replace(CONFIG, embed_dim=64)
    with pytest.raises(ValueError, match=r'orbax does not fit the model config: .*embedder/input_embedding has '
                                         r'shape \(300, 32\), expected \(300, 64\)'):
        load_params(tmp_path / 'orbax', model=wider, progress=False)


def test_native_checkpoint_of_a_config_hf_cannot_express_validates(tmp_path):
    # Three AltUp streams and no LAuReL change the tree; HF's Gemma 3n has neither, so only the
    # weight schema (not the HF mapping) can say what such a checkpoint must hold.
    config = dataclasses.replace(CONFIG, num_altup_inputs=3, use_laurel=False)
    with pytest.raises(ValueError, match='cannot be mapped to Hugging Face'):
        hf_mapping.check_representable(config)
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params']
    assert 'altup_projection_2' not in params and 'laurel' not in params['layer_0']
    save_params(params, tmp_path / 'odd.safetensors')
    _assert_trees_equal(load_params(tmp_path / 'odd.safetensors', model=model, progress=False), params)

    flat = _flat(params)
    flat['layer_1/mlp/linear'] = flat['layer_1/mlp/linear'][:, :-1]
    save_params(hf_mapping.unflatten_params(flat), tmp_path / 'bad.safetensors')
    with pytest.raises(ValueError, match=r'bad\.safetensors does not fit the model config: layer_1/mlp/linear '
                                         r'has shape \(1024, 31\), expected \(1024, 32\)'):
        load_params(tmp_path / 'bad.safetensors', model=model, progress=False)


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16], ids=['f32', 'bf16'])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    params = hf_mapping.unflatten_params({k: v.astype(dtype) for k, v in _flat(random_params(CONFIG, 14)).items()})
    save_params(params, tmp_path / 'ckpt.safetensors')
    _assert_trees_equal(load_params(tmp_path / 'ckpt.safetensors', model=CONFIG, progress=False), params)
    # jax arrays are saved as they are too
    save_params(_with_vision({'final_norm': {'scale': jnp.asarray(params['final_norm']['scale'])}}),
                tmp_path / 'jax.safetensors')
    loaded = load_params(tmp_path / 'jax.safetensors', progress=False)
    np.testing.assert_array_equal(loaded['final_norm']['scale'], params['final_norm']['scale'])
    assert (os.stat(tmp_path / 'ckpt.safetensors').st_mode & 0o777) == native.CHECKPOINT_MODE


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.safetensors'
    old = random_params(CONFIG, seed=15)
    save_params(old, path)
    before = path.read_bytes()

    def write_half_then_die(tensors, filename, metadata):
        Path(filename).write_bytes(b'partial' * 100)
        raise KeyboardInterrupt   # e.g. Ctrl-C in the middle of writing

    monkeypatch.setattr(native, 'save_file', write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_params(random_params(CONFIG, seed=16), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.safetensors']   # no temp file left
    _assert_trees_equal(load_params(path, model=CONFIG, progress=False), old)


def test_killed_save_process_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL while the new file is being written (bigger tree, so the write takes a while)."""
    path = tmp_path / 'ckpt.safetensors'
    save_params({'w': np.zeros(4, np.float32)}, path)
    before = path.read_bytes()
    script = textwrap.dedent(f'''
        import numpy as np, os, signal, threading
        from gemma3n.checkpoints import native
        real = native.save_file
        def save_and_die(tensors, filename, metadata):
            threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
            while True:
                real(tensors, filename, metadata)
        native.save_file = save_and_die
        native.save_params({{'w': np.ones((64, 1024, 1024), np.float32)}}, {str(path)!r})
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    assert path.read_bytes() == before
    np.testing.assert_array_equal(load_params(path, progress=False)['w'], np.zeros(4, np.float32))


def test_bad_inputs_raise_clear_errors(hf_checkpoint, tmp_path):
    path, _, _ = hf_checkpoint
    model = Gemma3nTransformer(config=CONFIG, text_only=True, dtype=jnp.float32)
    with pytest.raises(FileNotFoundError, match='Checkpoint not found: .*nowhere'):
        load_params(tmp_path / 'nowhere', model=model)

    # Copy of the HF checkpoint whose shards we damage one way at a time.
    def damaged(name):
        copy = tmp_path / name
        copy.mkdir()
        for f in path.iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        return copy

    index = json.loads((path / 'model.safetensors.index.json').read_text())['weight_map']
    key = 'model.layers.2.mlp.down_proj.weight'
    shard = index[key]

    missing = damaged('missing')
    tensors = load_file(str(missing / shard))
    del tensors[key]
    save_file(tensors, str(missing / shard))
    with pytest.raises(ValueError, match=re.escape(f'missing/model.safetensors.index.json lists tensors its shards '
                                                   f'do not hold: {key} (index: {shard}, found in no shard)')):
        load_params(missing, model=model, progress=False)
    index_without = {k: v for k, v in index.items() if k != key}
    (missing / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': index_without}))
    with pytest.raises(ValueError, match=rf'missing: .*lacks 1 tensor\(s\) of the text decoder: {key}'):
        load_params(missing, model=model, progress=False)

    wrong = damaged('wrong_shape')
    tensors = load_file(str(wrong / shard))
    tensors[key] = np.zeros((5, 7), np.float32)
    save_file(tensors, str(wrong / shard))
    with pytest.raises(ValueError, match=rf'Tensor {key} \(in .*{shard}\) has shape \(5, 7\), expected '
                                         rf'\({CONFIG.embed_dim}, {CONFIG.hidden_dim}\)'):
        load_params(wrong, model=model, progress=False)

    truncated = damaged('truncated')
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=rf'truncated/{shard} is not a readable safetensors file'):
        load_params(truncated, model=model, progress=False)

    corrupted = damaged('corrupted')
    (corrupted / shard).write_bytes(b'\x10\x00' + data[2:])     # header length no longer fits the file
    with pytest.raises(ValueError, match=rf'corrupted/{shard} is not a readable safetensors file'):
        load_params(corrupted, model=model, progress=False)

    lost_shard = damaged('lost_shard')
    (lost_shard / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf'Safetensors file not found: .*lost_shard/{shard}'):
        load_params(lost_shard, model=model, progress=False)

    other_size = damaged('other_size')
    with pytest.raises(ValueError, match=r'config.json does not match the model config: hidden_size=32, expected 64'):
        load_params(other_size, model=small_configs()[1], progress=False)

    unrelated = tmp_path / 'gpt2'
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16)
                                 ).save_pretrained(unrelated)
    with pytest.raises(ValueError, match=r"gpt2/config.json: model_type='gpt2' is not a Gemma 3n text config"):
        load_params(unrelated, progress=False)
    (unrelated / 'config.json').unlink()
    with pytest.raises(ValueError, match=r'gpt2: Not a Gemma 3n text checkpoint'):
        load_params(unrelated, model=model, progress=False)

    random_dir = tmp_path / 'photos'
    random_dir.mkdir()
    (random_dir / 'cat.jpg').write_bytes(b'\xff\xd8')
    with pytest.raises(ValueError, match=r'photos is not a recognised checkpoint directory.*cat\.jpg'):
        load_params(random_dir, model=model)
    with pytest.raises(ValueError, match=r'cat\.jpg is not a readable safetensors file'):
        load_params(random_dir / 'cat.jpg', model=model)

    # Our own format checked against the model: a tree of another size.
    save_params(random_params(CONFIG, seed=17), tmp_path / 'small.safetensors')
    deeper = small_configs()[1]
    absent = {e.path for e in hf_mapping.mapping_entries(deeper)} - {e.path for e in hf_mapping.mapping_entries(CONFIG)}
    with pytest.raises(ValueError, match=rf'small\.safetensors lacks {len(absent)} parameter\(s\) of the model: '
                                         r'layer_10/'):
        load_params(tmp_path / 'small.safetensors', model=deeper, progress=False)
    # A model with the SigLIP encoder: HF checkpoints lack it, and so does this file. The message
    # serves the command line (--image) and Python (a model without a vision encoder) alike.
    with_siglip = Gemma3nTransformer(config=dataclasses.replace(CONFIG, vision_encoder=SigLiPFromPatches(
        siglip_encoder=ViTModel(width=16, depth=1, mlp_dim=32, num_heads=2), siglip_exit=VisionExit(output_length=4),
        num_mm_tokens_per_image_prepool=64, num_mm_tokens_per_image=4, image_height=112, image_width=112)))
    advice = (r'On the command line, --image needs a checkpoint that has the SigLIP vision encoder .*'
              r'without --image this checkpoint serves text\. From Python, load it into a model without a '
              r'vision encoder, e\.g\. Gemma3n_E4B\(text_only=True\)\.')
    with pytest.raises(ValueError, match='Hugging Face Gemma 3n checkpoints hold no SigLIP vision encoder '
                                         r'\(their vision tower is MobileNet-V5, a different network\)\. ' + advice):
        load_params(path, model=with_siglip, progress=False)
    with pytest.raises(ValueError, match=r'small\.safetensors holds no vision encoder parameters\. ' + advice):
        load_params(tmp_path / 'small.safetensors', model=with_siglip, progress=False)
    _assert_trees_equal(load_params(tmp_path / 'small.safetensors', model=Gemma3nTransformer(config=CONFIG),
                                    progress=False), random_params(CONFIG, seed=17))


# --- peak memory of a real-size layout -------------------------------------------------------------

# E4B widths (D 2048, F 16384, 8x256 query heads, 2 KV heads, V 262144, PLE 256) with 5 layers: the
# real embedding table and real-size layers, ~2.8 GB in bfloat16.
MEMORY_CONFIG_LAYERS = 5
PEAK_FACTOR = 1.2   # issue 5: loading may need at most about 1.2x the bfloat16 size
MEMORY_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import ml_dtypes
    from gemma3n.checkpoints import load_params
    from gemma3n.checkpoints.hf_mapping import flatten_params
    from gemma3n.config import TransformerConfig

    def peak_rss():
        # VmHWM: this process image's peak resident set. (getrusage's ru_maxrss survives exec, so a child
        # of a big pytest process would start with the parent's peak.)
        with open('/proc/self/status') as status:
            line = next(line for line in status if line.startswith('VmHWM:'))
        return int(line.split()[1]) * 1024

    config = TransformerConfig.gemma3n(num_layers={layers}, num_shared_layers=2, num_sparse_layers=2)
    baseline = peak_rss()
    start = time.perf_counter()
    params = load_params(sys.argv[1], model=config, dtype=ml_dtypes.bfloat16, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    print(json.dumps(dict(baseline=baseline, peak=peak, seconds=seconds,
                          loaded_bytes=sum(leaf.nbytes for leaf in flatten_params(params).values()),
                          probe=float(params['layer_4']['mlp']['linear'][3, 5]))))
''')


def test_peak_memory_of_loading_a_real_size_layout(tmp_path):
    """MEMORY TEST (~30 s, writes ~2.9 GB to tmp): peak RSS of load_params in a fresh process (Linux)."""
    config = TransformerConfig.gemma3n(num_layers=MEMORY_CONFIG_LAYERS, num_shared_layers=2, num_sparse_layers=2)
    path = tmp_path / 'real_size'
    path.mkdir()
    entries = hf_mapping.mapping_entries(config)
    prefix = 'model.language_model.'
    weight_map = {}
    # One shard per parameter group keeps this process's own memory at one shard.
    groups = {'embed': [e for e in entries if e.path.startswith('embedder/input')],
              'ple': [e for e in entries if e.path.startswith('embedder/per_layer_input_embedding')],
              'rest': [e for e in entries if not e.path.startswith(('embedder/input', 'embedder/per_layer_input_emb'))]}
    for number, (group, members) in enumerate(groups.items()):
        shard = f'model-{number + 1:05d}-of-{len(groups):05d}.safetensors'
        tensors = {}
        for i, e in enumerate(members):
            for key, shape in zip(e.hf_keys, e.hf_shapes):
                tensors[prefix + key] = np.full(shape, (i % 7 + 1) / 8, dtype=ml_dtypes.bfloat16)
        if group == 'rest':   # the released files keep k/v of KV-shared layers
            tensors[prefix + 'layers.4.self_attn.k_proj.weight'] = np.zeros((512, 2048), ml_dtypes.bfloat16)
        save_file(tensors, str(path / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (path / 'model.safetensors.index.json').write_text(json.dumps({'weight_map': weight_map}))
    transformers.Gemma3nTextConfig(**hf_mapping.hf_text_config(config)).save_pretrained(path)

    try:
        result = subprocess.run([sys.executable, '-c', MEMORY_SCRIPT.format(layers=MEMORY_CONFIG_LAYERS), str(path)],
                                capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(path)   # pytest keeps recent tmp dirs; do not leave 2.9 GB behind
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    bf16_bytes = sum(int(np.prod(e.shape)) * 2 for e in entries)
    assert numbers['loaded_bytes'] == bf16_bytes
    increase = numbers['peak'] - numbers['baseline']
    print(f'\nreal-size layout: {bf16_bytes / 2**30:.2f} GiB bf16, baseline {numbers["baseline"] / 2**30:.2f} GiB, '
          f'peak {numbers["peak"] / 2**30:.2f} GiB, increase {increase / bf16_bytes:.3f}x, '
          f'load {numbers["seconds"]:.1f} s')
    assert increase <= PEAK_FACTOR * bf16_bytes
    linear_index = [e.path for e in groups['rest']].index('layer_4/mlp/linear')
    assert numbers['probe'] == (linear_index % 7 + 1) / 8
