"""The option parser and config files under random input (hypothesis): whatever is typed, the only exception
is a UserError (one `error:` line), never a traceback. Derandomized: the same examples on every run."""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanogpt_jax.config import (CompileConfig, ConvertConfig, EvalConfig, PrepareConfig, SampleConfig, TrainConfig,
                                UserError, parse, run_config_file)

CLASSES = [TrainConfig, CompileConfig, SampleConfig, EvalConfig, ConvertConfig, PrepareConfig]
KEYS = sorted({f for cls in CLASSES for f in cls.__dataclass_fields__} | {"compile", "device", "debug", ""})
VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e9", "nan", "inf", "-inf", "True", "None", "''", "[1]", "{}", "(1,", "1" * 400,
                     "()", "1j", "b'x'", "gpt2", "resume", "best", "float('nan')", "__import__('os')", "\x00"]),
    st.integers(-10**30, 10**30).map(str), st.floats(allow_nan=True).map(repr),
    st.text(string.printable, max_size=12))
ARGS = st.lists(st.one_of(
    st.builds(lambda k, v: f"--{k}={v}", st.sampled_from(KEYS), VALUES),
    st.builds(lambda k: f"--{k}", st.sampled_from(KEYS)),
    VALUES, st.text(max_size=8)), max_size=6)
FAST = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_random_command_lines_give_a_config_or_a_user_error(cls):
    @FAST
    @given(ARGS)
    def check(argv):
        argv = [a for a in argv if not a.endswith(".py")]  # files: the test below
        try:
            parse(cls, argv, [], "dataset" if cls is PrepareConfig else None)
        except UserError as e:
            assert "\n" not in str(e) or "config " in str(e)

    check()


CONFIG_LINES = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(KEYS), VALUES),
    st.sampled_from(["import os", "import nonexistent_module", "1/0", "raise SystemError('x')", "def f(:", "  x = 1",
                     "x = [", "del x", "assert False", "raise KeyboardInterrupt if False else ValueError", "\x00",
                     "exec('1/0')", "globals()['n_layer'] = 'x'"]),
    st.text(max_size=20))


def test_random_config_files_give_a_config_or_a_user_error(tmp_path):
    path = tmp_path / "config.py"

    @FAST
    @given(st.lists(CONFIG_LINES, max_size=5), st.sampled_from(CLASSES))
    def check(lines, cls):
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            parse(cls, [str(path)])
        except UserError as e:
            assert str(e)
        try:
            run_config_file(str(path))
        except UserError:
            pass

    check()
