"""Sampling, one row at a time: greedy, temperature, top-p, seeds, and stop strings (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from serving.sampling import SamplingParams, cut_at_stop, new_generator, sample, streamable

CPU = torch.device("cpu")
PROBS = [0.5, 0.3, 0.15, 0.05]


def _logits(probs=PROBS) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def _draws(params: SamplingParams, n: int = 2000, probs=PROBS) -> list[float]:
    """Frequencies of each token over `n` draws of one seeded row."""
    generator = new_generator(params, CPU)
    counts = [0] * len(probs)
    for _ in range(n):
        counts[sample(_logits(probs), [params], [generator])[0]] += 1
    return [c / n for c in counts]


def test_greedy_rows_take_the_argmax_and_draw_nothing():
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert new_generator(greedy, CPU) is None
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 0]
    # A sampling row without its generator is answered greedily too (never with a shared stream), and
    # a greedy row given one still takes the argmax (no division by a zero temperature).
    assert sample(logits, [SamplingParams(max_tokens=1), greedy], [None, None]) == [1, 0]
    assert sample(logits[:1], [greedy], [torch.Generator().manual_seed(0)]) == [1]


@pytest.mark.parametrize("temperature", [1e-50, 1e-40, 1e-6])
def test_a_temperature_below_vllms_epsilon_is_greedy(temperature):
    # logits / 1e-40 overflows to inf: multinomial refused the nan softmax and failed the whole batch.
    tiny = SamplingParams(max_tokens=1, temperature=temperature, seed=1)
    assert new_generator(tiny, CPU) is None
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0]])
    assert sample(logits, [tiny, tiny], [None, torch.Generator().manual_seed(0)]) == [1, 0]
    assert new_generator(SamplingParams(max_tokens=1, temperature=1e-5), CPU) is not None  # the epsilon samples


@pytest.mark.parametrize("top_p", [1.0, 0.5])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_a_row_whose_softmax_is_no_distribution_takes_its_argmax_and_the_other_rows_still_sample(top_p, bad):
    broken = torch.tensor([0.0, 1.0, bad, 0.0])  # a model overflowing in half precision; argmax is 2 (torch's for nan)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=5)
    logits = torch.stack([broken, torch.zeros(4)])
    generator = new_generator(params, CPU)
    draws = [sample(logits, [params, params], [generator, generator]) for _ in range(40)]
    assert {row[0] for row in draws} == {2}
    assert len({row[1] for row in draws}) > 1


def test_temperature_one_draws_from_the_softmax_and_higher_temperatures_flatten_it():
    plain = _draws(SamplingParams(max_tokens=1, temperature=1.0, seed=7))
    assert plain == pytest.approx(PROBS, abs=0.035)  # 2,000 draws: about 3 standard errors
    flat = _draws(SamplingParams(max_tokens=1, temperature=2.0, seed=7))
    expected = [math.sqrt(p) / sum(math.sqrt(q) for q in PROBS) for p in PROBS]  # p^(1/T), renormalised
    assert flat == pytest.approx(expected, abs=0.035)


def test_top_p_keeps_the_smallest_prefix_that_reaches_it_renormalised():
    # 0.5 + 0.3 reaches 0.7: the two most likely tokens stay, drawn 5:3.
    kept = _draws(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=3))
    assert kept[2] == kept[3] == 0.0
    assert kept[0] == pytest.approx(0.625, abs=0.035) and kept[1] == pytest.approx(0.375, abs=0.035)
    # However small top_p is, the most likely token is kept.
    assert _draws(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.01, seed=3), n=200) == [1.0, 0.0, 0.0, 0.0]
    # 0.5 alone does not reach 0.55: the second token stays too.
    assert _draws(SamplingParams(max_tokens=1, temperature=1.0, top_p=0.55, seed=3), n=400)[1] > 0.2


def test_a_seed_reproduces_a_row_whatever_else_is_in_the_batch():
    seeded = SamplingParams(max_tokens=1, temperature=1.0, seed=42)
    flat = torch.zeros(1, 50)  # 50 equally likely tokens: a different stream would show at once
    alone = [sample(flat, [seeded], [g])[0] for g in [new_generator(seeded, CPU)] for _ in range(20)]

    generator = new_generator(seeded, CPU)
    others = [SamplingParams(max_tokens=1, temperature=1.0, seed=1), SamplingParams(max_tokens=1, temperature=0)]
    in_batch = []
    for _ in range(20):
        row = sample(torch.zeros(3, 50), [others[0], seeded, others[1]],
                     [new_generator(others[0], CPU), generator, None])  # fmt: skip
        in_batch.append(row[1])
    assert in_batch == alone and len(set(alone)) > 5
    # After a greedy row too, and through top-p: the row's own generator, not the global one.
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.5, seed=42)
    runs = []
    for _ in range(2):
        generator = new_generator(nucleus, CPU)
        runs.append([sample(torch.zeros(2, 50), [others[1], nucleus], [None, generator])[1] for _ in range(20)])
        torch.rand(3)  # the global stream moves between the runs
    assert runs[0] == runs[1] and len(set(runs[0])) > 5 and max(runs[0]) < 50


def test_seeds_are_taken_modulo_two_to_the_64_and_no_seed_means_a_fresh_stream():
    def first_draws(seed):
        generator = new_generator(SamplingParams(max_tokens=1, seed=seed), CPU)
        return torch.rand(4, generator=generator).tolist()

    assert first_draws(-1) == first_draws(2**64 - 1)
    assert first_draws(2**64 + 5) == first_draws(5)
    assert first_draws(5) != first_draws(6)
    assert first_draws(None) != first_draws(None)  # os.urandom seeds: equal only with chance 2^-64


def test_cut_at_stop_cuts_at_the_earliest_stop_string():
    assert cut_at_stop("answer STOP1 more STOP2", ["STOP2", "STOP1"]) == ("answer ", True)
    assert cut_at_stop("one STOP two STOP", ["STOP"]) == ("one ", True)
    assert cut_at_stop("STOP at once", ["STOP"]) == ("", True)
    assert cut_at_stop("no stop here", ["STOP"]) == ("no stop here", False)
    assert cut_at_stop("anything", []) == ("anything", False)


def test_streamable_holds_back_incomplete_characters_and_possible_stop_prefixes():
    assert streamable("hello wor", ["world"]) == 6
    assert streamable("caf\ufffd", []) == 3  # the rest of a UTF-8 sequence is still to come
    assert streamable("ab\ufffd\ufffd", ["b"]) == 2  # "b" is a whole stop, not a prefix of one
    assert streamable("hello w\ufffd", ["world"]) == 6
    assert streamable("hello", []) == 5
