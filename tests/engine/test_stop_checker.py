"""StopChecker: matches across deltas, earliest completion wins, hold-back never retracts."""

from __future__ import annotations

import random

import pytest

from ember.engine.stop_checker import StopChecker, StopMatch


def _feed(checker, deltas, first_token=1):
    """Feeds deltas (one token each); returns (text, match, token count at the match)."""
    text = ""
    for num_tokens, delta in enumerate(deltas, start=first_token):
        text += delta
        match = checker.check(text, len(delta), num_tokens)
        if match is not None:
            return text, match, num_tokens
    return text, None, None


def test_stop_string_split_across_deltas():
    checker = StopChecker(["STOP"])
    text, match, num_tokens = _feed(checker, ["Hello S", "T", "", "OP and", " more"])
    assert match == StopMatch("STOP", len("Hello "))
    assert num_tokens == 4
    assert text[: match.truncate_to] == "Hello "


def test_no_match_and_empty_delta():
    checker = StopChecker(["abc"])
    assert checker.check("xxab", 2, 1) is None
    assert checker.check("xxabc", 0, 2) is None  # nothing new: nothing to search
    assert checker.check("abc", 3, 1) == StopMatch("abc", 0)
    assert StopChecker([]).check("abc", 3, 1) is None


def test_earliest_completed_match_wins():
    # "lo w" completes before "world" even though "world" is listed first.
    checker = StopChecker(["world", "lo w"])
    assert checker.check("Hello world", 11, 1) == StopMatch("lo w", 3)
    # By completion, not start: char by char "bc" would fire before "abcd" completes.
    assert StopChecker(["abcd", "bc"]).check("xabcd", 5, 1) == StopMatch("bc", 2)
    # Completing together: the longer one (it starts first).
    assert StopChecker(["c", "abc"]).check("xabc", 4, 1) == StopMatch("abc", 1)


def test_include_stop_str_in_output():
    checker = StopChecker(["STOP"], include_stop_str_in_output=True)
    text, match, _ = _feed(checker, ["foo ST", "OP bar"])
    assert match == StopMatch("STOP", len("foo STOP"))
    assert text[: match.truncate_to] == "foo STOP"  # nothing after the stop string


def test_holdback_length():
    assert StopChecker(["a", "four", "xy"]).num_holdback_chars == 3
    assert StopChecker(["four"], include_stop_str_in_output=True).num_holdback_chars == 0
    assert StopChecker([]).num_holdback_chars == 0


def test_min_tokens():
    checker = StopChecker(["END"], min_tokens=3)
    # Completed at token 2: ignored, and not matched later either.
    text, match, _ = _feed(checker, ["a END", " b", " c"])
    assert match is None
    # Completed at token 3: matched, even though it began earlier.
    text, match, num_tokens = _feed(checker, ["a E", "N", "D b"])
    assert (match, num_tokens) == (StopMatch("END", 2), 3)


def test_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(["ok", ""])
    with pytest.raises(ValueError, match="min_tokens"):
        StopChecker(["ok"], min_tokens=-1)


def _reference(text, stop, include):
    """Scan character by character: the first position where some stop string completes."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text.startswith(s, end - len(s))]
        if hits:
            longest = max(hits, key=len)
            return longest, end if include else end - len(longest)
    return None


@pytest.mark.parametrize("include", [False, True])
def test_streaming_never_retracts_and_matches_reference(include):
    rng = random.Random(include)
    for _ in range(500):
        stop = ["".join(rng.choices("abc", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abcd", k=rng.randint(0, 30)))
        checker = StopChecker(stop, include_stop_str_in_output=include)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)], strict=True)]

        so_far, sent, match = "", "", None
        for num_tokens, delta in enumerate(deltas, start=1):
            so_far += delta
            match = checker.check(so_far, len(delta), num_tokens)
            if match is not None:
                so_far = so_far[: match.truncate_to]
                assert so_far.startswith(sent)  # nothing the client saw is taken back
                sent = so_far
                break
            visible = len(so_far) - checker.num_holdback_chars
            sent = so_far[: max(visible, len(sent))]
        else:
            sent = so_far  # finished without a stop: release the held-back tail

        expected = _reference(text, stop, include)
        if expected is None:
            assert match is None and sent == text
        else:
            assert (match.stop_str, match.truncate_to) == expected
            assert sent == text[: expected[1]]
