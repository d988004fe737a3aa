"""Where our decode step and prefill spend their time, and what the planned optimisations would buy.

    python -m bench.profile_decode --size reduced [--serving | --int8 | --int4] [--skip PARTS]

Measures, on the benchmark's random bfloat16 weights (in the checkpoint layout, the serving
layout, int8 or int4):
  1. the decode step as the Sampler compiles it, and a per-operation breakdown from a JAX profiler
     trace, grouped by module (the XLA op names are mapped back through the compiled HLO); also
     which weights the compiled step converts to float32 on every call; the same breakdown of a
     128-token prefill;
  2. the same step with the per-layer table kept out of it: its row gathered on the host from the
     memory-mapped checkpoint and passed as `per_layer_embeddings`;
  3. prefill with the model's last-token shortcut for the K/V-shared layers (`return_last_only`)
     against running every layer on every prompt token;
  4. each weight's contraction alone, as stored and re-laid out [out, in] (contracted over its
     last axis), for one token and for 128, plus int8 [out, in] weights converted in the step
     (checkpoint layout only: skipped with --serving, --int8 and --int4).
Prints tables and writes bench/results/profile-<size>-<time>.json.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from bench import common
from bench.side_ours import load_to_device
from gemma3n.compiler_options import compiler_options
from gemma3n.embedder import split_per_layer_table
from gemma3n.layers import contract
from gemma3n.layout import quantize, to_serving
from gemma3n.transformer import Gemma3nTransformer

CACHE_LENGTH = 1024
CONTEXT = 128             # decode steps follow a prompt of this length
TRACED_STEPS = 3
STEP_REPEATS = 8
MICRO_REPEATS = 5
PREFILL_REPEATS = 2
TABLE_KEY = 'model.embed_tokens_per_layer.weight'
_LAYER_INDEX = re.compile(r'layer_\d+')
_OPERAND = re.compile(r'%([\w.\-]+)')
PARAM_PREFIX = 'params__'
# Bytes a decode step reads per weight value, roughly (int4 adds a float16 scale per 32).
BYTES_PER_VALUE = {'bfloat16': common.BF16_BYTES, 'int8': 1, 'int4': 0.5 + 2 / 32}
WEIGHT_SEARCH_DEPTH = 2     # a dot reads a weight through at most a convert and a bitcast/copy


# ---- the step as the Sampler runs it ------------------------------------------------------------

def make_step(model: Gemma3nTransformer) -> Callable:
    """The decode step: one token in, logits of it and the updated cache out (cache donated),
    compiled as the engine compiles it."""
    def step(params, token, cache, per_layer=None):
        out = model.apply({'params': params}, token, cache=cache, return_last_only=True,
                          per_layer_embeddings=per_layer)
        return out.logits, out.cache
    return jax.jit(step, donate_argnums=(2,), compiler_options=compiler_options())


def prefilled_cache(model: Gemma3nTransformer, params: Any, vocab: int) -> Any:
    cache = model.init_cache(batch_size=1, dtype=jnp.bfloat16, cache_length=CACHE_LENGTH)
    prefill = jax.jit(lambda p, t, c: model.apply({'params': p}, t, cache=c, return_last_only=True).cache)
    return prefill(params, jnp.asarray(common.prompt_tokens(CONTEXT, vocab)), cache)


def time_steps(step: Callable, params: Any, cache: Any, make_inputs: Callable[[int], tuple]) -> tuple[float, Any]:
    """Median seconds of a decode step (host work for its inputs included), after one warm-up.

    make_inputs(previous token) -> (token [1, 1], per-layer rows [1, 1, NL, P] or None).
    """
    token = 1
    times = []
    for i in range(STEP_REPEATS + 1):
        with common.Stopwatch() as watch:
            token_in, per_layer = make_inputs(token)
            logits, cache = step(params, token_in, cache, per_layer)
            token = int(jnp.argmax(logits[0]))
        if i:
            times.append(watch.seconds)
    return float(np.median(times)), cache


# ---- the trace breakdown ------------------------------------------------------------------------

def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
    """instruction name -> {shape, opcode, operands, module}.

    The compiled HLO keeps no source metadata inside fusions, so an op is attributed to the
    largest weight it reads, directly or through the ops feeding it (e.g. a dot reading a
    converted copy of a weight): 'layer_*/mlp/gating_einsum'; ops reading no weight are
    'activations'.
    """
    instructions: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = _split_instruction(line)
        if parts is not None:
            name, shape, opcode, rest = parts
            instructions[name] = {'shape': shape, 'opcode': opcode, 'operands': rest.split('), ', 1)[0]}
    for name, info in instructions.items():
        weights = _weights_read(name, instructions, WEIGHT_SEARCH_DEPTH)
        if weights:
            largest = max(weights, key=lambda w: _elements(instructions[w]['shape']))
            info['module'] = _LAYER_INDEX.sub('layer_*', _param_path(largest))
        else:
            info['module'] = 'activations'
    return instructions


def _weights_read(name: str, instructions: dict[str, dict[str, Any]], depth: int) -> set[str]:
    operands = [o for o in _OPERAND.findall(instructions[name]['operands']) if o in instructions]
    found = {o for o in operands if o.startswith(PARAM_PREFIX)}
    if found or not depth:
        return found
    return set().union(*(_weights_read(o, instructions, depth - 1) for o in operands))


def _param_path(name: str) -> str:
    """'params__layer_8____mlp____gating_einsum__.1' -> 'layer_8/mlp/gating_einsum'."""
    return name.removeprefix(PARAM_PREFIX).rsplit('.', 1)[0].replace('____', '/').strip('_')


def _elements(shape: str) -> int:
    return math.prod(int(d) for d in re.findall(r'\d+', shape.split('[', 1)[-1])) if '[' in shape else 0


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """'  %name = f32[2,3]{1,0} fusion(%a, %b), kind=...' -> (name, shape, opcode, rest after '(')."""
    body = line.strip().removeprefix('ROOT ')
    if not body.startswith('%') or ' = ' not in body:
        return None
    name, rest = body[1:].split(' = ', 1)
    if rest.startswith('('):          # a tuple shape: up to its matching parenthesis
        depth = 0
        for end, char in enumerate(rest):
            depth += (char == '(') - (char == ')')
            if not depth:
                break
        shape, rest = rest[:end + 1], rest[end + 2:]
    elif ' ' in rest:
        shape, rest = rest.split(' ', 1)
    else:
        return None
    if '(' not in rest:
        return None
    opcode, rest = rest.split('(', 1)
    return name, shape.split('{')[0], opcode, rest


def trace_breakdown(run_once: Callable[[], None], hlo: dict[str, dict[str, Any]],
                    repeats: int = TRACED_STEPS) -> tuple[list, list]:
    """Per-call milliseconds of each XLA op of `hlo` in a profiler trace of `repeats` calls of
    `run_once`, grouped by module; the largest ops."""
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(repeats):
                run_once()
        trace_file = next(Path(logdir).rglob('perfetto_trace.json.gz'))
        events = json.load(gzip.open(trace_file))
    events = events['traceEvents'] if isinstance(events, dict) else events
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for event in events:
        if event.get('ph') == 'X' and event['name'] in hlo:
            totals[event['name']] += event.get('dur', 0.0) / 1e3 / repeats
            counts[event['name']] += 1
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in totals.items():
        info = hlo[name]
        key = f'{info["module"]} [{_kind(name)}]'
        groups[key][0] += ms
        groups[key][1] += counts[name] // repeats
    top_ops = sorted(((ms, name, hlo[name]['shape'], hlo[name]['module']) for name, ms in totals.items()),
                     reverse=True)[:15]
    return sorted(([k, v[0], v[1]] for k, v in groups.items()), key=lambda r: -r[1]), top_ops


def trace_lines(title: str, groups: list, top_ops: list) -> list[str]:
    total = sum(g[1] for g in groups)
    return ['', f'{title} (ops summed over layers; total {total:.1f} ms of op time):',
            common.format_table(['module [op]', 'ms/call', 'ops'], [g for g in groups if g[1] >= 0.5]),
            '', 'largest single ops:',
            common.format_table(['ms/call', 'op', 'shape', 'module'], [list(t) for t in top_ops])]


def _kind(name: str) -> str:
    """XLA names an op after its kind: 'convert_bitcast_fusion.12' -> 'convert_bitcast_fusion'."""
    return name.rsplit('.', 1)[0]


def converted_weights(hlo: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Weights the step converts to float32 on every call: (weight path, float32 shape)."""
    found = []
    for name, info in hlo.items():
        operands = _OPERAND.findall(info['operands'])
        if info['shape'].startswith('f32[') and 'convert' in name and len(operands) == 1 \
                and operands[0].startswith(PARAM_PREFIX):
            found.append((_param_path(operands[0]), info['shape']))
    return found


