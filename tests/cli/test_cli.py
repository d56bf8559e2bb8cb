import pytest

from keras_vmoe import cli


def test_bad_argument_is_one_line_and_exit_2(capsys):
    assert cli.main(["demo", "--steps", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "keras-vmoe demo: error: --steps must be >= 1, got 0."


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
