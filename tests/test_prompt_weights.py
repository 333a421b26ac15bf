"""AUTOMATIC1111's prompt syntax, parsed: a table of cases written out by hand."""

from __future__ import annotations

import pytest

from stable_diffusion.prompt_weights import needs_encoding, parse

E, D = 1.1, 1 / 1.1  # one round bracket, one square bracket


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", [[("a cat", 1.0)]]),
        ("(cat)", [[("cat", E)]]),
        ("((cat))", [[("cat", E * E)]]),
        ("[cat]", [[("cat", D)]]),
        ("[[cat]]", [[("cat", D * D)]]),
        ("(cat:1.5) on a mat", [[("cat", 1.5), (" on a mat", 1.0)]]),
        ("a (red:1.2) [blue] car", [[("a ", 1.0), ("red", 1.2), (" ", 1.0), ("blue", D), (" car", 1.0)]]),
        ("(a (b:2) c:1.5)", [[("a ", 1.5), ("b", 3.0), (" c", 1.5)]]),
        ("[(a:2)]", [[("a", 2 * D)]]),
        ("x (y:.5)", [[("x ", 1.0), ("y", 0.5)]]),
        ("(y: 0.8 )", [[("y", 0.8)]]),
        (r"\(literal\) and \[this\]", [[("(literal) and [this]", 1.0)]]),
        (r"a back\\slash", [[("a back\\slash", 1.0)]]),
        ("(unclosed cat", [[("unclosed cat", E)]]),
        ("[unclosed", [[("unclosed", D)]]),
        ("stray) and ]", [[("stray) and ]", 1.0)]]),
        ("cat:1.5)", [[("cat:1.5)", 1.0)]]),
        ("(word:abc)", [[("word:abc", E)]]),
        ("(x:1.2.3)", [[("x:1.2.3", E)]]),
        ("a dog BREAK a cat", [[("a dog", 1.0)], [("a cat", 1.0)]]),
        ("(a dog BREAK a cat:1.3)", [[("a dog", 1.3)], [("a cat", 1.3)]]),
        ("BREAK", [[("", 1.0)]]),
        ("no BREAKfast here", [[("no BREAKfast here", 1.0)]]),
        ("", [[("", 1.0)]]),
    ],
)
def test_the_syntax_reads_as_automatic1111_reads_it(prompt: str, expected: list[list[tuple[str, float]]]) -> None:
    found = parse(prompt)
    assert [[text for text, _ in chunk] for chunk in found] == [[text for text, _ in chunk] for chunk in expected]
    for chunk, wanted in zip(found, expected, strict=True):
        assert [weight for _, weight in chunk] == pytest.approx([weight for _, weight in wanted])


def test_plain_prompts_stay_with_the_pipelines_own_encoding() -> None:
    assert not needs_encoding(parse("a lighthouse at dusk"), tokens=6)
    assert needs_encoding(parse("a (lighthouse) at dusk"), tokens=6)
    assert needs_encoding(parse("a lighthouse BREAK at dusk"), tokens=6)
    assert needs_encoding(parse("a lighthouse at dusk"), tokens=76), "more than 75 tokens: no truncation"


@pytest.mark.timeout(10)  # a pattern that backtracks would hang here, not just run slowly
def test_hostile_prompts_parse() -> None:
    assert parse("(" * 2000) == [[("", 1.0)]]
    assert parse(":" * 1000 + "1" * 1000) == [[(":" * 1000 + "1" * 1000, 1.0)]]
    assert parse("(a:" + "9" * 300 + ")")[0][0][1] == pytest.approx(float("9" * 300))