# ---- the per-layer table outside the step ---------------------------------------------------------

def mapped_table(weights: Path) -> np.ndarray:
    """The per-layer table [V, num_layers * P] memory-mapped from the safetensors file (no copy)."""
    path = weights / common.WEIGHTS_FILE
    with open(path, 'rb') as f:
        header_length = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(header_length))
    entry = header[TABLE_KEY]
    begin, _ = entry['data_offsets']
    return np.memmap(path, dtype=ml_dtypes.bfloat16, mode='r', offset=8 + header_length + begin,
                     shape=tuple(entry['shape']))


# ---- prefill --------------------------------------------------------------------------------------

def prefill_variants(model: Gemma3nTransformer, params: Any, vocab: int) -> list[list[Any]]:
    """Prefill seconds with the last-token shortcut (as the Sampler runs it) and without it: every
    layer on every token, then the last token's logits through the same tied head."""
    def shortcut(p, t, c):
        out = model.apply({'params': p}, t, cache=c, return_last_only=True)
        return out.logits, out.cache

    def every_token(p, t, c):
        out = model.apply({'params': p}, t, cache=c, return_last_only=False, return_hidden_states=True)
        head = p['embedder']['input_embedding']
        return contract('BD,VD->BV', out.hidden_states[:, -1], head), out.cache

    rows = []
    for length in common.PROMPT_LENGTHS:
        tokens = jnp.asarray(common.prompt_tokens(length, vocab))
        seconds = []
        for fn in (shortcut, every_token):
            compiled = jax.jit(fn)

            def run():
                cache = model.init_cache(batch_size=1, dtype=jnp.bfloat16, cache_length=CACHE_LENGTH)
                jax.block_until_ready(compiled(params, tokens, cache))
            run()
            seconds.append(common.best_of(run, PREFILL_REPEATS))
        rows.append([length, seconds[0], length / seconds[0], seconds[1], length / seconds[1],
                     1 - seconds[0] / seconds[1]])
    return rows


