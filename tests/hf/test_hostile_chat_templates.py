"""Hostile chat templates: loops, allocations and recursion without bound, and reaches for Python's internals.
Each render ends quickly in one clear DataError, with bounded memory; templates within the limits render."""
from __future__ import annotations

import json
import resource
import shutil
import time

import pytest

pytest.importorskip("jinja2")

from nanodecoder.cli.sample import main as sample_main  # noqa: E402
from nanodecoder.data import DataError  # noqa: E402
from nanodecoder.data.chat import MAX_STEPS, MAX_TEXT, ChatTemplate  # noqa: E402

MESSAGES = [{"role": "user", "content": "hi"}]
BIG = "{% set s = 'x' * 100000 %}"
LIMIT = "went past a limit of the sandbox"
LIMITS = {
    "range": ("{% for i in range(10**12) %}x{% endfor %}", "Range too big"),
    "repeat": ("{{ 'x' * 10**10 }}", LIMIT + ": a repetition of 10,000,000,000 characters"),
    "repeat_list": ("{% set s = 'x' * 2000000 %}{{ ([s] * 100000)|length }}", LIMIT + ": a repetition"),
    "repeat_computed": ("{% set n = 10 %}{{ 'ab' * n ** 10 }}", LIMIT + ": a repetition"),
    "power": ("{{ 10 ** (10 ** 10) }}", LIMIT + ": an integer power"),
    "product": ("{% set n = 10 ** 1000 %}{{ n * n * n * n * n * n * n * n * n }}", LIMIT + ": an integer product"),
    "nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     LIMIT + f": more than {MAX_STEPS:,} steps"),
    "nested_loops_strings": ("{% set s = 'ab' * 500000 %}{% for a in s %}{% for b in s %}{% if a == b %}{% endif %}"
                             "{% endfor %}{% endfor %}", LIMIT + ": more than"),
    "nested_output": ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
                      LIMIT),
    "doubling_namespace": ("{% set ns = namespace(v='x') %}{% for i in range(100) %}{% set ns.v = ns.v ~ ns.v %}"
                           "{% endfor %}{{ ns.v|length }}", LIMIT + ": a ~ concatenation"),
    "doubling_set": ("{% set s = 'x' %}" + "{% set s = s ~ s %}" * 80, LIMIT + ": a ~ concatenation"),
    "doubling_plus": ("{% set s = 'x' %}" + "{% set s = s + s %}" * 80, LIMIT + ": a concatenation"),
    "doubling_macro": ("{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}"
                       "{% endmacro %}{{ f('x', 80) }}", LIMIT),
    "many_parts": ("{% set s = 'x' * 2000000 %}{{ s ~ s ~ s ~ s ~ s ~ s ~ s ~ s }}", LIMIT + ": a ~ concatenation"),
    "references": ("{% set s = 'x' * 2000000 %}{{ [s, s, s, s, s, s, s, s] }}", LIMIT + ": an output"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    "macro_output": ("{% macro f() %}{% for i in range(100000) %}{% for j in range(100) %}" + "y" * 1000 +
                     "{% endfor %}{% endfor %}{% endmacro %}{{ f()|length }}", LIMIT + ": more than 8,388,608 char"),
    "set_block": ("{% set b %}{% for i in range(100000) %}" + "z" * 1000 + "{% endfor %}{% endset %}{{ b|length }}",
                  LIMIT + ": more than 8,388,608 characters of output"),
    "center_filter": ("{{ 'x'|center(10**10) }}", LIMIT + ": a width of 10,000,000,000"),
    "center_method": ("{{ 'x'.center(10**10) }}", LIMIT + ": a width of"),
    "zfill_bytes": ("{{ 'x'.encode().zfill(10**10) }}", LIMIT + ": a width of"),
    "mapped_filter": ("{{ ['a']|map('center', 10**10)|list }}", LIMIT + ": a width of"),
    "format_width": ("{{ '{:>9999999999}'.format(1) }}", LIMIT + ": a format width or precision"),
    "percent_width": ("{{ '%09999999999d' % 1 }}", LIMIT + ": a format width or precision"),
    "percent_star": ("{{ '%*d' % (9999999999, 1) }}", LIMIT + ": a format width or precision"),
    "format_filter": ("{{ '%9999999999s'|format('x') }}", LIMIT + ": a format width or precision"),
    "strftime": ("{{ strftime_now('%9999999999Y') }}", LIMIT + ": a format width or precision"),
    "replace": (BIG + "{{ s.replace('', s) }}", LIMIT + ": a replace of 10,000,200,000"),
    "replace_filter": (BIG + "{{ s|replace('', s) }}", LIMIT + ": a replace"),
    "join": (BIG + "{{ s.join(range(100000)|map('string')) }}", LIMIT + ": a join"),
    "join_filter": (BIG + "{{ range(100000)|join(s) }}", LIMIT + ": a join"),
    "indent": ("{{ ('a\n' * 100000)|indent(100000) }}", LIMIT + ": an indent"),
    "wordwrap": ("{{ ('a' * 100000)|wordwrap(1, true, 'x' * 100000) }}", LIMIT + ": a wordwrap"),
    "expandtabs": ("{{ ('\t' * 100000).expandtabs(100000) }}", LIMIT + ": an expandtabs"),
    "translate": (BIG + "{{ s.translate({120: s}) }}", LIMIT + ": a translate"),
    "tojson_indent": ("{{ messages|tojson(indent=10**9) }}", LIMIT + ": a tojson indent"),
    "sum_of_lists": ("{{ ([[1]] * 100000)|sum(start=[]) }}", LIMIT + ": the sum filter adds numbers only"),
    "lipsum": ("{{ lipsum(10**9) }}", "'lipsum' is undefined"),
    "long_literal": ("{{ " + "9" * 5000 + " }}", "not a usable Jinja template"),
    "deep_nesting": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "not a usable Jinja template"),
    "mro": ("{{ ''.__class__.__mro__ }}", "sandbox forbids"),
    "globals": ("{{ cycler.__init__.__globals__ }}", "sandbox forbids"),
    "subclasses_by_item": ("{{ ''['__class__'] }}", "sandbox forbids"),
    "format_attribute": ("{{ '{0.__class__.__mro__}'.format('') }}", "sandbox forbids"),
}


