"""State survives interruptions: streams stopped early, Ctrl-C during a step, failed steps,
saves killed midway, damaged compilation cache entries.

The demo model decodes greedily, so a conversation whose first answer was stopped after k
tokens must continue exactly as one whose first answer was cut at k tokens by max_new_tokens
(both close the answer with <end_of_turn> before the next user turn).
"""

import gc
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from gemma3n.cli import chat as cli_chat
from gemma3n.checkpoints import load_params, save_params
from gemma3n.text import special_tokens
from cli_runner import demo_chat_sampler

CACHE_LENGTH = 256
MAX_NEW_TOKENS = 8
FIRST, SECOND = 'Hello', 'How are you?'
TIMEOUT_S = 120


@pytest.fixture(scope='module')
def chat():
    """One ChatSampler for the whole module (its compiled steps are reused); reset per test."""
    return demo_chat_sampler(CACHE_LENGTH, MAX_NEW_TOKENS)


@pytest.fixture
def fresh(chat):
    chat.reset()
    yield chat
    chat.reset()


def default_ctrl_c():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal: a shell starts a background job (a CI
    run started with `&`, say) with SIGINT ignored, and its processes inherit that."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


CTRL_C_THEN_COMMAND = ('import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); '
                       "runpy.run_module('gemma3n', run_name='__main__', alter_sys=True)")


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    previous = signal.getsignal(signal.SIGINT)
    default_ctrl_c()
    yield
    signal.signal(signal.SIGINT, previous)


def reference(chat, first_answer_tokens):
    """The first answer cut at `first_answer_tokens`, then SECOND answered in full."""
    chat.reset()
    first = chat.chat(FIRST, max_new_tokens=first_answer_tokens)
    return first, chat.chat(SECOND)


def test_chat_stream_left_by_break_keeps_what_was_streamed(fresh):
    pieces = fresh.chat(FIRST, stream=True)
    streamed = []
    for piece in pieces:
        streamed.append(piece)
        if len(streamed) == 3:
            break
    del pieces      # dropped: closed and collected, as a caller's loop variable would be
    gc.collect()
    kept = fresh.last_answer_length
    second = fresh.chat(SECOND)          # today: RuntimeError: Array has been deleted
    assert fresh.turns[:2] == [('user', FIRST), ('model', ''.join(streamed))]
    first, expected = reference(fresh, kept)
    assert first == ''.join(streamed)
    assert second == expected


def test_chat_stream_still_open_is_closed_by_the_next_turn(fresh):
    pieces = fresh.chat(FIRST, stream=True)
    streamed = [next(pieces), next(pieces)]
    second = fresh.chat(SECOND)          # the first answer's iterator is still held here
    assert list(pieces) == []            # it was ended at the two pieces streamed
    assert fresh.turns[1] == ('model', ''.join(streamed))
    fresh.reset()
    pieces = fresh.chat(FIRST, stream=True)
    next(pieces), next(pieces)
    pieces.close()
    assert second == reference(fresh, fresh.last_answer_length)[1]


def test_chat_stream_never_started_leaves_no_turn(fresh):
    fresh.chat(FIRST)
    before = fresh.positions_used
    pieces = fresh.chat('A message whose answer is never read', stream=True)
    del pieces
    gc.collect()
    assert fresh.positions_used == before
    assert [role for role, _ in fresh.turns] == ['user', 'model']
    assert fresh.chat(SECOND) == reference(fresh, MAX_NEW_TOKENS)[1]


def test_reset_during_a_stream_is_not_undone_by_the_stream(fresh):
    pieces = fresh.chat(FIRST, stream=True)
    next(pieces)
    fresh.reset()
    del pieces
    gc.collect()
    assert fresh.state is None and fresh.turns == []
    assert fresh.chat(FIRST) == reference(fresh, MAX_NEW_TOKENS)[0]


