"""Answer metrics: SQuAD normalisation, the paper's containment accuracy, EM and token F1 over several golds."""

import pytest

from blockrag.eval.metrics import accuracy, exact_match, f1, normalize_answer, score


@pytest.mark.parametrize("text, expected", [
    ("The Eiffel Tower", "eiffel tower"),                      # case and an article
    ("  a   cat\tand\nAN owl ", "cat and owl"),                 # whitespace, 'a' and 'an'
    ("Röntgen, W. C.!", "röntgen w c"),                         # punctuation; non-ASCII letters kept
    ("theatre", "theatre"),                                     # articles only as whole words
    ("The", ""),
])
def test_normalisation_lowers_and_drops_articles_punctuation_and_extra_whitespace(text, expected):
    assert normalize_answer(text) == expected


def test_accuracy_is_normalised_containment_of_any_gold():
    assert accuracy("I think it was the Eiffel-tower, in Paris.", ["Eiffel Tower"]) == 0.0  # hyphen removed joins
    assert accuracy("It was the Eiffel tower, in Paris.", ["The Eiffel Tower"]) == 1.0
    assert accuracy("The answer is Paris.", ["London", "paris"]) == 1.0   # second gold answer matches
    assert accuracy("The answer is Lyon.", ["London", "Paris"]) == 0.0
    assert accuracy("anything", ["the"]) == 0.0   # a gold that normalises to nothing never matches


def test_exact_match_needs_the_whole_normalised_output():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Sunset Blvd", ["Sunset Boulevard", "Sunset Blvd"]) == 1.0


def test_f1_scores_partial_token_overlap_and_takes_the_best_gold():
    # prediction tokens {wilhelm, rontgen}; gold {wilhelm, conrad, rontgen}: P = 1, R = 2/3
    assert f1("Wilhelm Rontgen", ["Wilhelm Conrad Rontgen"]) == pytest.approx(0.8)
    # overlap 1 of 3 predicted tokens and 1 of 1 gold: P = 1/3, R = 1 -> 0.5
    assert f1("in May 2018", ["May"]) == pytest.approx(0.5)
    assert f1("May 18 2018", ["May 2018", "May 18, 2018"]) == pytest.approx(1.0)
    assert f1("nothing shared", ["Paris"]) == 0.0
    # "a" is an article; the repeated "b" overlaps the single gold "b" once: P = 1/2, R = 1
    assert f1("a b b", ["b"]) == pytest.approx(2 / 3)


def test_score_bundles_the_three_metrics():
    s = score("The Chief of Protocol of the United States", ["Chief of Protocol"])
    assert s.accuracy == 1.0 and s.exact_match == 0.0 and 0.0 < s.f1 < 1.0
