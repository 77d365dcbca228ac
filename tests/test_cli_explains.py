"""A CLI that explains itself: descriptions and defaults in --help, a wrong flag answered with the subcommand's usage
and the closest flag, and `generate` reading its prompt from a pipe."""

import json

import pytest

from cairn.cli import build_parser, main
from tests.test_cli import error_of, run


@pytest.mark.parametrize("verb", ["generate", "chat", "serve", "convert", "cache", "params"])
def test_help_has_a_description_and_the_defaults(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: cairn {verb}")
    assert rest.split("\n\n")[0].strip() and not rest.startswith(("positional", "options"))  # a description
    if verb in ("generate", "chat"):
        for flag, default in (("--max-tokens", {"generate": 256, "chat": 512}[verb]), ("--top-p", 1.0),
                              ("--top-k", 0), ("--group-size", 32)):
            block = out[out.index(f"  {flag} "):].split("\n  -")[0]
            assert f"default: {default}" in block, (flag, block)
        temperature = out[out.index("  --temperature"):].split("\n  -")[0]
        assert f"default {dict(generate=0.0, chat=0.7)[verb]}" in temperature


def test_every_option_shows_its_default():
    """Options with a default worth showing (not None/False) say it, in every subcommand's help."""
    def walk(parser, path):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict) and action.option_strings == []:
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
            elif (action.option_strings and action.default not in (None, False, [], "==SUPPRESS==")
                  and action.default is not True and not isinstance(action.default, bool)):
                yield path, action

    missing = []
    parser = build_parser()
    formatter = parser.formatter_class("cairn")
    for path, action in walk(parser, []):
        if "default" not in formatter._get_help_string(action):
            missing.append((" ".join(path), action.option_strings[0]))
    assert not missing, missing


def test_wrong_flag_shows_the_subcommands_usage_and_the_closest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--temprature=0.5", "-p", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: cairn generate ")
    assert "unrecognized arguments: --temprature=0.5 (did you mean --temperature?)" in err
    with pytest.raises(SystemExit):
        main(["serve", "--prot", "8001"])
    err = capsys.readouterr().err
    assert err.startswith("usage: cairn serve ") and "(did you mean --port?)" in err


def test_generate_reads_the_prompt_from_stdin():
    flag = run("generate", "--chat", "-p", "What is the capital of France?", "--json", "--max-tokens", "6")
    piped = run("generate", "--chat", "--json", "--max-tokens", "6", stdin="What is the capital of France?")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == json.loads(flag.stdout)
    assert "-p TEXT, or pipe it in" in error_of(run("generate", stdin=""))


def test_the_parser_is_built_and_a_wrong_flag_answered_without_importing_torch():
    """A wrong flag or --help costs no torch import (~1.3 s), and a server's first start can convert its model while
    torch loads: nothing the parser reads imports torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import cairn

    code = ("import sys\n"
            "from cairn.cli import main\n"
            "try:\n"
            "    main(['serve', '--bogus'])\n"
            "except SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(cairn.__file__).parents[1]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.stdout.split() == ["2", "False"], (r.stdout, r.stderr)
    assert "--bogus" in r.stderr
