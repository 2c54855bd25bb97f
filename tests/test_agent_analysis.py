"""Analyses are checked against the group's experts and triggers; prompts show whole words, never U+FFFD."""

from __future__ import annotations

from pascal_moe.agent.analysis import check_patterns, fallback_patterns
from pascal_moe.agent.prompts import TargetBrief, Trigger, analyse_prompt
from pascal_moe.agent.readable import readable_context, trigger_kind

BRIEFS = [
    TargetBrief(
        "L0.E3",
        "starved",
        [Trigger(" bytes", 4.0, 30), Trigger("\ufffd", 3.0, 9)],
        ["the number of [[by]]tes stored", "a \ufffd[[\ufffd]] piece"],
    ),
    TargetBrief("L2.E5", "sensitive", [Trigger("def", 5.0, 40), Trigger("_", 2.0, 30)], ["[[def]] f(x):"]),
]


def pat(name: str, experts: list[str], desc: str, phrases: list[str] | None = None) -> dict:
    return {"name": name, "description": desc, "experts": experts, "example_phrases": phrases or []}


def test_patterns_naming_foreign_experts_or_no_trigger_are_dropped():
    good = pat("sizes", ["L0.E3"], "Storage reports giving sizes in bytes.")
    code = pat("python_defs", ["L2.E5", "L0.E3"], "Python modules.", ["def load(path):"])
    foreign = pat("names", ["GraceBakelov/Gabriela"], "People bytes.")
    outside = pat("other", ["L1.E1"], "bytes")
    vague = pat("stuff", ["L0.E3"], "Interesting and varied text about many things.")
    empty = pat("none", [], "bytes")
    got = check_patterns([good, code, foreign, outside, vague, empty, "junk"], BRIEFS)
    assert got.kept == [good, code]
    reasons = dict(got.dropped)
    assert reasons["names"].startswith("names experts outside") and reasons["other"].startswith("names experts outside")
    assert reasons["stuff"] == "contains none of its experts' trigger tokens" and reasons["none"] == "names no expert"
    assert len(got.dropped) == 5


def test_fallback_and_prompts_show_whole_words_only():
    fb = fallback_patterns(BRIEFS)
    assert [p["experts"] for p in fb] == [["L0.E3"], ["L2.E5"]]
    assert "bytes" in fb[0]["description"] and "\ufffd" not in str(fb)
    assert fb[0]["example_phrases"][0] == "the number of bytes stored"
    user = analyse_prompt(BRIEFS, {"code": 1.0}).messages[1]["content"]
    assert "\ufffd" not in user and "[[bytes]]" in user and "[[by]]" not in user


def test_readable_context_widens_marks():
    assert readable_context("the qu[[ick]] fox") == "the [[quick]] fox"
    assert readable_context("x \ufffd[[\ufffd]]\ufffd y") == "x y"
    assert readable_context("Optional[[ al]]tchars should") == "Optional [[altchars]] should"
    assert readable_context("the[[ al]]sa-tools") == "the [[alsa]]-tools"


def test_trigger_kind_says_digits_code_or_script():
    assert trigger_kind(["1", "25", "3.5", "the"])[0] == "digits"
    assert trigger_kind(["self", "_", "()", "def", "x"])[0] == "code"
    kind = trigger_kind(["的", "一", "\ufffd", "a"])
    assert kind[0] == "non_latin" and "CJK (Chinese, Japanese)" in kind[1]
    assert trigger_kind(["the", " house", "river"]) is None
    user = analyse_prompt(
        [TargetBrief("L0.E1", "starved", [Trigger("1", 3, 9), Trigger("7", 2, 9)])], {"x": 1.0}
    ).messages[1]["content"]
    assert "mostly numbers" in user


def test_byte_pieces_are_named_by_script(qwen_dir):
    """Pieces of multi-byte characters decode to U+FFFD alone; their UTF-8 lead byte still names the script."""
    from pascal_moe.agent.readable import annotate_pieces, piece_script
    from pascal_moe.models.loading import load_tokenizer

    tok = load_tokenizer(str(qwen_dir))
    ids = tok("日本語 привет", add_special_tokens=False)["input_ids"]
    scripts = {piece_script(tok, i) for i in ids if tok.decode([i]) == "\ufffd"}
    assert {"CJK", "CYRILLIC"} <= scripts
    ru = [i for i in ids if tok.decode([i]) == "\ufffd" and piece_script(tok, i) == "CYRILLIC"]
    trig = [Trigger(tok.decode([i]), 3.0, 10, i) for i in ru[:4]]
    annotate_pieces(trig, tok)
    user = analyse_prompt([TargetBrief("L0.E1", "starved", trig)], {"x": 1.0}).messages[1]["content"]
    assert "\ufffd" not in user and "non-Latin script (Cyrillic)" in user


def test_fallback_pattern_trigger_words_are_whole_words_context_first():
    """The trigger-token fallback names whole words, context words first (the text prompt itself: test_text_mode)."""
    brief = TargetBrief(
        "L0.E3",
        "sensitive",
        [Trigger("comp", 5.0, 30), Trigger(" bytes", 4.0, 30), Trigger(" file", 3.0, 20), Trigger(" disk", 3.0, 20)],
        ["the number of [[by]]tes stored", "copy the [[file]] to disk"],
    )
    [pat] = fallback_patterns([brief])
    assert pat["trigger_words"] == ["bytes", "file", "comp", "disk"]  # context words first, then the triggers
    assert pat["example_phrases"] == ["the number of bytes stored", "copy the file to disk"]
