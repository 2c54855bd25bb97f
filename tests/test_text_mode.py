"""`--agent-format text`: real seed excerpts in the prompt, chat fluff and loops cut from the reply."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pascal_moe.agent import prompts as P
from pascal_moe.agent import text_mode as TM
from pascal_moe.agent.verify import screen


def test_passage_strips_chat_fluff_and_keeps_the_opening():
    reply = (
        "Sure! Here is the continuation:\n\n```python\n"
        "    return self.queue.pop()\n```\n\nI hope this helps. Let me know if you need more."
    )
    assert TM.passage(reply, "def pop(self):\n") == "def pop(self):\n    return self.queue.pop()"
    # a reply that repeats the opening is not doubled
    assert TM.passage("The river rose in spring and flooded the town.", "The river rose in") == (
        "The river rose in spring and flooded the town."
    )
    # assistant talk inside the body goes, the text around it stays
    chatty = "What would you like?\n\nI'll start with a new sentence.\n\nFile size depends on the file type."
    assert TM.passage(chatty, "") == "File size depends on the file type."
    assert TM.passage("Text 3: A cat sat on the mat.", "") == "A cat sat on the mat."


def test_cut_loops_keeps_the_text_before_the_model_repeats_itself():
    looped = "A train travels at 40 km per hour. It stops twice.\n" + "The answer is 12. How many sons?\n" * 5
    cut = TM.cut_loops(looped)
    assert cut == "A train travels at 40 km per hour. It stops twice.\nThe answer is 12. How many sons?"
    assert TM.cut_loops("One sentence. Another one here.") == "One sentence. Another one here."
    assert screen(looped) == "repetition" and screen(cut + " " + "Fine words follow here now " * 2) is None


def test_excerpt_and_opening_cut_real_text_at_boundaries():
    code = "class Queue:\n    def put(self, x):\n        self.items.append(x)\n" * 20
    ex = TM.excerpt(code, 200)
    assert len(ex) <= 200 and ex.endswith("append(x)") and "\n    def put" in ex
    assert TM.opening("class Queue:\n    def put(self, x):\n        return x", 4) == "class Queue:\n    def put(self,"
    assert TM.opening("a [[tok]] b", 5) == "a tok b"
    assert len(TM.opening("直接給出一流的解決方案，和社區一起協作討論尚未完成的工作" * 9 + " 很難", 12)) == 80


def test_group_sources_rank_seed_documents_by_routing_to_the_keys():
    words = " ".join(["word"] * 25)
    seed = pd.DataFrame(
        {
            "text": [f"low {words}", f"high {words}", "short high", f"mid {words}"],
            "keys": [np.array([1, 7]), np.array([7]), np.array([7]), np.array([7, 2])],
            "counts": [np.array([9, 1]), np.array([10]), np.array([10]), np.array([5, 5])],
            "n_tokens": [10, 10, 10, 10],
        }
    )
    got = TM.group_sources(seed, ["a [[tok]] context of more than eight words here ok"], [7], 5)
    assert [g.split()[0] for g in got] == ["high", "mid", "low", "a"]  # short docs skipped, contexts last
    shots = TM.shots(got, 5)
    assert shots[0].example.startswith("high") and shots[0].opening.startswith("mid")
    assert shots[4].example.startswith("high")  # cycles


def test_text_prompt_shows_the_excerpt_and_the_opening_and_no_routing_words():
    r = P.text_prompt("def put(self, x):\n    self.items.append(x)", "class Stack:", 80, "It should be code.")
    user = r.messages[-1]["content"]
    assert r.schema is None and "self.items.append(x)" in user and user.rstrip().endswith("class Stack:")
    assert "It should be code." in user and "80 words" in user
    assert not any(w in user.lower() for w in ("expert", "router", "trigger", "token"))


def test_a_plain_text_reply_cut_at_max_tokens_is_used_not_retried():
    """A small model that loops until max_tokens still wrote a usable start; JSON cut off is still refused."""
    import pytest

    from pascal_moe.agent.backends import Completion
    from pascal_moe.agent.request import Request
    from pascal_moe.agent.transport import BadReply, ReplyReader

    cut = Completion("The river rose. The river rose. The river", "length", 10, 64)
    text = Request("t", [{"role": "user", "content": "x"}], None, max_tokens=64, want_json=False)
    assert ReplyReader().accept(text, cut, 64) == cut.text
    with pytest.raises(BadReply, match="cut off"):
        ReplyReader().accept(Request("j", [], {"type": "object"}, max_tokens=64), cut, 64)