def interrupt_at_step(monkeypatch, sampler, call, exception=None):
    """Makes the `call`-th compiled decode step end with Ctrl-C (or `exception`) just after it
    returned: the step has taken over the cache, and its result is still to be stored."""
    step = sampler.engine.step
    calls = []

    def interrupted(*args, **kwargs):
        out = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            if exception is not None:
                raise exception
            signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(sampler.engine, 'step', interrupted)


def test_ctrl_c_as_a_step_returns_keeps_the_conversation(fresh, monkeypatch):
    interrupt_at_step(monkeypatch, fresh.sampler, call=2)
    streamed = []
    with pytest.raises(KeyboardInterrupt):
        for piece in fresh.chat(FIRST, stream=True):
            streamed.append(piece)
    monkeypatch.undo()
    # Prefill and step 1 were handed out; step 2's token was sampled but never streamed.
    assert fresh.last_answer_length == 2
    assert fresh.turns[1] == ('model', ''.join(streamed))
    second = fresh.chat(SECOND)
    assert second == reference(fresh, 2)[1]


def test_ctrl_c_in_a_non_streaming_chat_keeps_the_conversation(fresh, monkeypatch):
    interrupt_at_step(monkeypatch, fresh.sampler, call=3)
    with pytest.raises(KeyboardInterrupt):
        fresh.chat(FIRST)
    monkeypatch.undo()
    assert fresh.last_answer_length == 3
    assert fresh.chat(SECOND) == reference(fresh, 3)[1]


def test_a_failed_step_asks_for_reset(fresh, monkeypatch):
    fresh.chat(FIRST)
    interrupt_at_step(monkeypatch, fresh.sampler, call=1, exception=RuntimeError('device lost'))
    with pytest.raises(RuntimeError, match='device lost'):
        fresh.chat(SECOND)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r'conversation was lost.*reset\(\)'):
        fresh.chat(SECOND)
    fresh.reset()
    assert fresh.chat(FIRST) == reference(fresh, MAX_NEW_TOKENS)[0]


def test_sampler_stream_left_midway_leaves_the_sampler_usable(fresh):
    sampler = fresh.sampler
    expected = sampler.sample(FIRST, max_new_tokens=MAX_NEW_TOKENS)
    pieces = sampler.sample(FIRST, max_new_tokens=MAX_NEW_TOKENS, stream=True)
    next(pieces)
    del pieces
    gc.collect()
    assert sampler.sample(FIRST, max_new_tokens=MAX_NEW_TOKENS) == expected
    assert ''.join(sampler.sample(FIRST, max_new_tokens=MAX_NEW_TOKENS, stream=True)) == expected


def test_a_state_continued_twice_is_a_clear_error(fresh):
    sampler = fresh.sampler
    ids = fresh.tokenizer.encode(FIRST, add_bos=True)
    out = sampler.sample_tokens([ids], 4)
    sampler.sample_tokens([[special_tokens.END_OF_TURN]], 4, state=out.state)
    with pytest.raises(ValueError, match='a state continues once'):
        sampler.sample_tokens([[special_tokens.END_OF_TURN]], 4, state=out.state)


# --- saves killed midway ----------------------------------------------------------------------

PAUSED_SAVE = '''
import sys
import numpy as np
from pathlib import Path
from gemma3n.checkpoints import native
real = native.save_file

def write_part_then_wait(tensors, filename, metadata):
    Path(filename).write_bytes(b'partial' * 1000)
    print('writing', flush=True)
    sys.stdin.readline()           # the test kills us here, or lets us finish
    real(tensors, filename, metadata=metadata)

native.save_file = write_part_then_wait
native.save_params({'w': np.full(4, float(sys.argv[2]), np.float32)}, sys.argv[1])
'''


