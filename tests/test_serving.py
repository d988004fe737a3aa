"""The OpenAI-compatible server, driven by the official `openai` client over a loopback socket.

The demo model (float32, greedy) gives each prompt one answer: whatever shares the batch, the
server must give exactly the answer `Sampler` gives the prompt alone.
"""

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from gemma3n.engine.engine import Engine
from gemma3n.serving.app import Service, make_server
from gemma3n.serving.scheduler import Job, Scheduler
from gemma3n.text.chat_format import format_user_turn
from gemma3n.text.sampler import Sampler
from cli_runner import TIMEOUT_S, cli_env, demo_model

CACHE_LENGTH = 256
SLOTS = 4
MAX_WAITING = 64
DEFAULT_MAX_TOKENS = 16
START_TIMEOUT_S = 60
# Messages of different lengths; with 100 new tokens the longest runs past the demo's sliding
# window of 64 positions.
MESSAGES = ['Hi', 'Tell me about the sea.', 'Why is the sky blue? Answer in detail, please.',
            'One', 'What do cats eat, and when, and how much of it?', 'Count to ten.']


@pytest.fixture(scope='module')
def served():
    model, params, tokenizer = demo_model()
    engine = Engine(model, params)
    service = Service(engine, tokenizer, model_name='demo', slots=SLOTS,
                      cache_length=CACHE_LENGTH, max_tokens=DEFAULT_MAX_TOKENS,
                      max_waiting=MAX_WAITING)
    server = make_server(service, host='127.0.0.1', port=0, shutdown_s=5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), 'the server did not start'
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f'http://127.0.0.1:{port}'
    client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0, timeout=120)
    sampler = Sampler(model=model, params=params, tokenizer=tokenizer, cache_length=CACHE_LENGTH)
    yield service, url, client, sampler
    server.should_exit = True
    thread.join(30)


def alone(sampler, message, max_tokens):
    """The answer the Sampler gives the message by itself (the chat prompt, greedy)."""
    return sampler.sample(format_user_turn(message), max_new_tokens=max_tokens)


def chat(client, message, max_tokens, **kwargs):
    return client.chat.completions.create(
        model='demo', messages=[{'role': 'user', 'content': message}], max_tokens=max_tokens,
        temperature=0, **kwargs)


def test_chat_answer_and_usage(served):
    service, _, client, sampler = served
    reply = chat(client, MESSAGES[1], 12)
    assert reply.object == 'chat.completion' and reply.model == 'demo'
    choice = reply.choices[0]
    assert choice.message.role == 'assistant'
    assert choice.message.content == alone(sampler, MESSAGES[1], 12)
    prompt = service.tokenizer.encode(format_user_turn(MESSAGES[1]), add_bos=True)
    assert reply.usage.prompt_tokens == len(prompt)
    assert choice.finish_reason in ('stop', 'length')
    if choice.finish_reason == 'length':
        assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens


