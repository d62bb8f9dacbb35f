"""Quality metrics against hand-computed cases."""

import math

import pytest
import torch

from kvrelay.profiler import scores as M


def test_token_f1_hand_cases():
    # normalized: prediction [cat, sat], reference [cat, sat, on, mat]: P = 1, R = 1/2
    assert M.token_f1("The cat sat.", "a cat sat on mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert M.token_f1("Hello, World!", "hello world") == 1.0
    assert M.token_f1("x y", "z") == 0.0
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("x", "") == 0.0
    # repeated words count with multiplicity: pred [a1 a1 b], ref [a1 b b] -> common 2, P = R = 2/3
    assert M.token_f1("foo foo bar", "foo bar bar") == pytest.approx(2 / 3)


def test_normalize_answer():
    assert M.normalize_answer("  The  Quick, brown fox!  ") == "quick brown fox"


def test_lcs_and_rouge_l():
    assert M.lcs_length([1, 2, 3, 4], [2, 4, 3]) == 2
    assert M.lcs_length([], [1]) == 0
    # LCS "the cat on the mat" = 5 of 6 tokens each side
    assert M.rouge_l("the cat sat on the mat", "the cat was on the mat") == pytest.approx(5 / 6)
    assert M.rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert M.rouge_l("a b", "a x b y") == pytest.approx(2 / 3)
    assert M.rouge_l("", "") == 1.0
    assert M.rouge_l("a", "") == 0.0


def test_levenshtein_and_edit_similarity():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("abc", "abc") == 0
    assert M.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert M.edit_similarity("  x = 1\n", "x = 1") == 1.0
    assert M.edit_similarity("", "") == 1.0
    assert M.edit_similarity("abc", "") == 0.0


def test_top1_agreement_and_kl():
    ref = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])]
    test = [torch.tensor([0.0, 2.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])]
    assert M.top1_agreement(ref, test) == 0.5
    assert M.top1_agreement(ref, test, n=1) == 1.0
    assert M.top1_agreement([], test) == 0.0
    assert M.mean_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # p = softmax([0, 0]) = [1/2, 1/2]; q = softmax([0, ln 3]) = [1/4, 3/4]; KL(p||q) = 1/2 ln(4/3)
    p, q = [torch.tensor([0.0, 0.0])], [torch.tensor([0.0, math.log(3.0)])]
    assert M.mean_kl(p, q) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # mean over positions: (KL + 0) / 2
    assert M.mean_kl(p + p, q + p) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)


def test_agreement():
    ref_logits = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]
    same = M.agreement("a b c", "a b c", ref_logits, ref_logits)
    assert same["token_f1"] == same["rouge_l"] == same["edit_similarity"] == same["top1"] == 1.0
    assert same["kl"] == pytest.approx(0.0, abs=1e-12)
    assert "top1" not in M.agreement("a", "a")


def test_prefix_match_and_profile_quality():
    ref = [5, 6, 7, 8]
    assert M.first_divergence(ref, [5, 6, 9, 8]) == 2
    assert M.first_divergence(ref, [5, 6]) == 2
    assert M.prefix_match(ref, ref) == 1.0
    assert M.prefix_match(ref, [5, 6, 9, 8]) == 0.5  # later agreement after a divergence does not count
    assert M.prefix_match(ref, [5, 6, 9, 8], n=2) == 1.0
    assert M.prefix_match(ref, [5, 6]) == 0.5  # stopping early (EOS) is a divergence
    assert M.prefix_match(ref, [4]) == 0.0
    assert M.prefix_match([], [1]) == 1.0
    assert M.profile_quality(ref, [5, 6, 7, 1]) == 75.0
    assert M.profile_quality(ref, ref) == 100.0
    # identical prefixes up to and including the first divergence; at most n
    assert M.comparable_positions(ref, [5, 6, 9, 8]) == 3
    assert M.comparable_positions(ref, ref) == 4
    assert M.comparable_positions(ref, ref, n=2) == 2
    assert M.comparable_positions(ref, [5]) == 1


def test_unknown_metric_is_a_clear_error():
    from kvrelay.errors import KvRelayError

    with pytest.raises(KvRelayError, match="unknown metric"):
        M.score("bleu", "a", "a")
    assert M.score("rouge_l", "a b", "a b") == 1.0