def paused_save(path, value):
    """A process saving {'w': [value] * 4} to `path`, stopped in the middle of writing it."""
    process = subprocess.Popen([sys.executable, '-c', PAUSED_SAVE, str(path), str(value)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == 'writing\n'
    return process


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith('.'))


def test_next_save_removes_what_a_killed_save_left(tmp_path):
    path = tmp_path / 'ckpt.safetensors'
    save_params({'w': np.zeros(4, np.float32)}, path)
    killed = paused_save(path, 1.0)
    killed.kill()                                # kill -9 in the middle of the write
    killed.wait(timeout=TIMEOUT_S)
    assert load_params(path, progress=False)['w'].tolist() == [0.0] * 4     # the previous file
    [left] = hidden(tmp_path)                    # today: a hidden .tmp of the model's size, forever
    assert left.startswith('.ckpt.safetensors.')
    save_params({'w': np.full(4, 2.0, np.float32)}, path)
    assert hidden(tmp_path) == []
    assert load_params(path, progress=False)['w'].tolist() == [2.0] * 4


def test_a_save_leaves_other_live_saves_alone(tmp_path):
    # Saves in progress to the same file and to one whose name extends it, and a dead one.
    path = tmp_path / 'ckpt.safetensors'
    other = tmp_path / 'ckpt.safetensors.bak'
    dead = paused_save(path, 1.0)
    dead.kill()
    dead.wait(timeout=TIMEOUT_S)
    [stale] = hidden(tmp_path)
    live = [paused_save(path, 3.0), paused_save(other, 4.0)]
    in_progress = sorted(set(hidden(tmp_path)) - {stale})
    assert len(in_progress) == 2
    save_params({'w': np.full(4, 2.0, np.float32)}, path)
    assert hidden(tmp_path) == in_progress       # only the dead save's folder went
    for process in live:
        process.communicate('\n', timeout=TIMEOUT_S)
        assert process.returncode == 0
    assert hidden(tmp_path) == []
    assert load_params(path, progress=False)['w'].tolist() == [3.0] * 4     # the last rename won
    assert load_params(other, progress=False)['w'].tolist() == [4.0] * 4


# --- Ctrl-C in `gemma3n chat` ------------------------------------------------------------------

LONG_ANSWER = 120       # tokens: long enough to be mid-answer when Ctrl-C comes
INTERRUPTED = re.compile(r'answer interrupted after (\d+) tokens; the conversation keeps it')


def test_ctrl_c_in_the_command_keeps_the_conversation(fresh, monkeypatch, capsys):
    written = []

    def write_two_then_ctrl_c(piece):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(piece)

    monkeypatch.setattr(cli_chat, 'write', write_two_then_ctrl_c)
    cli_chat._chat_turn(fresh, FIRST, None, None, jax.random.key(0))
    monkeypatch.undo()
    # Today: "answer interrupted; conversation reset".
    kept = int(INTERRUPTED.search(capsys.readouterr().err).group(1))
    assert kept == fresh.last_answer_length == 3    # the third piece reached the command
    assert fresh.chat(SECOND) == reference(fresh, kept)[1]


def test_sigint_to_the_command_keeps_the_conversation(fresh):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    # `python -m gemma3n chat ...`, with Ctrl-C restored first (see default_ctrl_c).
    command = [sys.executable, '-c', CTRL_C_THEN_COMMAND, 'chat', '--cache-length',
               str(CACHE_LENGTH), '--max-new-tokens', str(LONG_ANSWER)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    process.stdin.write(FIRST + '\n')
    process.stdin.flush()
    first_text = process.stdout.read(1)          # the answer has begun
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(SECOND + '\n', timeout=TIMEOUT_S)
    assert process.returncode == 0, err
    assert 'Traceback' not in err
    kept = int(INTERRUPTED.search(err).group(1))
    assert 0 < kept < LONG_ANSWER
    fresh.reset()
    first = fresh.chat(FIRST, max_new_tokens=kept)
    second = fresh.chat(SECOND, max_new_tokens=LONG_ANSWER)
    shown = first_text + out
    assert shown.endswith(second + '\n')
    # What was printed of the first answer is what the conversation kept (a piece handed out
    # may have been cut from the screen by the interrupt).
    assert first.startswith(shown[:-len(second + '\n')])