@pytest.mark.parametrize("template, words", LIMITS.values(), ids=LIMITS.keys())
def test_a_template_without_bounds_ends_quickly_in_one_line(template, words):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(DataError) as e:
        ChatTemplate(template, origin="hostile.jinja").render(MESSAGES)
    message = str(e.value)
    assert message.startswith("hostile.jinja") and words in message and "\n" not in message, message
    assert time.monotonic() - start < 30                                            # a hang catcher, not a timing
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024  # KiB


def test_templates_within_the_limits_render_as_before():
    conversation = [{"role": "user" if i % 2 else "assistant", "content": "hello world " * 100} for i in range(1000)]
    loop = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}\n{% endfor %}"
    out = ChatTemplate(loop).render(conversation)
    assert len(out) == sum(len(m["content"].strip()) + len(m["role"]) + 5 for m in conversation)
    assert ChatTemplate("{{ ('x' * %d)|length }}" % MAX_TEXT).render(MESSAGES) == str(MAX_TEXT)
    assert ChatTemplate("{% for i in range(3) %}{% for j in range(2) %}{{ i * j }}{% endfor %}{% endfor %}"
                        ).render(MESSAGES) == "000102"
    everyday = ("{{ '{ %s' % 'x' }}|{{ '{:>5}'.format(1) }}|{{ '%5.2f'|format(3.14159) }}|{{ 'a-b'.replace('-', '+') }}"
                "|{{ ', '.join(['a', 'b']) }}|{{ ['a', 'b']|join('/') }}|{{ 'x'|indent(2, true) }}|{{ [1, 2]|sum }}"
                "|{{ 'ab' ~ 1 ~ none }}|{{ [1] + [2] }}|{{ 'a' * 3 }}|{{ 2 ** 10 }}|{{ 7 // 2 }}|{{ 'x'|center(5) }}"
                "|{{ messages|tojson }}")
    assert ChatTemplate(everyday).render(MESSAGES) == (
        '{ x|    1| 3.14|a+b|a, b|a/b|  x|3|ab1None|[1, 2]|aaa|1024|3|  x  |[{"role": "user", "content": "hi"}]')
    keywords = ("{{ [1, 2]|sum(start=1) }}|{{ messages|sum(attribute='n') }}|{{ ['a', 'b']|join(d='-') }}"
                "|{{ messages|join(', ', attribute='role') }}|{{ 'x'|center(width=5) }}"
                "|{{ 'a a'|replace('a', 'c', count=1) }}|{{ 'a'|indent(width=2, first=true) }}")
    assert ChatTemplate(keywords).render([{"role": "user", "n": 3}]) == "4|3|a-b|user|  x  |c a|  a"


def test_the_limits_hold_for_each_render_not_for_the_process():
    template = ChatTemplate("{% for i in range(100000) %}{% endfor %}" * 6 + "done")
    for _ in range(2):          # over 600,000 steps each: every render starts with a fresh budget
        assert template.render(MESSAGES) == "done"


@pytest.mark.parametrize("template", [LIMITS["repeat"][0], LIMITS["nested_loops"][0], LIMITS["mro"][0]])
def test_sample_chat_with_a_hostile_template_in_the_run_exits_2(trained_run, tmp_path, capsys, template):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "tokenizer" / "chat.json").write_text(json.dumps({"chat_template": template}))
    capsys.readouterr()
    assert sample_main([str(run), "--chat", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and f"{run / 'tokenizer' / 'chat.json'}: the chat" in errors[0]
