"""The Loader's ``memory`` setting (hyperlora.memory): when the loaded weights leave RAM as sampling starts."""

from __future__ import annotations

import sys

import pytest

from hyperlora.errors import SettingError
from hyperlora.memory import MEMORY_CHOICES, SAMPLING_HEADROOM, should_release, trim_freed_memory

GB = 2**30


@pytest.mark.parametrize(("policy", "held", "free", "expected"), [
    ("keep", 5 * GB, 0, False),                               # never, even with no RAM left
    ("release while sampling", 5 * GB, 100 * GB, True),        # always, even with plenty
    ("release while sampling", 0, 0, False),                   # nothing held: nothing to do
    ("auto", 5 * GB, 5 * GB + SAMPLING_HEADROOM, False),       # exactly enough room: kept
    ("auto", 5 * GB, 5 * GB + SAMPLING_HEADROOM - 1, True),    # one byte short: released
    ("auto", 5 * GB, 40 * GB, False),
    ("auto", 5 * GB, None, False),                             # free RAM unknown: kept
])
def test_should_release(policy, held, free, expected):
    assert should_release(policy, held_bytes=held, free_bytes=free) is expected


def test_auto_is_the_first_choice_and_a_wrong_one_is_named():
    assert MEMORY_CHOICES[0] == "auto" and SAMPLING_HEADROOM == 4 * GB
    with pytest.raises(SettingError, match=r"The Loader's memory setting is 'sometimes'; choose one of 'auto'"):
        should_release("sometimes", held_bytes=1, free_bytes=1, where="The Loader's memory setting")


def test_trim_freed_memory_runs_on_glibc():
    assert trim_freed_memory() is sys.platform.startswith("linux")
