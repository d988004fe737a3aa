"""`gemma3n finetune` end to end on the demo model: it learns a made-up chat data set, the chat
command answers from the result, a killed run resumes exactly, and bad input is refused.

The data (tests/data/velmora_*.jsonl) are two dozen questions about a fictional country, each
with a short answer the random demo model cannot know.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from cli_runner import assert_usage_error, cli_env, run_cli
from gemma3n.checkpoints import load_params
from gemma3n.checkpoints.hf_mapping import config_from_hf, flatten_params
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.sampler import Sampler
from gemma3n.text.tokenizer import Tokenizer
from gemma3n.training.checkpointing import STATE_FOLDER
from gemma3n.training.finetune import METRICS_FILE, PLOT_FILE
from gemma3n.transformer import Gemma3nTransformer

DATA = Path(__file__).parent / 'data'
TRAIN, EVAL = DATA / 'velmora_chat.jsonl', DATA / 'velmora_eval.jsonl'
# Small steps: 30 steps of 8 rows of 64 tokens (~2.5 conversations a row) see each
# conversation ~25 times, which the demo model needs to repeat every answer (measured: training
# loss 0.02 at step 30, from 8.6).
RUN = ('finetune', '--data', str(TRAIN), '--eval', str(EVAL), '--steps', '30', '--batch-size',
       '8', '--seq-len', '64', '--lr', '3e-3', '--warmup-steps', '3', '--save-every', '10')
# The resume check's own short run (a step is a quarter of RUN's): checkpoints at steps 2 and 4,
# killed after step 3, so that work is lost and redone.
RESUME_STEPS, RESUME_SAVE_EVERY = 4, 2
RESUME_RUN = ('finetune', '--data', str(TRAIN), '--steps', str(RESUME_STEPS), '--batch-size',
              '2', '--seq-len', '64', '--lr', '3e-3', '--save-every', str(RESUME_SAVE_EVERY))
# A resumed run redoes the same float32 operations on the same values: bitwise equal is
# expected, 1e-6 allows for nothing but a reordering inside XLA.
RESUME_TOL = 1e-6
# A run compiles its train step for up to ~2 minutes on a 2-core machine shared with other work.
RUN_TIMEOUT_S = 900


def run_finetune(env, *args):
    return subprocess.run([sys.executable, '-m', 'gemma3n', *args], capture_output=True,
                          text=True, env=env, timeout=RUN_TIMEOUT_S)


def conversations():
    lines = TRAIN.read_text().splitlines()
    return [[m['content'] for m in json.loads(line)['messages']] for line in lines]


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


@pytest.fixture(scope='module')
def trained(env, tmp_path_factory):
    out = tmp_path_factory.mktemp('run') / 'out'
    result = run_finetune(env, *RUN, '--out', str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def test_it_learns_every_training_answer(trained):
    out, result = trained
    assert f'fine-tuned model saved in {out}' in result.stderr
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 30 and losses[-1] < 0.1 < losses[0]
    assert [r['step'] for r in records if 'eval_loss' in r] == [30]
    assert (out / PLOT_FILE).read_bytes().startswith(b'\x89PNG')

    config = config_from_hf(json.loads((out / 'config.json').read_text()))
    model = Gemma3nTransformer(config=config, text_only=True, dtype=jnp.float32)
    sampler = Sampler(model=model, params=load_params(out, model=model, dtype=jnp.float32,
                                                      progress=False),
                      tokenizer=Tokenizer(out / 'tokenizer.model'), cache_length=64)
    questions, answers = zip(*conversations())
    assert sampler.sample([format_user_turn(q) for q in questions], max_new_tokens=16) \
        == list(answers)


def test_chat_command_answers_from_the_fine_tuned_folder(env, trained):
    out, _ = trained
    question, answer = conversations()[3]
    result = run_cli(env, 'chat', '--checkpoint', str(out), stdin=question + '\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == answer


def test_a_killed_run_resumes_exactly(env, tmp_path):
    finished, out = tmp_path / 'finished', tmp_path / 'out'
    result = run_finetune(env, *RESUME_RUN, '--out', str(finished))
    assert result.returncode == 0, result.stderr
    kill_and_resume(env, RESUME_RUN, out, final_file='params.safetensors')
    ours = flatten_params(load_params(out, progress=False))
    reference = flatten_params(load_params(finished, progress=False))
    assert ours.keys() == reference.keys()
    worst = max(float(np.max(np.abs(ours[k] - reference[k]))) for k in ours)
    assert worst <= RESUME_TOL


def kill_and_resume(env, run: tuple[str, ...], out: Path, final_file: str) -> None:
    """Runs `gemma3n RUN --out OUT` (RUN: RESUME_RUN and options), kills it (SIGKILL) between
    its two checkpoints, then resumes it to the end; checks that it was killed before writing
    `final_file` and that the metrics of the redone steps replace those it had written."""
    command = [sys.executable, '-m', 'gemma3n', *run, '--out', str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    first_checkpoint = out / STATE_FOLDER / str(RESUME_SAVE_EVERY)
    try:
        # Checkpoints are written in the background: the kill comes once the first one is
        # complete (Orbax renames its folder into place last) and a later step has run.
        while (_steps_done(out / METRICS_FILE) <= RESUME_SAVE_EVERY
               or not first_checkpoint.is_dir()):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert not (out / final_file).exists(), 'the run ended before it was killed'
    assert first_checkpoint.is_dir()

    result = run_finetune(env, *run, '--out', str(out), '--resume')
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line)['step'] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, RESUME_STEPS + 1))


def _steps_done(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return len([line for line in metrics.read_text().splitlines() if line.endswith('}')])


def test_resume_of_another_configuration_is_refused_and_nothing_changes(env, trained):
    out, _ = trained
    before = {path: path.stat().st_mtime_ns for path in out.rglob('*')}
    args = [a if a != '3e-3' else '1e-3' for a in RUN]
    result = run_cli(env, *args, '--out', str(out), '--resume')
    assert_usage_error(result, 'another configuration', 'learning_rate was 0.003, now 0.001')
    result = run_cli(env, *RUN, '--out', str(out))
    assert_usage_error(result, 'already holds a fine-tuning run', '--resume')
    assert {path: path.stat().st_mtime_ns for path in out.rglob('*')} == before


@pytest.mark.parametrize('lines, fragments', [
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
      '{"messages": [{"role": "user", "content": "hi"}', ''], ('bad.jsonl, line 2',)),
    (['', '  '], ('holds no examples',)),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'],
     ('line 1', "has role 'model' where 'user' was expected")),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], ('line 1', 'no assistant message')),
    (['{"prompt": "hi"}'], ('line 1', 'either "messages" or "text"')),
])
def test_bad_data_is_refused_naming_the_line(env, tmp_path, lines, fragments):
    data = tmp_path / 'bad.jsonl'
    data.write_text('\n'.join(lines))
    result = run_cli(env, 'finetune', '--data', str(data), '--steps', '2',
                     '--out', str(tmp_path / 'out'))
    assert_usage_error(result, *fragments)
    assert not (tmp_path / 'out').exists()


def test_too_long_conversations_skipped_on_request_and_unknown_freeze_patterns(env, tmp_path):
    result = run_cli(env, 'finetune', '--data', str(TRAIN), '--steps', '1', '--seq-len', '4',
                     '--too-long', 'skip', '--out', str(tmp_path / 'out'))
    assert_usage_error(result, 'no example is left to train on', '24 skipped')
    result = run_cli(env, 'finetune', '--data', str(TRAIN), '--steps', '1',
                     '--freeze', 'no/such/*', '--out', str(tmp_path / 'out'))
    assert_usage_error(result, "freeze pattern(s) ['no/such/*'] match no weight")
    assert not (tmp_path / 'out').exists()
