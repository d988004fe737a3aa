"""One 30 s clip through the released-size audio tower: ours (JAX) against `transformers` (torch).

Both sides hold the same random float32 weights (N(0, 1/fan_in), norm scales 1 + 0.1 N(0, 1),
per_dim_scale 0.3 N(0, 1)) of a `Gemma3nAudioConfig()` encoder (12 conformer blocks of width
1536, 0.68B parameters) in one process, and encode the same synthetic clip (two tones and noise,
30 s at 16 kHz): log-mel features (ours in numpy, theirs `Gemma3nAudioFeatureExtractor`), then
the encoder to 188 soft tokens. Printed and written to bench/results/audio-<UTC time>.json:
feature and encoder times (ours: first call with compilation, then warm best of `--repeats`;
theirs: best of `--repeats`), and the largest differences between the two sides.

    python -m bench.audio_tower [--repeats 2]

Needs ~6 GB of memory (both sides' weights) and a few minutes of both CPU cores.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common, process_memory

CLIP_SECONDS = 30
TONES_HZ = (440.0, 1250.0)
NOISE_LEVEL = 0.05


def synthetic_clip(sample_rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(CLIP_SECONDS * sample_rate) / sample_rate
    clip = sum(0.3 * np.sin(2 * np.pi * hz * t) for hz in TONES_HZ)
    return (clip + NOISE_LEVEL * rng.standard_normal(t.shape)).astype(np.float32)


def hf_encoder():
    import transformers

    from tests.hf_random_weights import randomize

    model = transformers.Gemma3nAudioEncoder(transformers.Gemma3nAudioConfig()).eval()
    randomize(model, common.WEIGHT_SEED)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from gemma3n.audio import AudioConfig, AudioEncoder, log_mel_features
    from gemma3n.audio.features import SAMPLE_RATE
    from gemma3n.checkpoints.hf_audio import params_from_hf
    from gemma3n.layers.weights import weight_schema

    info = common.machine_info()
    clip = synthetic_clip(SAMPLE_RATE)
    extractor = transformers.Gemma3nAudioFeatureExtractor()
    mel, valid = log_mel_features([clip])
    hf_out = extractor([clip], return_tensors='np')
    results = {
        'features_ours_s': common.best_of(lambda: log_mel_features([clip]), args.repeats),
        'features_hf_s': common.best_of(lambda: extractor([clip], return_tensors='np'),
                                        args.repeats),
        'features_max_abs_diff': float(np.abs(mel - hf_out['input_features']).max()),
        'mel_frames': mel.shape[1],
    }

    with common.Stopwatch() as watch:
        hf = hf_encoder()
    results['hf_build_s'] = watch.seconds
    mel_torch, padding_torch = torch.from_numpy(mel), torch.from_numpy(~valid)

    def run_hf():
        with torch.no_grad():
            return hf(mel_torch, padding_torch).last_hidden_state.numpy()

    theirs = run_hf()
    results['encoder_hf_s'] = common.best_of(run_hf, args.repeats)

    encoder = AudioEncoder(AudioConfig())
    with common.Stopwatch() as watch:
        state = {key: value.numpy() for key, value in hf.state_dict().items()}
        params = jax.device_put(params_from_hf(state, weight_schema(encoder, mel, valid)))
    results['ours_map_weights_s'] = watch.seconds
    apply = jax.jit(lambda p, m, v: encoder.apply({'params': p}, m, v)[0])
    with common.Stopwatch() as watch:
        ours = np.asarray(apply(params, mel, valid))
    results['encoder_ours_first_call_s'] = watch.seconds
    results['encoder_ours_s'] = common.best_of(
        lambda: apply(params, mel, valid).block_until_ready(), args.repeats)

    difference = np.abs(ours - theirs)
    results.update(
        soft_tokens=list(ours.shape), encoder_max_abs_diff=float(difference.max()),
        encoder_mean_abs_diff=float(difference.mean()), soft_token_max_abs=float(np.abs(theirs).max()),
        encoder_max_rel_diff=float(difference.max() / np.abs(theirs).max()),
        peak_rss_gb=process_memory.peak_rss_bytes() / common.GB, machine=info,
        threads={'torch': torch.get_num_threads()})
    rows = [
        ['log-mel features s (30 s clip)', results['features_ours_s'], results['features_hf_s']],
        ['encoder first call s', results['encoder_ours_first_call_s'], None],
        ['encoder warm s (best of %d)' % args.repeats, results['encoder_ours_s'],
         results['encoder_hf_s']],
    ]
    print(common.format_table(['30 s clip', 'ours', 'transformers'], rows))
    print(f"soft tokens {results['soft_tokens']}; max |ours - transformers| "
          f"{results['encoder_max_abs_diff']:.2e} (mean {results['encoder_mean_abs_diff']:.2e}) on "
          f"values up to {results['soft_token_max_abs']:.2f}; features "
          f"{results['features_max_abs_diff']:.2e}")
    print(f"load average at start {info['load_average']}; written to "
          f"{common.write_json(results, common.results_path('audio'))}")


if __name__ == '__main__':
    main()