def test_streamed_chat_equals_the_whole_answer(served):
    _, _, client, sampler = served
    stream = chat(client, MESSAGES[2], 20, stream=True, stream_options={'include_usage': True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == 'assistant'
    text = ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices)
    assert text == alone(sampler, MESSAGES[2], 20)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ('stop', 'length') and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_completions_endpoint(served):
    _, _, client, sampler = served
    reply = client.completions.create(model='demo', prompt='The sea is', max_tokens=10,
                                      temperature=0)
    assert reply.choices[0].text == sampler.sample('The sea is', max_new_tokens=10)


def test_stop_string_ends_the_answer_before_it(served):
    _, _, client, sampler = served
    full = alone(sampler, MESSAGES[4], 30)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop and stop in full
    for stream in (False, True):
        reply = chat(client, MESSAGES[4], 30, stop=[stop], stream=stream)
        if stream:
            text = ''.join(c.choices[0].delta.content or '' for c in reply if c.choices)
        else:
            assert reply.choices[0].finish_reason == 'stop'
            text = reply.choices[0].message.content
        assert text == full[:full.index(stop)]


def test_concurrent_requests_give_their_answers_alone(served):
    """Requests of different lengths at once, some joining while others are mid-answer, some
    past the sliding window: each gets exactly its own answer."""
    service, _, client, sampler = served
    lengths = [100, 40, 7, 60, 25, 90]
    steps_before = service.scheduler.steps
    first = chat(client, MESSAGES[0], lengths[0], stream=True)
    next(iter(first))                               # the first request is decoding
    with ThreadPoolExecutor(len(MESSAGES)) as pool:
        later = [pool.submit(chat, client, m, n) for m, n in zip(MESSAGES[1:], lengths[1:])]
        got = [''.join(c.choices[0].delta.content or '' for c in first if c.choices)]
        got += [f.result().choices[0].message.content for f in later]
    # Fewer steps than the requests one after another: they shared steps.
    assert service.scheduler.steps - steps_before < sum(lengths)
    for message, n, text in zip(MESSAGES, lengths, got):
        assert text == alone(sampler, message, n), message


def test_leaving_and_joining_keep_the_slots_packed_and_the_answers_exact(served):
    """A scheduler driven turn by turn: requests leave from the bottom, the middle and the top
    of the batch, holes are filled by moving the last request down or by a request joining, and
    the longest request is moved twice, the second time past the sliding window. Each gets
    exactly its tokens alone, and every step computes the power of two of rows covering the
    requests running (so at most log2(slots) + 1 step programs)."""
    service, _, _, sampler = served
    loop = Scheduler(sampler.engine, slots=SLOTS, cache_length=CACHE_LENGTH, max_waiting=8)
    # turn -> (message, max_tokens) submitted before it. Slots: A0 B1 C2 D3; B leaves (turn 7),
    # D moves 3 -> 1; E joins slot 3 (turn 10); C leaves (turn 12), F joins its slot 2 (turn 13);
    # E and F leave from the top (turn 16); A leaves (turn 54): D moves 1 -> 0, past the window.
    plan = {0: [(MESSAGES[0], 56), (MESSAGES[1], 9), (MESSAGES[2], 14), (MESSAGES[4], 80)],
            10: [(MESSAGES[5], 8)], 13: [(MESSAGES[3], 5)]}
    window = sampler.model.config.sliding_window_size
    jobs, slots_held = [], {}                      # slots_held: job index -> slots it was in
    for turn in range(100):
        for message, max_tokens in plan.get(turn, []):
            row = np.array(service.tokenizer.encode(format_user_turn(message), add_bos=True),
                           np.int32)
            jobs.append(Job(row=row, max_tokens=max_tokens, setting=(0.0, 0, 1.0, 0),
                            stop_tokens=(), deliver=[].append))
            loop.submit(jobs[-1])
        # No request is cancelled: all waiting ones that fit are admitted before the step.
        stepping = min(SLOTS, loop.running + len(loop.waiting))
        before = loop.steps_by_rows.copy()
        loop.turn()
        assert loop.steps_by_rows - before == {min(SLOTS, 1 << (stepping - 1).bit_length()): 1}
        for slot, job in enumerate(loop.jobs):
            if job is not None:
                slots_held.setdefault(jobs.index(job), set()).add(slot)
        if not loop.running and not loop.waiting:
            break
    assert set(loop.steps_by_rows) == {1, 2, 4}
    assert slots_held[3] == {3, 1, 0}              # the longest moved down twice
    assert slots_held[4] == {3} and slots_held[5] == {2}    # F joined the hole C left
    assert len(jobs[3].row) + plan[0][0][1] > window  # when it moved the second time
    for job in jobs:
        events = job.deliver.__self__
        assert events[-1].finish == 'length'
        expected = sampler.sample_tokens([job.row], job.max_tokens).tokens[0].tolist()
        assert [e.token for e in events[:-1]] == expected


def test_models_and_health(served):
    _, url, client, _ = served
    assert [m.id for m in client.models.list()] == ['demo']
    health = httpx.get(f'{url}/health').json()
    assert health['status'] == 'ok'


@pytest.mark.parametrize('body, status, fragment', [
    ('{"messages": [', 400, 'not valid JSON'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'bogus': 1}, 400,
     'Unrecognized request argument supplied: bogus'),
    ({'messages': 'Hi'}, 400, 'messages must be an array'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': '5'}, 400,
     'max_tokens must be an integer'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 0}, 400,
     'max_tokens must be in [1,'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 10 ** 9}, 400,
     'maximum context length is 256'),
    ({'messages': [{'role': 'user', 'content': 'word ' * 400}]}, 400,
     'maximum context length is 256'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'temperature': True}, 400,
     'temperature must be a number'),
    ({'messages': [{'role': 'user', 'content': 'Hi'}], 'n': 2}, 400, 'n must be'),
    ({'messages': [{'role': 'robot', 'content': 'Hi'}]}, 400, 'role must be one of'),
    ({'messages': [{'role': 'user', 'content': [
        {'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,'
                                            + base64.b64encode(b'x').decode()}}]}]},
     400, 'does not have vision encoder'),
])
def test_bad_requests_get_openai_errors(served, body, status, fragment):
    _, url, client, _ = served
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f'{url}/v1/chat/completions', content=content,
                          headers={'content-type': 'application/json'})
    assert response.status_code == status
    error = response.json()['error']
    assert fragment in error['message'] and error['type'] == 'invalid_request_error'
    assert chat(client, 'Hi', 2).choices[0].message.content is not None     # still serving


