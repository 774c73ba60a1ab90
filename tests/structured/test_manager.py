"""StructuredOutputManager as the engine's SamplingConstraint: masks only constrained rows,
gives each sequence its own matcher, and ends a sequence when its grammar is done."""

from __future__ import annotations

import pytest
import torch

from ember.engine.request import Request, Sequence
from ember.engine.sampling_params import SamplingParams
from ember.model.tokenizer import load_tokenizer
from ember.structured.manager import StructuredOutputManager

VOCAB, EOS = 1024, 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ember.model.demo import build_random_model

    return build_random_model(tmp_path_factory.mktemp("manager"), "LlamaForCausalLM")


def _seqs(manager: StructuredOutputManager, params: SamplingParams, n: int = 1) -> list[Sequence]:
    request = Request(f"r{id(params)}", [5, 6, 7], params, 0.0, eos_token_ids=(EOS,))
    manager.admit(request)
    request.sequences = [Sequence(i, request, i, [5, 6, 7]) for i in range(n)]
    return request.sequences


def test_unconstrained_rows_are_left_alone(model_dir):
    manager = StructuredOutputManager(model_dir, VOCAB, [EOS])
    seqs = _seqs(manager, SamplingParams()) + _seqs(manager, SamplingParams(temperature=0))
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    manager.mask_logits_(seqs, logits)
    assert torch.equal(logits, before)
    assert manager.accept_tokens(seqs, [1, 2]) == [False, False]
    assert all(seq.constraint_state is None for seq in seqs)
    assert manager.num_cached_grammars == 0


def test_masks_constrained_rows_and_ends_on_eos_once_complete(model_dir):
    manager = StructuredOutputManager(model_dir, VOCAB, [EOS])
    tokenizer = load_tokenizer(model_dir)
    free = _seqs(manager, SamplingParams())
    pair = _seqs(manager, SamplingParams(n=2, structured_output={"regex": "ab"}), n=2)
    seqs = [free[0], *pair]
    logits = torch.zeros(3, VOCAB)
    manager.mask_logits_(seqs, logits)
    assert torch.equal(logits[0], torch.zeros(VOCAB))
    allowed = set(torch.nonzero(logits[1] == 0).flatten().tolist())
    assert allowed == {t for t in range(len(tokenizer))
                       if tokenizer.decode([t]) in ("a", "ab")}
    assert torch.equal(logits[1], logits[2])
    assert pair[0].constraint_state is not pair[1].constraint_state  # one matcher each

    token_a, token_b = tokenizer.convert_tokens_to_ids(["a", "b"])
    assert manager.accept_tokens(seqs, [9, token_a, token_a]) == [False, False, False]
    assert manager.accept_tokens(seqs, [9, token_b, token_b]) == [False, False, False]
    logits = torch.zeros(3, VOCAB)
    manager.mask_logits_(seqs, logits)
    assert torch.nonzero(logits[1] == 0).flatten().tolist() == [EOS]  # complete: only EOS
    assert manager.accept_tokens(seqs, [9, EOS, EOS]) == [False, True, True]


def test_with_no_stop_token_the_grammar_ends_itself(model_dir):
    manager = StructuredOutputManager(model_dir, VOCAB, [])
    tokenizer = load_tokenizer(model_dir)
    (seq,) = _seqs(manager, SamplingParams(ignore_eos=True, structured_output={"regex": "a"}))
    manager.mask_logits_([seq], torch.zeros(1, VOCAB))
    assert manager.accept_tokens([seq], tokenizer.convert_tokens_to_ids(["a"])) == [True]