# ---- single contractions, by layout ------------------------------------------------------------------

def layout_cases(config: Any, params: Any) -> list[tuple[str, int, str, Any, str, Callable]]:
    """(weight, uses per step, stored equation, stored weight, [out, in] equation, re-layout)."""
    layer = params['layer_0']
    emb = params['embedder']
    shared_layers = config.num_layers - config.num_shared_layers
    return [
        ('mlp/gating_einsum [2,F,D]', config.num_layers, 'BTD,CFD->CBTF', layer['mlp']['gating_einsum'],
         'BTD,CFD->CBTF', lambda w: w),
        ('mlp/linear [F,D]', config.num_layers, 'BTF,FD->BTD', layer['mlp']['linear'],
         'BTF,DF->BTD', lambda w: w.T),
        ('attn/q_einsum [N,D,H]', config.num_layers, 'BTD,NDH->BTNH', layer['attn']['q_einsum']['w'],
         'BTD,NHD->BTNH', lambda w: jnp.swapaxes(w, 1, 2)),
        ('attn/kv_einsum [2,K,D,H]', shared_layers, 'BTD,CKDH->CBTKH', layer['attn']['kv_einsum']['w'],
         'BTD,CKHD->CBTKH', lambda w: jnp.swapaxes(w, 2, 3)),
        ('attn/attn_vec_einsum [N,H,D]', config.num_layers, 'BTNH,NHD->BTD',
         layer['attn']['attn_vec_einsum']['w'], 'BTNH,DNH->BTD', lambda w: jnp.moveaxis(w, 2, 0)),
        ('embedder/input_embedding as head [V,D]', 1, 'BTD,VD->BTV', emb['input_embedding'],
         'BTD,VD->BTV', lambda w: w),
        ('altup projections [D,D]', 2 * (config.num_altup_inputs - 1), 'BTD,DE->BTE',
         params['altup_projection_0']['altup_projection_0'], 'BTD,ED->BTE', lambda w: w.T),
        ('embedder/per_layer_input_projection [D,NL,P]', 1, 'BTD,DNP->BTNP',
         emb['per_layer_input_projection']['w'], 'BTD,NPD->BTNP', lambda w: jnp.moveaxis(w, 0, 2)),
    ]