def test_openai_client_raises_on_errors(served):
    _, url, client, _ = served
    with pytest.raises(openai.BadRequestError, match='context length'):
        chat(client, 'Hi', 10 ** 9)
    assert httpx.get(f'{url}/v1/nothing').status_code == 404


def test_disconnected_streams_free_their_slots(served):
    service, url, client, _ = served
    for _ in range(SLOTS + 2):
        with httpx.stream('POST', f'{url}/v1/chat/completions', json={
                'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 200,
                'stream': True}) as response:
            next(response.iter_lines())             # one chunk, then the client is gone
    deadline = time.monotonic() + 30
    while service.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.scheduler.running == 0
    assert chat(client, 'Hi', 3).choices[0].finish_reason in ('stop', 'length')


def test_a_full_queue_answers_429(served):
    service, url, _, _ = served
    body = {'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 30}
    total = SLOTS + MAX_WAITING + 8
    with ThreadPoolExecutor(total) as pool:
        codes = list(pool.map(lambda _: httpx.post(f'{url}/v1/chat/completions', json=body,
                                                   timeout=300).status_code, range(total)))
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes


def test_64_concurrent_streams_each_get_their_own_answer(served):
    """64 streaming clients at once (4 running, the rest queued): every answer is its own
    prompt's, nothing lost or mixed up."""
    _, _, client, sampler = served
    prompts = [f'{MESSAGES[k % len(MESSAGES)]} ({k})' for k in range(8)] * 8

    # Queued requests wait for all before them: on a busy 2-core machine that is minutes.
    patient = client.with_options(timeout=600)

    def streamed(message):
        stream = chat(patient, message, 4, stream=True)
        return ''.join(c.choices[0].delta.content or '' for c in stream if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(streamed, prompts))
    expected = {m: alone(sampler, m, 4) for m in set(prompts)}
    assert got == [expected[m] for m in prompts]


def test_sigterm_ends_running_answers_and_exits_0(tmp_path_factory, served):
    """`gemma3n serve` as a process, on a mesh of 2 simulated devices (`--mesh data=2`: the
    weights, the cache and the slots split): a greedy answer is the Sampler's; on SIGTERM it
    refuses new connections, ends the running answer (finished, or cut at the shutdown
    deadline) and exits with 0."""
    env = cli_env(tmp_path_factory)
    env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, '-m', 'gemma3n', 'serve', '--port', str(port), '--cache-length', '128',
         '--max-batch', '2', '--shutdown-timeout', '2', '--mesh', 'data=2'], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f'http://127.0.0.1:{port}'
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            try:
                httpx.get(f'{url}/health')
                break
            except httpx.TransportError:
                time.sleep(0.2)
        mesh_client = openai.OpenAI(base_url=f'{url}/v1', api_key='unused', max_retries=0,
                                    timeout=TIMEOUT_S)
        assert chat(mesh_client, 'Hi', 8).choices[0].message.content == alone(served[3], 'Hi', 8)
        body = {'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 100,
                'temperature': 0, 'stream': True}
        with httpx.stream('POST', f'{url}/v1/chat/completions', json=body,
                          timeout=TIMEOUT_S) as response:
            lines = response.iter_lines()
            assert next(lines).startswith('data: ')
            process.send_signal(signal.SIGTERM)
            try:
                for _ in lines:
                    pass
            except httpx.RemoteProtocolError:
                pass                                # cut at the deadline
        assert process.wait(TIMEOUT_S) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f'{url}/health')
    finally:
        process.kill()
        process.communicate()
