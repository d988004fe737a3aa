"""GGUF files of the bench's random checkpoint, made with llama.cpp's own converter and quantizer.

    python -m bench.llamacpp_gguf --size tiny            # bf16, q8_0 and q4_0 of the tiny size

The bench's checkpoint (`bench.common.ensure_weights`) is what our side loads. llama.cpp's
converter needs three things it lacks, so it converts a directory beside it,
`bench/results/llamacpp/hf/<size>/`, that links the same `model.safetensors` and adds:
- `tokenizer.model`: a synthetic SentencePiece model with one piece per vocabulary row (the
  control ids of Gemma: pad 0, eos 1, bos 2, unk 3; the 256 byte pieces; then `▁t<id>`): the
  bench feeds token ids, so the pieces only have to exist;
- `model-kv-shared.safetensors`: random k/v projections and key norms for the K/V-sharing
  layers, which llama.cpp's loader requires although those layers never use them;
- `config.json` without the final logit soft cap, as ours has none (the transformers side
  switches it off the same way).
Then `convert_hf_to_gguf.py --outtype bf16` and `llama-quantize` to Q8_0 and Q4_0 write
`bench/results/llamacpp/gguf/<size>-<format>.gguf`. Each file is made once and reused.
Needs `python -m bench.llamacpp_build` first (the quantizer and the converter's source).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import common
from bench.llamacpp_build import BIN, ROOT, SOURCE

FORMATS = ('bf16', 'q8_0', 'q4_0')
CONVERTED = 'bf16'                 # what the converter writes; the others are quantized from it
HF_DIR = ROOT / 'hf'
GGUF_DIR = ROOT / 'gguf'
TOKENIZER_FILE = 'tokenizer.model'
KV_SHARED_FILE = 'model-kv-shared.safetensors'  # the converter reads every model*.safetensors
# Gemma's SentencePiece control ids.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
CONTROL_PIECES = ('<pad>', '<eos>', '<bos>', '<unk>')
BYTE_PIECES = 256
KV_SHARED_SEED = common.WEIGHT_SEED + 1


def gguf_path(size: str, fmt: str) -> Path:
    return GGUF_DIR / f'{size}-{fmt}.gguf'


def sentencepiece_model(vocab: int) -> bytes:
    """A serialized SentencePiece (unigram) model of exactly `vocab` pieces."""
    from sentencepiece import sentencepiece_model_pb2 as spm
    if vocab < len(CONTROL_PIECES) + BYTE_PIECES:
        raise ValueError(f'a vocabulary of {vocab} cannot hold the control and byte pieces')
    model = spm.ModelProto()
    kinds = spm.ModelProto.SentencePiece
    for i, piece in enumerate(CONTROL_PIECES):
        model.pieces.add(piece=piece, score=0.0, type=kinds.UNKNOWN if i == UNK_ID else kinds.CONTROL)
    for b in range(BYTE_PIECES):
        model.pieces.add(piece=f'<0x{b:02X}>', score=0.0, type=kinds.BYTE)
    for i in range(len(model.pieces), vocab):
        model.pieces.add(piece=f'\u2581t{i}', score=-float(i), type=kinds.NORMAL)
    spec = model.trainer_spec
    spec.model_type = spm.TrainerSpec.UNIGRAM
    spec.vocab_size = vocab
    spec.byte_fallback = True
    spec.pad_id, spec.eos_id, spec.bos_id, spec.unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID
    model.normalizer_spec.name = 'identity'
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


def kv_shared_specs(config) -> list[tuple[str, tuple[int, ...], float, bool]]:
    """(HF key, shape, std, is_scale) of the k/v projections and key norms llama.cpp wants for
    the layers that reuse another layer's K/V (our config's K/V source is not the layer itself)."""
    kv_width = config.num_kv_heads * config.head_dim
    specs = []
    for layer, source in enumerate(config.kv_source_layers()):
        if source == layer:
            continue
        prefix = f'{common.HF_PREFIX}layers.{layer}.self_attn.'
        for name in ('k_proj', 'v_proj'):
            specs.append((f'{prefix}{name}.weight', (kv_width, config.embed_dim), config.embed_dim ** -0.5, False))
        specs.append((f'{prefix}k_norm.weight', (config.head_dim,), common.SCALE_NOISE, True))
    return specs


def converter_input(size: str) -> Path:
    """`HF_DIR/<size>`: the bench checkpoint plus what the converter needs (module docstring)."""
    weights = common.ensure_weights(size)
    config = common.bench_config(size)
    directory = HF_DIR / size
    directory.mkdir(parents=True, exist_ok=True)
    hf_config = json.loads((weights / common.CONFIG_FILE).read_text())
    hf_config.update(final_logit_softcapping=None, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
                     bos_token_id=BOS_ID)
    (directory / common.CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    link = directory / common.WEIGHTS_FILE
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to((weights / common.WEIGHTS_FILE).resolve())
    if not (directory / KV_SHARED_FILE).exists():
        common.write_random_safetensors(directory / KV_SHARED_FILE, kv_shared_specs(config), KV_SHARED_SEED)
    if not (directory / TOKENIZER_FILE).exists():
        (directory / TOKENIZER_FILE).write_bytes(sentencepiece_model(config.num_embed))
    return directory


def _run(cmd: list, **kwargs) -> None:
    print('+', ' '.join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def ensure_gguf(size: str, formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    """The GGUF file of each format, made once; returns {format: path}."""
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f'formats must be among {FORMATS}, got {unknown}')
    quantize = BIN / 'llama-quantize'
    if not quantize.exists():
        raise SystemExit(f'{quantize} is missing: run `python -m bench.llamacpp_build` first')
    source = gguf_path(size, CONVERTED)
    if not source.exists():
        directory = converter_input(size)
        GGUF_DIR.mkdir(parents=True, exist_ok=True)
        partial = source.with_suffix('.partial')
        # The converter imports the `gguf` package of its own tree (it puts gguf-py on its path).
        _run([sys.executable, SOURCE / 'convert_hf_to_gguf.py', directory, '--outtype', CONVERTED,
              '--outfile', partial])
        partial.replace(source)
    paths = {CONVERTED: source}
    for fmt in formats:
        path = gguf_path(size, fmt)
        if fmt != CONVERTED and not path.exists():
            partial = path.with_suffix('.partial')
            _run([quantize, source, partial, fmt.upper(), str(os.cpu_count())])
            partial.replace(path)
        paths[fmt] = path
    return {fmt: paths[fmt] for fmt in formats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=common.SIZES, default='tiny')
    parser.add_argument('--formats', default=','.join(FORMATS), help='comma-separated subset of ' + ', '.join(FORMATS))
    args = parser.parse_args()
    for fmt, path in ensure_gguf(args.size, tuple(f.strip() for f in args.formats.split(','))).items():
        print(f'{fmt}: {path} ({path.stat().st_size / common.GB:.3f} GB)')


if __name__ == '__main__':
    main()
