"""The embedded corpus: Markdown markup stripped to plain dialogue, every play present."""

from __future__ import annotations

import re

from lit_lowrank.data.corpus import shakespeare_plays, strip_markdown

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**HAMLET**  
\\[Aside]_  
A little more than kin, and less than kind.
"""

EXPECTED = """Hamlet

ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO

BERNARDO:
Who's there?

HAMLET:
[Aside]
A little more than kin, and less than kind.
"""


def test_strip_markdown():
    assert strip_markdown(PLAY) == EXPECTED


def test_every_play_is_plain_text():
    plays = shakespeare_plays()
    assert len(plays) == 38
    assert [name for name, _ in plays] == sorted(name for name, _ in plays)
    text = "".join(t for _, t in plays)
    assert not re.search(r"[*_#\\]", text)
    assert "HAMLET:\nTo be, or not to be: that is the question:" in text