def _operand(eqn: str, weight: Any, tokens: int) -> jax.Array:
    """A random bfloat16 input of the shape the equation's first operand needs."""
    sizes = dict(zip(eqn.split(',')[1].split('->')[0], weight.shape))
    sizes.update(B=1, T=tokens)
    shape = tuple(sizes[axis] for axis in eqn.split(',')[0])
    return jax.random.normal(jax.random.key(tokens), shape, jnp.float32).astype(jnp.bfloat16)


def _contracted(eqn: str) -> str:
    inputs, out = eqn.split('->')
    return ''.join(a for a in inputs.split(',')[1] if a not in out)


def einsum_fn(eqn: str, accumulate_f32: bool) -> Callable:
    """The model's contraction; optionally asking XLA for a float32 result (then rounded)."""
    kwargs = {'preferred_element_type': jnp.float32} if accumulate_f32 else {}
    return lambda x, w: jnp.einsum(eqn, x, w, **kwargs).astype(x.dtype)


def padded_rows_fn(eqn: str) -> Callable:
    """One token as two identical rows, float32 result: XLA then calls its bf16 matrix kernel
    instead of the matrix-vector path that converts the whole weight to float32."""
    matmul = einsum_fn(eqn, accumulate_f32=True)
    axis = eqn.split(',')[0].index('T')
    return lambda x, w: jax.lax.slice_in_dim(matmul(jnp.concatenate([x, x], axis), w), 0, 1, axis)


def multiply_reduce_fn(eqn: str) -> Callable:
    """One token against a weight stored [out..., in...]: an elementwise product summed over the
    trailing input axes in float32, which XLA fuses into one streaming pass over the weight."""
    contracted = _contracted(eqn)
    x_spec = eqn.split(',')[0]
    if ''.join(a for a in x_spec if a in contracted) != contracted or not eqn.split('->')[0].endswith(contracted):
        raise ValueError(f'{eqn}: the weight must end with the contracted axes, in the input\'s order.')
    axes = tuple(range(-len(contracted), 0))

    def fn(x, w, scale=None):
        x_in = x.reshape([x.shape[x_spec.index(a)] for a in contracted]).astype(jnp.float32)
        y = jnp.sum(w.astype(jnp.float32) * x_in, axis=axes)
        return (y if scale is None else y * scale).astype(x.dtype)
    return fn


def time_fn(fn: Callable, *args: Any) -> float:
    compiled = jax.jit(fn)
    jax.block_until_ready(compiled(*args))
    return common.best_of(lambda: jax.block_until_ready(compiled(*args)), MICRO_REPEATS)


DECODE_COLUMNS = ['stored einsum', '[out,in] einsum', '[out,in] mul+sum f32', '2 rows f32-acc',
                  'int8 mul+sum']
PREFILL_COLUMNS = ['stored einsum', '[out,in] einsum', 'stored f32-acc', '[out,in] f32-acc']


