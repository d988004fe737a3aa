"""Training data: tokenising conversations as the chat sampler feeds them, packing, the batch
stream's order and resume position, the loss, model inputs by key, the checkpoint folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma3n.checkpoints import load_params, save_checkpoint_folder
from gemma3n.checkpoints.hf_mapping import config_from_hf
from gemma3n.text import special_tokens
from gemma3n.text.chat_format import format_continuation, format_user_turn
from gemma3n.text.tokenizer import Tokenizer, default_tokenizer_path
from gemma3n.training.data import Example, LossOn, tokenize_record
from gemma3n.training.keys import get_by_path, model_inputs
from gemma3n.training import loss
from gemma3n.training.loss import chunked_loss_sums, masked_loss_sum
from gemma3n.training.packing import Rows, TooLong
from gemma3n.training.param_split import FullFineTuning
from gemma3n.training.stream import BatchStream
from gemma3n.transformer import Gemma3nTransformer
from hf_oracle import random_params, small_configs


@pytest.fixture(scope='module')
def tokenizer():
    return Tokenizer(default_tokenizer_path())


def chat(*pairs, system=None):
    messages = [] if system is None else [{'role': 'system', 'content': system}]
    for role, text in pairs:
        messages.append({'role': role, 'content': text})
    return {'messages': messages}


def test_a_conversation_is_the_chat_samplers_token_stream_with_the_answers_counted(tokenizer):
    record = chat(('user', 'Hi there'), ('assistant', 'Hello!'), ('user', 'Bye'),
                  ('assistant', 'See you.'))
    example = tokenize_record(record, tokenizer, LossOn.MODEL_TURNS)
    eot = special_tokens.END_OF_TURN
    pieces = [(tokenizer.encode(format_user_turn('Hi there'), add_bos=True), False),
              (tokenizer.encode('Hello!') + [eot], True),
              (tokenizer.encode(format_continuation('Bye')), False),
              (tokenizer.encode('See you.') + [eot], True)]
    assert example.tokens.tolist() == sum((ids for ids, _ in pieces), [])
    assert example.loss_mask.tolist() == sum(([c] * len(ids) for ids, c in pieces), [])
    everything = tokenize_record(record, tokenizer, LossOn.ALL)
    assert everything.loss_mask.tolist() == [False] + [True] * (len(example.tokens) - 1)


def test_a_system_message_opens_the_first_user_turn(tokenizer):
    with_system = tokenize_record(chat(('user', 'Hi'), ('assistant', 'Yo'), system='Be brief.'),
                                  tokenizer, LossOn.MODEL_TURNS)
    folded = tokenize_record(chat(('user', 'Be brief.\n\nHi'), ('assistant', 'Yo')),
                             tokenizer, LossOn.MODEL_TURNS)
    assert with_system.tokens.tolist() == folded.tokens.tolist()


def test_a_text_counts_every_token(tokenizer):
    example = tokenize_record({'text': 'Once upon a time'}, tokenizer, LossOn.MODEL_TURNS)
    assert example.tokens.tolist() == ([special_tokens.BOS] + tokenizer.encode('Once upon a time')
                                       + [special_tokens.EOS])
    assert example.loss_mask.tolist() == [False] + [True] * (len(example.tokens) - 1)


def examples_of_lengths(*lengths):
    return [Example(tokens=np.arange(10 * i, 10 * i + n, dtype=np.int32) + 3,
                    loss_mask=np.ones(n, bool)) for i, n in enumerate(lengths)]


def test_packing_keeps_each_example_to_itself():
    rows = Rows.from_examples(examples_of_lengths(4, 3, 6), seq_len=6, pack=True,
                              too_long=TooLong.TRUNCATE)
    # Inputs are tokens[:-1]: 3 + 2 fit one row, 5 the next.
    assert rows.num_rows == 2
    batch = rows.batch(np.array([0, 1]))
    assert batch['input'][0].tolist() == [3, 4, 5, 13, 14, 0]
    assert batch['target'][0].tolist() == [4, 5, 6, 14, 15, 0]
    assert batch['positions'][0].tolist() == [0, 1, 2, 0, 1, 0]
    assert batch['loss_mask'][0].tolist() == [True] * 5 + [False]
    mask = batch['attention_mask'][0]
    assert mask[4].tolist() == [False, False, False, True, True, False]   # its own segment, causal
    assert mask[2].tolist() == [True, True, True, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]                       # padding: itself only


def test_too_long_examples_are_truncated_or_skipped_and_counted():
    examples = examples_of_lengths(9, 3)
    truncated = Rows.from_examples(examples, seq_len=4, pack=False, too_long=TooLong.TRUNCATE)
    assert (truncated.truncated, truncated.skipped, truncated.num_rows) == (1, 0, 2)
    assert truncated.fields['input'][0].tolist() == [3, 4, 5, 6]
    skipped = Rows.from_examples(examples, seq_len=4, pack=False, too_long=TooLong.SKIP)
    assert (skipped.truncated, skipped.skipped, skipped.num_rows) == (0, 1, 1)


def test_the_stream_is_seeded_and_resumes_at_its_position():
    examples = examples_of_lengths(*range(2, 12))
    stream = BatchStream(examples, seq_len=12, batch_size=3, seed=7)
    batches = [stream.next_batch() for _ in range(6)]       # several passes over the data
    again = BatchStream(examples, seq_len=12, batch_size=3, seed=7, position=3 * 4)
    resumed = again.next_batch()
    for name in batches[4]:
        np.testing.assert_array_equal(resumed[name], batches[4][name])
    other = BatchStream(examples, seq_len=12, batch_size=3, seed=8).next_batch()
    assert not np.array_equal(other['input'], batches[0]['input'])


def test_masked_loss_is_cross_entropy_of_the_counted_tokens():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[1, 2, 3], [4, 0, 1]])
    mask = jnp.array([[True, False, True], [False, False, True]])
    total, count = masked_loss_sum(logits, targets, mask)
    log_probs = jax.nn.log_softmax(logits)
    expected = -(log_probs[0, 0, 1] + log_probs[0, 2, 3] + log_probs[1, 2, 1])
    assert int(count) == 3
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


def _softcapped_head(params, h):                 # h [R, C, D] -> logits [R, C, V]
    return jnp.tanh(jnp.einsum('rcd,vd->rcv', h, params['table']) / 3.0) * 3.0


@pytest.mark.parametrize('positions_per_chunk', [1, 3, 9, 20])
def test_the_chunked_loss_and_its_gradients_are_the_unchunked_ones(monkeypatch, positions_per_chunk):
    # 3 rows of 9 positions, vocabulary 7: chunks of 1, 3 (no padding), 9 (one chunk) and of 20
    # positions; float32, so only the order of the sums differs (a few ulps of the totals).
    rows, length, vocab, width = 3, 9, 7, 5
    monkeypatch.setattr(loss, 'LOSS_CHUNK_BYTES', rows * vocab * 4 * positions_per_chunk)
    keys = jax.random.split(jax.random.key(1), 4)
    table = jax.random.normal(keys[0], (vocab, width))
    hidden = jax.random.normal(keys[1], (rows, length, width))
    targets = jax.random.randint(keys[2], (rows, length), 0, vocab)
    mask = jax.random.uniform(keys[3], (rows, length)) > 0.3

    def unchunked(table, hidden):
        return masked_loss_sum(_softcapped_head({'table': table}, hidden), targets, mask)

    def chunked(table, hidden):
        return chunked_loss_sums(_softcapped_head, {'table': table}, hidden, targets, mask)

    (total, count), (ref_total, ref_count) = chunked(table, hidden), unchunked(table, hidden)
    assert int(count) == int(ref_count) == int(mask.sum())
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: chunked(*a)[0], (0, 1)))(table, hidden)
    ref_grads = jax.grad(lambda *a: unchunked(*a)[0], (0, 1))(table, hidden)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(ref))))


def test_a_frozen_unembedding_gets_no_gradient_product():
    # Differentiated in the hidden states only (LoRA: the table is frozen), a chunk runs two
    # products (the logits and the hidden states' gradient); with the table too, three.
    table, hidden = jnp.ones((7, 5)), jnp.ones((2, 4, 5))
    targets, mask = jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 4), bool)

    def products(argnums):
        grad = jax.grad(lambda t, h: chunked_loss_sums(_softcapped_head, {'table': t}, h, targets,
                                                       mask)[0], argnums)
        return str(jax.make_jaxpr(grad)(table, hidden)).count('dot_general')

    assert (products(1), products((0, 1))) == (2, 3)


def test_model_inputs_follow_the_models_keys():
    cfg = small_configs()[0]
    context = {'batch': {'input': 'T', 'pos': ['P0', 'P1']}}
    model = Gemma3nTransformer(config=cfg, tokens='batch.input', positions='batch.pos.1')
    assert model_inputs(model, context) == {'tokens': 'T', 'positions': 'P1'}
    with pytest.raises(KeyError, match="no 'batch.mask'"):
        get_by_path(context, 'batch.mask')
    with pytest.raises(ValueError, match="tokens='batch.input'"):
        model_inputs(Gemma3nTransformer(config=cfg), context)


def test_freeze_patterns_split_and_combine_the_tree():
    params = random_params(small_configs()[0], seed=0)
    split = FullFineTuning(freeze=('embedder/*',))
    trainable, frozen = split.split(params)
    assert set(frozen) == {'embedder'} and 'embedder' not in trainable
    assert jax.tree.all(jax.tree.map(np.array_equal, split.combine(trainable, frozen), params))
    with pytest.raises(ValueError, match='leave no weight'):
        FullFineTuning(freeze=('*',)).split(params)


def test_a_checkpoint_folder_loads_as_saved(tmp_path, tokenizer):
    cfg = small_configs()[1]
    params = random_params(cfg, seed=1)
    save_checkpoint_folder(params, cfg, tmp_path, tokenizer_file=tokenizer.path)
    assert config_from_hf(json.loads((tmp_path / 'config.json').read_text())) == cfg
    loaded = load_params(tmp_path, model=cfg, progress=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    assert (tmp_path / 'tokenizer.model').read_bytes() == tokenizer.path.read_bytes()