def layout_table(config: Any, params: Any, tokens: int) -> tuple[list[str], list[list[Any]]]:
    """Milliseconds of each weight's contraction, computed several ways; and the column names.

    Decode (one token): as the model does it, stored and re-laid out [out, in]; as a fused
    multiply-reduce over an [out, in] weight; as a two-row matrix product with a float32 result;
    int8 [out, in] through the multiply-reduce. Prefill: einsum with and without float32 results.
    """
    rows = []
    for name, uses, stored_eqn, weight, relaid_eqn, relayout in layout_cases(config, params):
        x = _operand(stored_eqn, weight, tokens)
        relaid = jax.jit(relayout)(weight)
        times = [time_fn(einsum_fn(stored_eqn, False), x, weight),
                 time_fn(einsum_fn(relaid_eqn, False), x, relaid)]
        if tokens == 1:
            times.append(time_fn(multiply_reduce_fn(relaid_eqn), x, relaid))
            times.append(time_fn(padded_rows_fn(relaid_eqn), x, relaid))
            quantized = quantize(relaid, relaid.ndim - len(_contracted(relaid_eqn)))
            times.append(time_fn(multiply_reduce_fn(relaid_eqn), x, quantized.q, quantized.scale))
            del quantized
        else:
            times.append(time_fn(einsum_fn(stored_eqn, True), x, weight))
            times.append(time_fn(einsum_fn(relaid_eqn, True), x, relaid))
        gb = weight.size * common.BF16_BYTES / common.GB
        rows.append([name, uses, gb, *(1e3 * t for t in times)])
        del relaid
    return ['weight', 'uses/step', 'GB bf16', *(f'{c} ms' for c in
                                                  (DECODE_COLUMNS if tokens == 1 else PREFILL_COLUMNS))], rows


# ---- main -----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', choices=common.SIZES, default='reduced')
    parser.add_argument('--serving', action='store_true',
                        help='profile the serving layout (gemma3n.layout.to_serving)')
    parser.add_argument('--int8', action='store_true',
                        help='the serving layout with int8 weights (implies --serving)')
    parser.add_argument('--int4', action='store_true',
                        help='the serving layout with int4 weights (implies --serving)')
    parser.add_argument('--skip', default='', help='comma-separated parts to skip: trace,prefill_trace,host_table,prefill,layout')
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(',')))
    config = common.bench_config(args.size)
    weights = common.ensure_weights(args.size)
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.bfloat16)
    params = load_to_device(weights, model)
    if args.int8 and args.int4:
        parser.error('choose --int8 or --int4, not both')
    fmt = 'int8' if args.int8 else 'int4' if args.int4 else 'bfloat16'
    if args.serving or args.int8 or args.int4:
        model, params = to_serving(model, params, quantize_int8=args.int8, quantize_int4=args.int4)
        # The layout table compares layouts of the checkpoint's own weights, which are gone now.
        skip.add('layout')
    vocab = config.num_embed
    report: dict[str, Any] = {'size': args.size, 'machine': common.machine_info()}
    lines = [f'== profile of our decode step, {args.size} ({common.param_count(config) / 1e9:.2f}B params, '
             f'{fmt}), load average {report["machine"]["load_average"][0]:.2f}']

    step = make_step(model)
    cache = prefilled_cache(model, params, vocab)
    baseline_s, cache = time_steps(step, params, cache, lambda t: (jnp.full((1, 1), t, jnp.int32), None))
    weights_read = common.decode_weights_read(config)["total"] * BYTES_PER_VALUE[fmt]
    report['step_s'] = baseline_s
    lines.append(f'decode step (Sampler\'s path, table inside the step): {1e3 * baseline_s:.1f} ms '
                 f'= {1 / baseline_s:.2f} tok/s; weights read {weights_read / common.GB:.2f} GB '
                 f'-> {weights_read / baseline_s / common.GB:.1f} GB/s effective')

    hlo = parse_hlo(step.lower(params, jnp.ones((1, 1), jnp.int32), cache).compile().as_text())
    converted = converted_weights(hlo)
    converted_gb = sum(_elements(shape) for _, shape in converted) * common.BF16_BYTES / common.GB
    report['converted_to_f32'] = converted
    lines.append(f'weights converted to float32 inside every step: {len(converted)} '
                 f'({converted_gb:.2f} GB as bf16): '
                 + ', '.join(sorted({_LAYER_INDEX.sub("layer_*", p) for p, _ in converted})))

    if 'trace' not in skip:
        state = {'cache': cache}

        def decode_once():
            logits, state['cache'] = step(params, jnp.ones((1, 1), jnp.int32), state['cache'], None)
            logits.block_until_ready()
        groups, top_ops = trace_breakdown(decode_once, hlo)
        cache = state['cache']
        report['trace_groups'], report['trace_top_ops'] = groups, top_ops
        lines += trace_lines('profiler trace of the decode step, ms per step by module', groups, top_ops)

    if 'prefill_trace' not in skip:
        def prefill_logits(params, tokens, cache):     # `params`: its HLO names start PARAM_PREFIX
            return model.apply({'params': params}, tokens, cache=cache, return_last_only=True).logits
        prefill = jax.jit(prefill_logits)
        tokens = jnp.asarray(common.prompt_tokens(CONTEXT, vocab))
        empty = model.init_cache(batch_size=1, dtype=jnp.bfloat16, cache_length=CACHE_LENGTH)
        prefill_hlo = parse_hlo(prefill.lower(params, tokens, empty).compile().as_text())

        def prefill_once():
            prefill(params, tokens, empty).block_until_ready()
        prefill_once()
        groups, top_ops = trace_breakdown(prefill_once, prefill_hlo, PREFILL_REPEATS)
        report['prefill_trace_groups'], report['prefill_trace_top_ops'] = groups, top_ops
        lines += trace_lines(f'profiler trace of a {CONTEXT}-token prefill, ms per call by module',
                             groups, top_ops)

    if 'host_table' not in skip:
        table = mapped_table(weights)
        n, p = config.num_layers, config.per_layer_input_dim
        lean, _ = split_per_layer_table(params)
        rows_shape = (1, 1, n, p)      # [B, L, num_layers, P]
        gather_s = common.best_of(lambda: np.asarray(table[[1]]).reshape(rows_shape), STEP_REPEATS)
        host_s, cache = time_steps(step, lean, cache, lambda t: (
            jnp.full((1, 1), t, jnp.int32), jnp.asarray(np.asarray(table[[t]]).reshape(rows_shape))))
        table_gb = config.num_embed * n * p * common.BF16_BYTES / common.GB
        report.update(host_table_step_s=host_s, host_gather_s=gather_s, table_gb=table_gb)
        lines += ['', f'per-layer table ({table_gb:.2f} GB) gathered on the host from the memory-mapped '
                      f'checkpoint: step {1e3 * host_s:.1f} ms (vs {1e3 * baseline_s:.1f} inside), '
                      f'host gather {1e6 * gather_s:.0f} us; the device then holds {table_gb:.2f} GB less']

    if 'prefill' not in skip:
        rows = prefill_variants(model, params, vocab)
        report['prefill'] = rows
        lines += ['', f'prefill: last-token shortcut for layers {config.num_unshared_layers}+ (current) '
                      'vs every layer on every token:',
                  common.format_table(['prompt', 'shortcut s', 'tok/s', 'every token s', 'tok/s', 'saved'], rows)]

    if 'layout' not in skip:
        for tokens in (1, CONTEXT):
            header, rows = layout_table(config, params, tokens)
            report[f'layout_T{tokens}'] = {'header': header, 'rows': rows}
            per_step = ['per step (x uses)', None, sum(r[1] * r[2] for r in rows),
                        *(sum(r[1] * r[i] for r in rows) for i in range(3, len(header)))]
            lines += ['', f'each weight\'s contraction alone, {tokens} token(s), bfloat16 in and out, '
                          'best of {MICRO_REPEATS} (ms):'.replace('{MICRO_REPEATS}', str(MICRO_REPEATS)),
                      common.format_table(header, rows + [per_step])]

    text = '\n'.join(lines)
    print(text)
    report['text'] = text
    out = common.write_json(report, common.results_path(f'profile-{args.size}'))
    print(f'written to {out.relative_to(common.REPO_ROOT)}')


if __name__ == '__main__':
    main()
